"""
A `UserContext` to and from plain dicts and HTTP headers, for crossing process
and service boundaries. Decoding validates exactly like construction.

This module owns the wire format, and with it the list of a context's fields;
it imports nothing of the package but its exceptions, so that `UserContext`
can import it without a circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from ._messages import short_repr
from .exceptions import InvalidContextError


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = [
    "FIELDS",
    "HEADER_PREFIX",
    "ID_FIELDS",
    "MAX_HEADER_BYTES",
    "SIGNATURE_HEADER",
    "from_dict",
    "from_headers",
    "to_dict",
    "to_headers",
]

ID_FIELDS = ("user_id", "thread_id", "run_id", "request_id", "connection_id", "parent_request_id")
"""
The fields of a context that hold ids: strings, percent-encoded in headers.
"""
FIELDS = (*ID_FIELDS, "depth", "created_at", "metadata")
"""
Every field of a context, in the order of `UserContext`'s attributes: the keys
of `to_dict` and what the headers are named after. A test checks it against
the class.
"""
HEADER_PREFIX = "x-usercontext-"
MAX_HEADER_BYTES = 8 * 1024
SIGNATURE_HEADER = HEADER_PREFIX + "signature"
"""
The header that carries the signature of the others (see `_signing`): no field
of a context, and ignored when decoding without a verifier.
"""
_MAX_DEPTH_DIGITS = 4
_REQUIRED = ("user_id", "thread_id", "run_id")
_HEADER_OF = {f: HEADER_PREFIX + f.replace("_", "-") for f in FIELDS}
_FIELD_OF = {h: f for f, h in _HEADER_OF.items()}
_DECODED_AS_ID = frozenset(ID_FIELDS)
# RFC 3986 unreserved characters plus a few harmless ones stay readable.
_SAFE = "-._~:@!$&'()*+,;=/"

C = TypeVar("C")


class Signer(Protocol):
    """
    What `to_headers` needs of a signer: `usercontext.HeaderSigner`.
    """

    def _sign(self, headers: Mapping[str, str]) -> str: ...


class Verifier(Protocol):
    """
    What `from_headers` needs of a verifier: `usercontext.HeaderVerifier`.
    """

    def _verify(self, headers: Mapping[str, str], signature: str | None) -> str: ...


class Context(Protocol):
    """
    What the wire format reads of a context: its fields, read-only.
    """

    @property
    def user_id(self) -> str: ...
    @property
    def thread_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def connection_id(self) -> str | None: ...
    @property
    def parent_request_id(self) -> str | None: ...
    @property
    def depth(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...


def _thaw(value: object) -> Any:
    if isinstance(value, Mapping):
        mapping = cast("Mapping[object, object]", value)
        return {k: _thaw(v) for k, v in mapping.items()}
    if type(value) is tuple:
        return tuple(_thaw(v) for v in cast("tuple[object, ...]", value))
    return value


def to_dict(ctx: Context) -> dict[str, Any]:
    """
    Return *ctx* as a dict of plain values under the keys of `FIELDS`.
    """
    return {
        "user_id": ctx.user_id,
        "thread_id": ctx.thread_id,
        "run_id": ctx.run_id,
        "request_id": ctx.request_id,
        "connection_id": ctx.connection_id,
        "parent_request_id": ctx.parent_request_id,
        "depth": ctx.depth,
        "created_at": ctx.created_at,
        "metadata": _thaw(ctx.metadata),
    }


def _error(field: str, value: object, reason: str, fix: str) -> InvalidContextError:
    return InvalidContextError(
        f"Cannot decode UserContext.{field}: {reason}; got {short_repr(value)}. {fix}",
        field=field,
        value=value,
        reason=reason,
    )


def from_dict(cls: Callable[..., C], data: object) -> C:
    """
    Call *cls* with the fields in *data*, after refusing unknown and missing keys.
    """
    if not isinstance(data, Mapping):
        msg = (
            f"UserContext.from_dict() takes a mapping, got {type(data).__name__}. "
            "Pass the dict that UserContext.to_dict() returned."
        )
        raise TypeError(msg)
    data = cast("Mapping[object, object]", data)
    for key in data:
        if key not in _HEADER_OF:
            raise _error(
                str(key),
                key,
                "is not a UserContext field",
                f"Pass only the keys UserContext.to_dict() returns: {', '.join(FIELDS)}.",
            )
    for key in _REQUIRED:
        if key not in data:
            raise _error(
                key, None, "is missing", "Pass the dict that UserContext.to_dict() returned."
            )
    return cls(**cast("Mapping[str, object]", data))


def to_headers(ctx: Context, signer: Signer | None = None) -> dict[str, str]:
    """
    Return *ctx* as ``x-usercontext-*`` headers of at most `MAX_HEADER_BYTES`,
    signed by *signer* when one is given.
    """
    # Imported on the first call, as in _decode: `import usercontext` need not load them.
    import json

    from urllib.parse import quote

    headers = {
        _HEADER_OF[f]: quote(v, safe=_SAFE) for f in ID_FIELDS if (v := getattr(ctx, f)) is not None
    }
    headers[_HEADER_OF["depth"]] = str(ctx.depth)
    headers[_HEADER_OF["created_at"]] = repr(ctx.created_at)
    if ctx.metadata:
        try:
            headers[_HEADER_OF["metadata"]] = json.dumps(
                _thaw(ctx.metadata), ensure_ascii=True, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as e:
            raise InvalidContextError(
                f"UserContext.metadata cannot travel in headers: {e}. Headers carry JSON "
                "values only (str, int, finite float, bool, None, tuples and mappings); use "
                "to_dict() with a binary transport for bytes and frozensets.",
                field="metadata",
                value=_thaw(ctx.metadata),  # plain dicts, which pickle: errors cross processes
                reason="not JSON-serialisable",
            ) from e
    if signer is not None:
        headers[SIGNATURE_HEADER] = _signer(signer)._sign(headers)
    size = sum(len(k) + len(v) for k, v in headers.items())
    if size > MAX_HEADER_BYTES:
        raise InvalidContextError(
            f"UserContext headers would take {size} bytes, over the limit of "
            f"{MAX_HEADER_BYTES}. Keep metadata small: move bulky data to a store and "
            "pass its key.",
            field="headers",
            value=size,
            reason="too large",
        )
    return headers


def _signer(signer: object) -> Signer:
    if not hasattr(signer, "_sign"):
        msg = f"to_headers(signer=...) takes a usercontext.HeaderSigner, got {short_repr(signer)}."
        raise TypeError(msg)
    return cast("Signer", signer)


def _verifier(verifier: object) -> Verifier:
    if not hasattr(verifier, "_verify"):
        msg = (
            "from_headers(verifier=...) takes a usercontext.HeaderVerifier, got "
            f"{short_repr(verifier)}."
        )
        raise TypeError(msg)
    return cast("Verifier", verifier)


def _pairs(headers: object) -> Iterable[Any]:
    if isinstance(headers, Mapping):
        return cast("Mapping[object, object]", headers).items()
    if isinstance(headers, (str, bytes)) or not isinstance(headers, Iterable):
        msg = (
            "UserContext.from_headers() takes a mapping or an iterable of (name, value) "
            f"pairs, got {type(headers).__name__}."
        )
        raise TypeError(msg)
    return cast("Iterable[object]", headers)  # of anything: _collect checks each one


def _text(field: str, raw: object) -> str:
    if isinstance(raw, bytes):
        return raw.decode("latin-1")
    if isinstance(raw, str):
        return raw
    raise _error(
        field, raw, "is neither str nor bytes", "Pass header names and values as str or bytes."
    )


def _collect(headers: Any) -> tuple[dict[str, str], str | None]:
    """
    Return the values of the ``x-usercontext-*`` *headers* by field, and the
    signature header's value, if any.
    """
    found: dict[str, str] = {}
    signature: str | None = None
    size = 0
    for pair in _pairs(headers):
        try:
            raw_name, raw_value = pair
        except (TypeError, ValueError):
            raise _error(
                "headers", pair, "is not a (name, value) pair", "Pass (name, value) pairs."
            ) from None
        name = _text("headers", raw_name).lower()
        if not name.startswith(HEADER_PREFIX):
            continue
        value = _text(name, raw_value)
        size += len(name) + len(value)
        if size > MAX_HEADER_BYTES:
            raise _error(
                "headers",
                size,
                f"the x-usercontext-* headers exceed {MAX_HEADER_BYTES} bytes",
                "Send smaller metadata.",
            )
        field = _FIELD_OF.get(name)
        if field is None:
            if name != SIGNATURE_HEADER:
                raise _error(
                    name,
                    value,
                    "is not a usercontext header",
                    "Send only the headers UserContext.to_headers() makes: "
                    f"{', '.join(_HEADER_OF.values())}, {SIGNATURE_HEADER}.",
                )
            if signature is not None:
                raise _error(
                    "signature", value, "appears twice", "Send each x-usercontext-* header once."
                )
            signature = value
            continue
        if field in found:
            raise _error(field, value, "appears twice", "Send each x-usercontext-* header once.")
        found[field] = value
    return found, signature


def _decode(field: str, value: str) -> Any:
    import json

    from urllib.parse import unquote

    if field in _DECODED_AS_ID:
        try:
            return unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise _error(
                field, value, "is not percent-encoded UTF-8", "Encode it with to_headers()."
            ) from None
    if field == "depth":
        if not (value.isascii() and value.isdigit() and len(value) <= _MAX_DEPTH_DIGITS):
            raise _error(
                field, value, "is not a small decimal integer", "Send it as to_headers() does."
            )
        return int(value)
    if field == "created_at":
        try:
            return float(value)
        except ValueError:
            raise _error(
                field, value, "is not a number", "Send epoch seconds as to_headers() does."
            ) from None
    try:
        metadata = json.loads(value)
    except (ValueError, RecursionError):
        raise _error(field, value, "is not valid JSON", "Send it as to_headers() does.") from None
    if not isinstance(metadata, dict):
        raise _error(field, value, "is not a JSON object", "Send it as to_headers() does.")
    return cast("dict[str, Any]", metadata)


def from_headers(cls: Callable[..., C], headers: Any, verifier: Verifier | None = None) -> C:
    """
    Call *cls* with the fields decoded from the ``x-usercontext-*`` *headers*,
    after *verifier*, when one is given, has checked their signature.
    """
    found, signature = _collect(headers)
    if verifier is not None:
        # Before anything is decoded: unsigned input reaches no decoder.
        _verifier(verifier)._verify({_HEADER_OF[f]: v for f, v in found.items()}, signature)
    for field in _REQUIRED:
        if field not in found:
            raise _error(
                field,
                None,
                f"header {_HEADER_OF[field]} is missing",
                "Send the headers that UserContext.to_headers() makes.",
            )
    return cls(**{field: _decode(field, value) for field, value in found.items()})

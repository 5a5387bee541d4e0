"""
W3C Baggage as a propagation format of `usercontext.otel`: a context's fields
as ``usercontext.<field>`` members, written through OpenTelemetry's baggage
and read back, strictly, from the ``baggage`` header.

Reading goes through `usercontext.UserContext.from_headers`, so a member is
validated exactly as the header of the same field would be.
"""

from __future__ import annotations

import json

from typing import TYPE_CHECKING, cast
from urllib.parse import quote, quote_plus, unquote_plus

from opentelemetry import baggage as _baggage
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import get_current
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    default_getter,
    default_setter,
)

from usercontext import UserContext, current
from usercontext._codec import HEADER_PREFIX, ID_FIELDS, MAX_HEADER_BYTES, _thaw
from usercontext._edge import BAGGAGE_PREFIX
from usercontext._log_fields import metadata_keys as _metadata_keys
from usercontext.exceptions import InvalidContextError


if TYPE_CHECKING:
    from collections.abc import Iterable

    from opentelemetry.context import Context


__all__ = ["MAX_MEMBER_BYTES", "baggage_context", "extract_baggage", "inject_baggage"]

MAX_MEMBER_BYTES = 4096
"""
W3C Baggage's limit on one member, name and value encoded: propagators drop
longer members.
"""
# What travels: the ids that are set, the lineage and the creation time, and
# the allowlisted metadata as one JSON object (the header format's own).
_MEMBERS = (*ID_FIELDS, "depth", "created_at", "metadata")
_MEMBER_NAMES = ", ".join(BAGGAGE_PREFIX + f for f in _MEMBERS)
_REQUIRED = ("user_id", "thread_id", "run_id")
_PREFIX_LENGTH = len(BAGGAGE_PREFIX)
_ID_SET = frozenset(ID_FIELDS)
_W3C = W3CBaggagePropagator()


def _refused(field: str, value: object, reason: str, fix: str) -> InvalidContextError:
    return InvalidContextError(
        f"Cannot read the context from baggage member {BAGGAGE_PREFIX}{field}: {reason}. {fix}",
        field=field,
        value=value,
        reason=reason,
    )


def _members(ctx: UserContext, metadata: tuple[str, ...]) -> dict[str, str]:
    members = {f: v for f in ID_FIELDS if (v := getattr(ctx, f)) is not None}
    members["depth"] = str(ctx.depth)
    members["created_at"] = repr(ctx.created_at)
    chosen = {k: ctx.metadata[k] for k in metadata if k in ctx.metadata}
    if chosen:
        try:
            members["metadata"] = json.dumps(
                _thaw(chosen), ensure_ascii=False, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as e:
            msg = (
                f"UserContext.metadata cannot travel in baggage: {e}. Baggage carries JSON "
                "values only (str, int, finite float, bool, None, tuples and mappings): "
                "allowlist only keys that hold such values."
            )
            raise InvalidContextError(
                msg, field="metadata", value=_thaw(chosen), reason="not JSON-serialisable"
            ) from e
    size = 0
    for field, value in members.items():
        length = len(quote_plus(BAGGAGE_PREFIX + field)) + 1 + len(quote_plus(value))
        if length > MAX_MEMBER_BYTES:
            msg = (
                f"The baggage member {BAGGAGE_PREFIX}{field} would take {length} bytes, over "
                f"W3C Baggage's limit of {MAX_MEMBER_BYTES} per member, and propagators drop "
                "such members. Keep it small: allowlist fewer metadata keys, or move bulky "
                "data to a store and pass its key."
            )
            raise InvalidContextError(msg, field=field, value=length, reason="too large")
        size += length + 1
    if size > MAX_HEADER_BYTES:
        msg = (
            f"The usercontext.* baggage members would take {size} bytes, over the limit of "
            f"{MAX_HEADER_BYTES}. Allowlist fewer metadata keys, or move bulky data to a "
            "store and pass its key."
        )
        raise InvalidContextError(msg, field="baggage", value=size, reason="too large")
    return members


def baggage_context(
    ctx: UserContext | None = None,
    *,
    metadata: Iterable[str] = (),
    context: Context | None = None,
) -> Context:
    """
    Return an OpenTelemetry context whose baggage carries *ctx* as
    ``usercontext.<field>`` members.

    The members are the ids that are set (``usercontext.user_id``,
    ``usercontext.thread_id``, ``usercontext.run_id``,
    ``usercontext.request_id``, and ``usercontext.connection_id`` and
    ``usercontext.parent_request_id`` when set), ``usercontext.depth`` and
    ``usercontext.created_at``, and, when *metadata* allowlists keys the
    context has, ``usercontext.metadata``: a JSON object of those keys only.
    Baggage goes to every service downstream, so no other metadata travels.

    The other members of *context*'s baggage are kept; ``usercontext.*``
    members it had are replaced. Attach the result
    (``opentelemetry.context.attach``) for instrumented clients to send it, or
    give it to `inject_baggage`.

    >>> import usercontext as uc
    >>> from opentelemetry import baggage
    >>> from usercontext.otel import baggage_context
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1", request_id="req-1")
    >>> baggage.get_baggage("usercontext.user_id", baggage_context(ctx))
    'u-42'

    Args:
        ctx: The context to carry; by default the bound one.
        metadata: The metadata keys that may travel.
        context: The OpenTelemetry context to add the members to; by default
            the current one.

    Returns:
        A new OpenTelemetry context.

    Raises:
        usercontext.exceptions.NoContextError: If *ctx* is not given and no
            context is bound.
        usercontext.exceptions.InvalidContextError: If an allowlisted metadata
            value is not JSON, or a member would pass W3C Baggage's size
            limits (4096 bytes per member, 8 KiB in all); the error names the field.
        TypeError: If *ctx* is not a `usercontext.UserContext`, or *metadata*
            not an iterable of str.
        ValueError: If a key in *metadata* is empty, one of the ids or a field
            of `usercontext.UserContext`.

    .. versionadded:: 0.1.0
    """
    keys = _metadata_keys(
        metadata, owner="baggage_context", reserved=frozenset(), where="baggage", identifiers=False
    )
    if ctx is None:
        ctx = current()
    elif not isinstance(ctx, UserContext):
        msg = (  # type: ignore[unreachable]  # callers whose code is not type-checked
            f"baggage_context() takes a usercontext.UserContext, got a {type(ctx).__name__}. "
            "Pass the context to carry, or nothing for the bound one."
        )
        raise TypeError(msg)
    members = _members(ctx, keys)
    if context is None:
        context = get_current()
    for name in _baggage.get_all(context):
        if name[:_PREFIX_LENGTH].lower() == BAGGAGE_PREFIX:
            context = _baggage.remove_baggage(name, context)
    for field, value in members.items():
        context = _baggage.set_baggage(BAGGAGE_PREFIX + field, value, context)
    return context


def inject_baggage(
    carrier: CarrierT,
    ctx: UserContext | None = None,
    *,
    metadata: Iterable[str] = (),
    context: Context | None = None,
    setter: Setter[CarrierT] = default_setter,
) -> None:
    """
    Write the W3C ``baggage`` header of *ctx* into *carrier*: the members of
    `baggage_context`, after those of *context*'s baggage.

    >>> import usercontext as uc
    >>> from usercontext.otel import inject_baggage
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1",
    ...                      request_id="req-1", created_at=1.5)
    >>> headers = {}
    >>> inject_baggage(headers, ctx)
    >>> headers["baggage"]  # doctest: +NORMALIZE_WHITESPACE
    'usercontext.user_id=u-42,usercontext.thread_id=t-7,usercontext.run_id=r-1,usercontext.request_id=req-1,usercontext.depth=0,usercontext.created_at=1.5'

    Args:
        carrier: Where to write the header, such as a dict of outgoing
            headers.
        ctx: The context to carry; by default the bound one.
        metadata: The metadata keys that may travel.
        context: The OpenTelemetry context whose other baggage members to
            send too; by default the current one.
        setter: How to write into *carrier*, as in OpenTelemetry's
            propagators.

    Raises:
        usercontext.exceptions.NoContextError: If *ctx* is not given and no
            context is bound.
        usercontext.exceptions.InvalidContextError: As `baggage_context`.
        TypeError: As `baggage_context`.
        ValueError: As `baggage_context`.

    .. versionadded:: 0.1.0
    """
    _W3C.inject(carrier, baggage_context(ctx, metadata=metadata, context=context), setter)


def _collect(values: Iterable[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    size = 0
    for value in values:
        for raw in value.split(","):
            name, eq, rest = raw.partition("=")
            name = name.strip(" \t")
            if name[:_PREFIX_LENGTH].lower() != BAGGAGE_PREFIX:
                continue
            field = name[_PREFIX_LENGTH:]
            size += len(raw)
            if size > MAX_HEADER_BYTES:
                raise _refused(
                    "baggage",
                    size,
                    f"the usercontext.* members exceed {MAX_HEADER_BYTES} bytes",
                    "Send smaller metadata.",
                )
            if field not in _MEMBERS:
                raise _refused(
                    field,
                    name,
                    "it is not a member the library writes",
                    f"Send only the members inject_baggage() writes: {_MEMBER_NAMES}.",
                )
            if not eq:
                raise _refused(
                    field, raw, "it has no value", "Send name=value, as inject_baggage() does."
                )
            if field in found:
                raise _refused(
                    field, raw, "it appears twice", "Send each usercontext.* member once."
                )
            # Properties after ';' describe a member; they are no part of its value.
            encoded = rest.partition(";")[0].strip(" \t")
            try:
                found[field] = unquote_plus(encoded, errors="strict")
            except UnicodeDecodeError:
                raise _refused(
                    field,
                    encoded,
                    "it is not percent-encoded UTF-8",
                    "Encode it as inject_baggage() does.",
                ) from None
    return found


def extract_baggage(
    carrier: CarrierT,
    *,
    trusted: bool,
    getter: Getter[CarrierT] = default_getter,
) -> UserContext | None:
    """
    Return the context that the ``usercontext.*`` members of *carrier*'s W3C
    ``baggage`` header carry, validated, or `None` when it has none.

    A member asserts who the user is, so read them only from a peer you
    trust, and say so with *trusted*: a service that untrusted clients reach
    drops those members at the edge with `usercontext.strip_context_headers`
    (the middlewares' ``strip_context_headers=True``) before anything reads
    them. The members are checked strictly: an unknown ``usercontext.*``
    member, one given twice, a missing id, or a value that is not valid is
    refused with an error that names the field, and each value is validated
    exactly as `usercontext.UserContext.from_headers` validates the header of
    the same field. The other members of the header are not looked at.

    The context is returned as it was sent (same request id); bind a
    ``child()`` of it for work of this service's own.

    >>> from usercontext.otel import extract_baggage
    >>> headers = {"baggage": "usercontext.user_id=u-42,usercontext.thread_id=t-7,"
    ...                       "usercontext.run_id=r-1,tenant=acme"}
    >>> extract_baggage(headers, trusted=True).user_id
    'u-42'
    >>> extract_baggage({"baggage": "tenant=acme"}, trusted=True) is None
    True

    Args:
        carrier: Where to read the header from, such as a dict of incoming
            headers.
        trusted: Whether the sender may assert a user: `True` for a service
            of your own. `False` is refused.
        getter: How to read from *carrier*, as in OpenTelemetry's
            propagators.

    Returns:
        The context the members carry, or `None` if the header has no
        ``usercontext.*`` member.

    Raises:
        usercontext.exceptions.InvalidContextError: If a ``usercontext.*``
            member is unknown, repeated, missing or not valid; its ``field``
            names the field.
        ValueError: If *trusted* is `False`.
        TypeError: If *trusted* is not a bool.

    .. versionadded:: 0.1.0
    """
    if not isinstance(trusted, bool):
        msg = f"extract_baggage(trusted=...) takes True or False, got {trusted!r}."  # type: ignore[unreachable]
        raise TypeError(msg)
    if not trusted:
        msg = (
            "extract_baggage(trusted=False) refuses to read a context: the usercontext.* "
            "members of baggage assert who the user is, and only a trusted peer may do "
            "that. Drop them from untrusted clients' requests at the edge with "
            "usercontext.strip_context_headers(), and pass trusted=True only for requests "
            "from services of your own."
        )
        raise ValueError(msg)
    values: object = getter.get(carrier, "baggage")
    # Getters return a list of the header's values; a str is one value.
    found = _collect([values] if isinstance(values, str) else cast("Iterable[str]", values or ()))
    if not found:
        return None
    for field in _REQUIRED:
        if field not in found:
            raise _refused(
                field,
                None,
                "it is missing",
                "Send the members inject_baggage() writes: "
                f"{', '.join(BAGGAGE_PREFIX + f for f in _REQUIRED)} at least.",
            )
    headers = [
        (
            HEADER_PREFIX + field.replace("_", "-"),
            quote(value, safe="") if field in _ID_SET else value,
        )
        for field, value in found.items()
    ]
    try:
        return UserContext.from_headers(headers)
    except InvalidContextError as e:
        # "metadata['plan']" and "metadata key" are errors of the metadata member.
        field = e.field.partition("[")[0].partition(" ")[0]
        raise InvalidContextError(
            f"Cannot read the context from baggage member {BAGGAGE_PREFIX}{field}: {e}",
            field=e.field,
            value=e.value,
            reason=e.reason,
        ) from e

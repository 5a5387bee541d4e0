"""
Signed context headers: `HeaderSigner` adds an HMAC-SHA256 signature to the
``x-usercontext-*`` headers of a context, and `HeaderVerifier` refuses headers
whose signature is missing, wrong, made with an unknown key, or out of date.

A context in headers is a claim ("this work runs for user u-42"); the
signature says that a peer holding a shared key made the claim, and not long
ago. The value of the ``x-usercontext-signature`` header reads::

    v1;kid=<key id>;iat=<ms>;exp=<ms>;sig=<64 lower-case hex digits>

The MAC covers a canonical text, one line per part (each ending in ``\n``):
the version, the key id, the issue and expiry times in epoch milliseconds,
then ``name:value`` for every other ``x-usercontext-*`` header, sorted by
name. Changing, adding or removing any header breaks it. The names are the
codec's own (no ``:`` or newline), key ids and times hold neither, and the
verifier refuses a value holding a newline, so no two inputs share a text.

`_codec` calls `HeaderSigner._sign` and `HeaderVerifier._verify` without
importing this module, so that `import usercontext` pays for `hmac` and
`hashlib` only when signing is used.
"""

from __future__ import annotations

import hmac
import math
import re
import time

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from ._codec import HEADER_PREFIX, SIGNATURE_HEADER
from ._messages import short_repr
from .exceptions import InvalidSignatureError


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["MIN_KEY_BYTES", "HeaderSigner", "HeaderVerifier"]

MIN_KEY_BYTES = 32
"""
The shortest key accepted: 256 bits, the output size of SHA-256 (RFC 2104,
section 3, advises keys no shorter than the hash's output).
"""
_VERSION = "v1"
_DIGEST = "sha256"
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Digits without sign, spaces or leading zeros, and no more of them than an
# epoch in milliseconds needs for the next 300,000 years: int() of any of
# them is exact and cheap.
_SIGNATURE = re.compile(
    r"v1;kid=([A-Za-z0-9._-]{1,64});iat=(0|[1-9][0-9]{0,15});exp=(0|[1-9][0-9]{0,15});"
    r"sig=([0-9a-f]{64})"
)
_DEFAULT_TTL = 60.0
_DEFAULT_LEEWAY = 5.0
_DEFAULT_MAX_TTL = 300.0
# The longest duration accepted: a signature valid for more than a year is a
# credential to rotate, not a claim about a request.
_MAX_SECONDS = 366 * 24 * 3600


def _canonical(key_id: str, issued: int, expires: int, headers: Mapping[str, str]) -> str:
    """
    Return the text the MAC covers (see the module's docstring).
    """
    return f"{_VERSION}\n{key_id}\n{issued}\n{expires}\n" + "".join(
        [f"{name}:{value}\n" for name, value in sorted(headers.items())]
    )


def _keyed(key: bytes) -> hmac.HMAC:
    # Copying a keyed HMAC skips hashing the key again: a fifth of each MAC.
    return hmac.new(key, digestmod=_DIGEST)


def _mac(keyed: hmac.HMAC, message: str) -> str:
    mac = keyed.copy()
    mac.update(message.encode("ascii"))
    return mac.hexdigest()


def _check_key_id(owner: str, key_id: object) -> str:
    if type(key_id) is not str:
        msg = f"{owner}: a key id must be a str, got {type(key_id).__name__}."
        raise TypeError(msg)
    if not _KEY_ID.fullmatch(key_id):
        msg = (
            f"{owner}: the key id {short_repr(key_id)} must be 1 to 64 letters, digits, "
            "'.', '_' or '-', such as '2026-12' or 'billing.1'."
        )
        raise ValueError(msg)
    return key_id


def _check_key(owner: str, key_id: str, key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        msg = (
            f"{owner}: the key of id {key_id!r} must be bytes, got {type(key).__name__}. "
            "Make one with secrets.token_bytes(32), and read a stored one with "
            "bytes.fromhex() or base64.b64decode()."
        )
        raise TypeError(msg)
    if len(key) < MIN_KEY_BYTES:
        msg = (
            f"{owner}: the key of id {key_id!r} is {len(key)} bytes long; it must be at least "
            f"{MIN_KEY_BYTES} random bytes. Make one with secrets.token_bytes(32)."
        )
        raise ValueError(msg)
    return bytes(key)


def _check_seconds(owner: str, name: str, value: object, *, zero: bool) -> int:
    """
    Return *value* seconds as whole milliseconds, rounded up.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{owner}({name}=...) must be a number of seconds, got {short_repr(value)}."
        raise TypeError(msg)
    if not ((value >= 0 if zero else value > 0) and value <= _MAX_SECONDS):
        bound = ">= 0" if zero else "> 0"
        msg = (
            f"{owner}({name}=...) must be a number of seconds {bound} and at most "
            f"{_MAX_SECONDS} (366 days), got {value!r}."
        )
        raise ValueError(msg)
    return math.ceil(value * 1000)


def _check_clock(owner: str, clock: object) -> Callable[[], float]:
    if not callable(clock):
        msg = (
            f"{owner}(clock=...) must be a callable returning epoch seconds, such as "
            f"time.time; got {short_repr(clock)}."
        )
        raise TypeError(msg)
    return cast("Callable[[], float]", clock)


def _refuse(reason: str, value: object, problem: str, fix: str) -> InvalidSignatureError:
    return InvalidSignatureError(
        f"Cannot trust the x-usercontext-* headers: {problem}. {fix}",
        field="signature",
        value=value,
        reason=reason,
    )


class HeaderSigner:
    """
    Sign the ``x-usercontext-*`` headers of a context with a key shared with
    the services that receive them.

    Give it to `usercontext.UserContext.to_headers` (or `usercontext.to_job`)
    as *signer*: the headers then carry ``x-usercontext-signature``, an
    HMAC-SHA256 over every header, the key id, and the time span in which the
    signature is valid. Receivers check it with a `HeaderVerifier` holding the
    same key under the same id.

    Args:
        key: At least 32 random bytes, such as ``secrets.token_bytes(32)``,
            shared with the receivers and kept secret.
        key_id: The key's name, sent with each signature so that receivers
            pick the right key while keys rotate: 1 to 64 letters, digits,
            ``.``, ``_`` or ``-``.
        ttl: How long a signature stays valid, in seconds: keep it short for a
            call between services, and longer than a job may wait in a queue.
        clock: The time in epoch seconds; ``time.time`` unless a test fakes it.

    Raises:
        TypeError: If *key* is not bytes, *key_id* not a str, *ttl* not a
            number or *clock* not callable.
        ValueError: If *key* is shorter than 32 bytes, *key_id* holds other
            characters, or *ttl* is not > 0 and at most 366 days.

    >>> import secrets, usercontext as uc
    >>> signer = uc.HeaderSigner(secrets.token_bytes(32), key_id="2026-12", ttl=30)
    >>> signer
    HeaderSigner(key_id='2026-12', ttl=30)

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_clock", "_key_id", "_keyed", "_ttl", "_ttl_ms")

    def __init__(
        self,
        key: bytes,
        *,
        key_id: str,
        ttl: float = _DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_id = _check_key_id("HeaderSigner(key_id=...)", key_id)
        self._keyed = _keyed(_check_key("HeaderSigner(key=...)", key_id, key))
        self._ttl_ms = _check_seconds("HeaderSigner", "ttl", ttl, zero=False)
        self._ttl = ttl
        self._clock = _check_clock("HeaderSigner", clock)

    def _sign(self, headers: Mapping[str, str]) -> str:
        """
        Return the value of ``x-usercontext-signature`` for *headers*, the
        other ``x-usercontext-*`` headers, with lower-case names.
        """
        issued = math.floor(self._clock() * 1000)
        expires = issued + self._ttl_ms
        sig = _mac(self._keyed, _canonical(self._key_id, issued, expires, headers))
        return f"{_VERSION};kid={self._key_id};iat={issued};exp={expires};sig={sig}"

    def __repr__(self) -> str:
        # Never the key.
        return f"HeaderSigner(key_id={self._key_id!r}, ttl={self._ttl!r})"


class HeaderVerifier:
    """
    Check the signature that a `HeaderSigner` added to ``x-usercontext-*``
    headers.

    Give it to `usercontext.UserContext.from_headers` (or
    `usercontext.bound_from_job`) as *verifier*: the headers are then refused
    with `usercontext.exceptions.InvalidSignatureError` unless they carry a
    signature made with one of *keys*, valid now, over exactly the headers
    received. Rotate a key by adding the new one here first, then signing with
    it, then removing the old one once no signature made with it is valid.

    Args:
        keys: Each key id with its key (at least 32 bytes): every key a
            trusted peer may sign with. Give each peer its own key, so that
            removing it here shuts that peer out alone.
        leeway: Seconds of clock difference between signer and verifier that
            are forgiven, both for the expiry and for an issue time in the
            future.
        max_ttl: The longest lifetime, in seconds, a signature may claim:
            one made with a longer *ttl* is refused, whatever its signer says.
        clock: The time in epoch seconds; ``time.time`` unless a test fakes it.

    Raises:
        TypeError: If *keys* is not a mapping, a key is not bytes or a key id
            not a str, a number is not a number, or *clock* is not callable.
        ValueError: If *keys* is empty, a key is shorter than 32 bytes, a key
            id holds other characters, *leeway* is not >= 0 or *max_ttl*
            not > 0, or either is over 366 days.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_clock", "_keys", "_leeway_ms", "_max_ttl_ms")

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        leeway: float = _DEFAULT_LEEWAY,
        max_ttl: float = _DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(keys, Mapping):
            msg = (  # type: ignore[unreachable]  # for callers whose code is not type-checked
                "HeaderVerifier(keys=...) must be a mapping of key ids to keys, such as "
                f"{{'2026-12': key}}; got {type(keys).__name__}."
            )
            raise TypeError(msg)
        if not keys:
            msg = (
                "HeaderVerifier(keys=...) is empty: give it the key of each trusted peer, "
                "by the key id its HeaderSigner uses."
            )
            raise ValueError(msg)
        checked: dict[str, hmac.HMAC] = {}
        for key_id, key in keys.items():
            _check_key_id("HeaderVerifier(keys=...)", key_id)
            checked[key_id] = _keyed(_check_key("HeaderVerifier(keys=...)", key_id, key))
        self._keys = checked
        self._leeway_ms = _check_seconds("HeaderVerifier", "leeway", leeway, zero=True)
        self._max_ttl_ms = _check_seconds("HeaderVerifier", "max_ttl", max_ttl, zero=False)
        self._clock = _check_clock("HeaderVerifier", clock)

    def _verify(self, headers: Mapping[str, str], signature: str | None) -> str:
        """
        Check *signature* against *headers*, the other ``x-usercontext-*``
        headers with lower-case names, and return the id of the key that
        signed them.

        Raises:
            InvalidSignatureError: If the signature does not hold.
        """
        if signature is None:
            raise _refuse(
                "missing",
                None,
                f"the {SIGNATURE_HEADER} header is missing",
                "Sign them where they are made, with to_headers(signer=HeaderSigner(...)), "
                "and make sure no proxy between the services drops that header.",
            )
        match = _SIGNATURE.fullmatch(signature)
        if match is None:
            raise _refuse(
                "malformed",
                signature,
                f"the {SIGNATURE_HEADER} header is not a v1 signature of usercontext "
                f"(v1;kid=...;iat=...;exp=...;sig=...); got {short_repr(signature)}",
                "Send the header to_headers(signer=...) makes, unchanged; a sender with a "
                "newer usercontext may sign in a format this one does not read.",
            )
        key_id, issued_text, expires_text, sig = match.groups()
        keyed = self._keys.get(key_id)
        if keyed is None:
            raise _refuse(
                "unknown key",
                signature,
                f"they are signed with key id {key_id!r}, which is not one of this "
                f"verifier's ({', '.join(map(repr, self._keys))})",
                "Add that peer's key to HeaderVerifier(keys=...) if it is trusted; while "
                "rotating, add the new key to every verifier before any signer uses it.",
            )
        issued, expires = int(issued_text), int(expires_text)
        message = _canonical(key_id, issued, expires, headers)
        # to_headers() makes ASCII values without newlines: any other value
        # cannot match, and a newline in one would blur where it ends.
        if not (
            message.isascii()
            and message.count("\n") == 4 + len(headers)
            and hmac.compare_digest(_mac(keyed, message), sig)
        ):
            raise _refuse(
                "mismatch",
                signature,
                f"the signature (key id {key_id!r}) does not match the headers received: "
                "a header was changed, added or removed after signing, or the signer "
                "holds another key under this id",
                f"Forward the {HEADER_PREFIX}* headers unchanged, and give signer and "
                "verifier the same key for each key id.",
            )
        self._check_time(signature, issued, expires)
        return key_id

    def _check_time(self, signature: str, issued: int, expires: int) -> None:
        now = math.floor(self._clock() * 1000)
        if expires - issued > self._max_ttl_ms:
            raise _refuse(
                "lifetime too long",
                signature,
                f"the signature claims a lifetime of {(expires - issued) / 1000:g} s, "
                f"more than this verifier's max_ttl of {self._max_ttl_ms / 1000:g} s",
                "Lower the signer's ttl, or raise HeaderVerifier(max_ttl=...) where long "
                "lifetimes are expected (jobs waiting in a queue).",
            )
        if now > expires + self._leeway_ms:
            raise _refuse(
                "expired",
                signature,
                f"the signature expired {(now - expires) / 1000:g} s ago (leeway "
                f"{self._leeway_ms / 1000:g} s)",
                "Sign the headers for each call rather than reusing them, raise the signer's "
                "ttl if they wait that long on purpose, and check both clocks.",
            )
        if issued > now + self._leeway_ms:
            raise _refuse(
                "not yet valid",
                signature,
                f"the signature is issued {(issued - now) / 1000:g} s in the future (leeway "
                f"{self._leeway_ms / 1000:g} s)",
                "Synchronise the clocks of signer and verifier (NTP), or raise "
                "HeaderVerifier(leeway=...).",
            )

    def __repr__(self) -> str:
        # The key ids only, never a key.
        return (
            f"HeaderVerifier(key_ids={tuple(self._keys)!r}, leeway="
            f"{self._leeway_ms / 1000:g}, max_ttl={self._max_ttl_ms / 1000:g})"
        )

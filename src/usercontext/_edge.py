"""
The edge rule: a service facing untrusted clients drops what they send in the
library's own propagation formats before anything reads it.

A client can send ``x-usercontext-*`` headers, or ``usercontext.*`` members of
a W3C ``baggage`` header, claiming to be any user. Only a trusted peer (a
service of one's own, ideally with signed headers) may assert a context; at
the edge, those fields are removed. The ASGI and WSGI middlewares do it with
``strip_context_headers=True``; this module is the one place that knows what
to remove.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._codec import HEADER_PREFIX


if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


__all__ = ["BAGGAGE_PREFIX", "strip_baggage", "strip_context_headers", "strip_environ"]

BAGGAGE_PREFIX = "usercontext."
"""
The prefix of the library's members in a W3C ``baggage`` header.
"""

_HEADER_PREFIX = HEADER_PREFIX.encode("ascii")
_BAGGAGE = b"baggage"
# The same headers in a WSGI environ (PEP 3333: CGI names, HTTP_ and upper case).
_ENVIRON_PREFIX = "HTTP_" + HEADER_PREFIX.upper().replace("-", "_")
_ENVIRON_BAGGAGE = "HTTP_BAGGAGE"


def strip_baggage(value: str) -> str:
    """
    Return the W3C ``baggage`` header *value* without its ``usercontext.*``
    members; every other member is kept as it was, in order.

    >>> strip_baggage("usercontext.user_id=u-1,tenant=acme;prop=1")
    'tenant=acme;prop=1'
    >>> strip_baggage(" UserContext.user_id = u-1 ")
    ''
    """
    kept = [
        member
        for member in value.split(",")
        if member.strip()
        and not member.partition("=")[0].strip().lower().startswith(BAGGAGE_PREFIX)
    ]
    return ",".join(m.strip() for m in kept)


def strip_context_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    Return the ASGI *headers* (lower-case names, as ASGI servers give them)
    without any ``x-usercontext-*`` header, and with the ``usercontext.*``
    members removed from every ``baggage`` header (which is dropped if
    nothing is left of it).

    Use it where untrusted clients reach the service, so that no client can
    assert a user through the headers that carry a context between services.

    >>> strip_context_headers([
    ...     (b"x-usercontext-user-id", b"u-1"),
    ...     (b"baggage", b"usercontext.user_id=u-1,tenant=acme"),
    ...     (b"accept", b"*/*"),
    ... ])
    [(b'baggage', b'tenant=acme'), (b'accept', b'*/*')]

    .. versionadded:: 0.1.0
    """
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered.startswith(_HEADER_PREFIX):
            continue
        if lowered == _BAGGAGE:
            kept = strip_baggage(value.decode("latin-1"))
            if not kept:
                continue
            value = kept.encode("latin-1")  # noqa: PLW2901  # the member list, rebuilt
        out.append((name, value))
    return out


def strip_environ(environ: Mapping[str, Any]) -> dict[str, Any]:
    """
    Return a copy of the WSGI *environ* without any ``x-usercontext-*``
    header (its ``HTTP_X_USERCONTEXT_*`` keys), and with the ``usercontext.*``
    members removed from its ``baggage`` header (``HTTP_BAGGAGE``, dropped
    if nothing is left of it). *environ* itself is left as it was.

    >>> strip_environ({
    ...     "PATH_INFO": "/",
    ...     "HTTP_X_USERCONTEXT_USER_ID": "u-1",
    ...     "HTTP_BAGGAGE": "usercontext.user_id=u-1,tenant=acme",
    ... })
    {'PATH_INFO': '/', 'HTTP_BAGGAGE': 'tenant=acme'}
    """
    out = {key: value for key, value in environ.items() if not key.startswith(_ENVIRON_PREFIX)}
    baggage = out.get(_ENVIRON_BAGGAGE)
    if type(baggage) is str:
        kept = strip_baggage(baggage)
        if kept:
            out[_ENVIRON_BAGGAGE] = kept
        else:
            del out[_ENVIRON_BAGGAGE]
    return out

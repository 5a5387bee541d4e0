"""
Refusals: the errors a resolver (or an engine's admission policy) raises to
answer a request with an HTTP error, and the checks of the headers they carry.

Public through `usercontext.exceptions`; here so that no module of the
package grows past what one reader holds in mind.
"""

from __future__ import annotations

import math
import typing

from typing import Any

from ._error_base import UserContextError


if typing.TYPE_CHECKING:
    from collections.abc import Mapping


# The builtin, under a name that RequestRefusedError's *type* argument does not hide.
_type = type

# A header name is an HTTP token (RFC 9110, section 5.1); a value holds visible
# characters, spaces, tabs and obs-text, never CR, LF, NUL or another control
# character, which would end the header early or smuggle another one in.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_header(where: str, name: object, value: object) -> None:
    """
    Refuse a header that cannot be sent as it is: *where* names the argument.
    """
    if type(name) is not str or not name or not set(name) <= _TOKEN:
        msg = (
            f"{where} has an invalid header name {name!r}: a header name is a non-empty str "
            "of letters, digits and !#$%&'*+-.^_`|~, such as 'WWW-Authenticate'."
        )
        raise ValueError(msg)
    if type(value) is not str:
        msg = f"{where}: the value of header {name!r} must be a str, got {type(value).__name__}."
        raise TypeError(msg)
    for i, ch in enumerate(value):
        code = ord(ch)
        if (code < 0x20 and ch != "\t") or code == 0x7F or code > 0xFF:  # noqa: PLR2004  # the bounds of a header value
            msg = (
                f"{where}: the value of header {name!r} holds {ch!r} at index {i}, which a "
                "header cannot carry (CR and LF would end it early). Remove control "
                "characters, and encode characters beyond Latin-1, for example with "
                "RFC 8187's filename*=UTF-8''... form."
            )
            raise ValueError(msg)


class RequestRefusedError(UserContextError):
    """
    A resolver refuses the request: the client gets *status* and a problem
    document (RFC 9457, ``application/problem+json``).

    Raise it, or one of its subclasses (`UnauthenticatedError`, `ForbiddenError`,
    `TooManyRequestsError`, `ServiceUnavailableError`), from the resolver given to
    `usercontext.asgi.UserContextMiddleware`. The body is ``{"type": ...,
    "title": ..., "status": ..., "detail": ..., "error": ..., "request_id":
    ...}``, with ``"retry_after"`` when *retry_after* is given. Keep *detail*
    free of secrets: the client reads it.

    Args:
        detail: What happened, for the client: the body's ``detail``.
        status: The HTTP status, from 400 to 599.
        title: A short summary of the kind of problem; by default the
            status's reason phrase (``"Forbidden"``).
        type: A URI naming the kind of problem; ``"about:blank"`` (the
            default) means the status says it all.
        error: A short machine-readable code, the body's ``error``; by default
            the status's name in snake case (``"forbidden"``).
        headers: Headers of the response, such as ``{"WWW-Authenticate":
            "Bearer"}``.
        retry_after: Seconds after which the client may retry: sent as the
            ``Retry-After`` header and the body's ``retry_after``, rounded up
            to a whole second, at least 1.

    Raises:
        ValueError: If *status* is not from 400 to 599, if a header name is
            not a token or a header value holds CR, LF or another control
            character, or if *retry_after* is not a finite number > 0.
        TypeError: If an argument has the wrong type.

    .. versionadded:: 0.1.0
    """

    status: int
    title: str
    type: str
    error: str
    headers: dict[str, str]
    retry_after: int | None

    def __init__(  # noqa: PLR0913  # every member of a problem document
        self,
        detail: str,
        *,
        status: int,
        title: str | None = None,
        type: str = "about:blank",  # noqa: A002  # the member's name in RFC 9457
        error: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        owner = _type(self).__name__
        if _type(detail) is not str:
            msg = f"{owner}(detail=...) must be a str, got {_type(detail).__name__}."
            raise TypeError(msg)
        if _type(status) is not int or not 400 <= status <= 599:  # noqa: PLR2004  # error statuses
            msg = f"{owner}(status=...) must be an int from 400 to 599, got {status!r}."
            raise ValueError(msg)
        for name, value in (("title", title), ("type", type), ("error", error)):
            if value is not None and (_type(value) is not str or not value):
                msg = f"{owner}({name}=...) must be a non-empty str, got {value!r}."
                raise TypeError(msg)
        super().__init__(detail)
        self.status = status
        phrase = _phrase(status)
        self.title = title or phrase[0]
        self.type = type
        self.error = error or phrase[1]
        checked: dict[str, str] = {}
        for name, value in (headers or {}).items():
            _check_header(f"{owner}(headers=...)", name, value)
            checked[name] = value
        self.retry_after = None
        if retry_after is not None:
            if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)):
                msg = f"{owner}(retry_after=...) must be a number of seconds, got {retry_after!r}."
                raise TypeError(msg)
            if not 0 < retry_after < float("inf"):
                msg = (
                    f"{owner}(retry_after=...) must be a finite number of seconds > 0, "
                    f"got {retry_after!r}."
                )
                raise ValueError(msg)
            self.retry_after = max(1, math.ceil(retry_after))
            checked["Retry-After"] = str(self.retry_after)
        self.headers = checked

    @property
    def detail(self) -> str:
        """
        What happened, for the client.
        """
        return str(self.args[0])


def _phrase(status: int) -> tuple[str, str]:
    """
    Return the reason phrase of *status* and its name in snake case.
    """
    from http import HTTPStatus  # only when a request is refused

    try:
        known = HTTPStatus(status)
    except ValueError:
        return "Error", "error"
    return known.phrase, known.name.lower()


class UnauthenticatedError(RequestRefusedError, PermissionError):
    """
    A resolver could not tell who is calling: no credentials, or bad ones.

    Raise it from the resolver given to `usercontext.asgi.UserContextMiddleware`
    to answer ``401`` with a problem document holding its message (see
    `RequestRefusedError`; its ``error`` is ``"unauthenticated"``). Keep the message
    free of secrets: the client reads it.

    Args:
        message: What the client should fix, such as ``"Send a bearer token."``.
        challenge: The ``WWW-Authenticate`` header of the 401 response.
        kwargs: *title*, *type*, *error* and *headers*, as for `RequestRefusedError`.

    Raises:
        ValueError: If *challenge* holds CR, LF or another character a header
            cannot carry.

    .. versionadded:: 0.1.0
    """

    challenge: str

    def __init__(
        self,
        message: str = "Authentication is required.",
        *,
        challenge: str = "Bearer",
        **kwargs: Any,
    ) -> None:
        _check_header("UnauthenticatedError(challenge=...)", "WWW-Authenticate", challenge)
        extra: Mapping[str, str] = kwargs.pop("headers", None) or {}
        headers = {"WWW-Authenticate": challenge, **extra}
        kwargs.setdefault("error", "unauthenticated")
        super().__init__(message, status=401, headers=headers, **kwargs)
        self.challenge = challenge


class ForbiddenError(RequestRefusedError, PermissionError):
    """
    A resolver knows who is calling, and refuses them: the client gets ``403``.

    Args:
        detail: Why, for the client.
        kwargs: *title*, *type*, *error* and *headers*, as for `RequestRefusedError`.

    .. versionadded:: 0.1.0
    """

    def __init__(self, detail: str = "You may not do this.", **kwargs: Any) -> None:
        super().__init__(detail, status=403, **kwargs)


class TooManyRequestsError(RequestRefusedError, RuntimeError):
    """
    The caller sent too many requests: the client gets ``429``, with a
    ``Retry-After`` header when *retry_after* is given.

    Args:
        detail: What to do, for the client.
        retry_after: Seconds after which the client may retry.
        kwargs: *title*, *type*, *error* and *headers*, as for `RequestRefusedError`.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        detail: str = "Too many requests: slow down.",
        *,
        retry_after: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(detail, status=429, retry_after=retry_after, **kwargs)


class ServiceUnavailableError(RequestRefusedError, RuntimeError):
    """
    The service cannot serve the request now (a dependency of the resolver is
    down, the service is shutting down): the client gets ``503``, with a
    ``Retry-After`` header when *retry_after* is given.

    Args:
        detail: What happened, for the client.
        retry_after: Seconds after which the client may retry.
        kwargs: *title*, *type*, *error* and *headers*, as for `RequestRefusedError`.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        detail: str = "The service is unavailable. Retry shortly.",
        *,
        retry_after: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(detail, status=503, retry_after=retry_after, **kwargs)


class RateLimitedError(TooManyRequestsError):
    """
    A user went over its rate limit (`usercontext.LocalRateLimiter`): ``429``. Args are attributes.

    Args:
        key: The key (usually a user id) that was limited.
        rate: The limit's sustained rate, in requests per second.
        burst: How many requests the limit admits at once.
        wait: Seconds until a request of *key* would pass (exact; *retry_after* rounds it up).

    .. versionadded:: 0.1.0
    """

    key: str
    rate: float
    burst: int
    wait: float

    def __init__(self, key: str, *, rate: float, burst: int, wait: float) -> None:
        super().__init__(
            f"Too many requests for user {key!r}: the limit is {rate:g} per second with "
            f"bursts of {burst}. Retry after {wait:.3f} s.",
            retry_after=max(wait, 1e-6),
            error="rate_limited",
        )
        self.key, self.rate, self.burst, self.wait = key, rate, burst, wait


_SHED = {
    "user_queue": (429, "user_queue_full", "User {key!r} already has {waiting} requests waiting"),
    "queue": (503, "queue_full", "The service has {waiting} requests waiting"),
    "deadline": (503, "deadline_unreachable", "The expected wait of {expected:.3f} s is too long"),
}


class LoadShedError(RequestRefusedError, RuntimeError):
    """
    A request was refused at once instead of queueing for an engine (`usercontext.Shed`): ``429``
    when its user's queue is full (*reason* ``"user_queue"``), else ``503`` (``"queue"``: the
    service's is; ``"deadline"``: the wait is too long). Arguments are kept as attributes.

    Args:
        key: The key (usually a user id) that was refused.
        reason: ``"user_queue"``, ``"queue"`` or ``"deadline"``.
        waiting: Requests waiting ahead (of the user, or in all).
        expected_wait: The wait the policy expected, in seconds (0 when not estimated).
        retry_after: Seconds after which the client may retry (``Retry-After``).

    .. versionadded:: 0.1.0
    """

    key: str
    reason: str
    waiting: int
    expected_wait: float

    def __init__(
        self, key: str, *, reason: str, waiting: int, expected_wait: float, retry_after: float
    ) -> None:
        if reason not in _SHED:
            msg = f"LoadShedError(reason=...) must be one of {sorted(_SHED)}, got {reason!r}."
            raise ValueError(msg)
        status, error, what = _SHED[reason]
        what = what.format(key=key, waiting=waiting, expected=expected_wait)
        detail = f"{what} for an engine: this request was refused rather than queued. Retry later."
        super().__init__(detail, status=status, error=error, retry_after=retry_after)
        self.key, self.reason = key, reason
        self.waiting, self.expected_wait = waiting, expected_wait


class CircuitOpenError(ServiceUnavailableError):
    """
    Creating engines failed too often (`usercontext.CircuitBreaker`): refused at once, without
    calling *create*, until a probe after a cool-down succeeds (``503``). Args are attributes.

    Args:
        engine: The name of the engine type (the factory's *create*).
        key: The user whose breaker is open, or `None` for the factory's.
        failures: The failures that opened it.
        within: The window, in seconds, they happened in.
        retry_after: Seconds until the breaker lets a probe through.

    .. versionadded:: 0.1.0
    """

    engine: str
    key: str | None
    failures: int
    within: float

    def __init__(
        self, engine: str, *, key: str | None, failures: int, within: float, retry_after: float
    ) -> None:
        super().__init__(
            f"Creating {engine} engines{'' if key is None else f' for user {key!r}'} failed "
            f"{failures} times within {within:g} s: the circuit breaker is open, retry later.",
            retry_after=max(retry_after, 1e-6),
            error="circuit_open",
        )
        self.engine, self.key, self.failures, self.within = engine, key, failures, within

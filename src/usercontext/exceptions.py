"""
Public exceptions of usercontext.

Every exception derives from `UserContextError` and from the builtin that fits,
so ``except LookupError`` or ``except ValueError`` keep working.
"""

from __future__ import annotations

import math
import typing

from typing import Any, ClassVar


if typing.TYPE_CHECKING:
    from collections.abc import Mapping


__all__ = [
    "BackendUnavailableError",
    "CircuitOpenError",
    "CloseTimeoutError",
    "ConfigurationError",
    "EmitterClosedError",
    "EmitterFullError",
    "EmitterTimeoutError",
    "EngineDeadlineError",
    "FactoryClosedError",
    "ForbiddenError",
    "InvalidContextError",
    "InvalidSignatureError",
    "IsolationError",
    "LeaseLostError",
    "LeaseReleasedError",
    "LoadShedError",
    "NoContextError",
    "QuotaError",
    "QuotaExceededError",
    "QuotaTimeoutError",
    "RateLimitedError",
    "RequestRefusedError",
    "ScopeClosedError",
    "ServiceUnavailableError",
    "SinkClosedError",
    "TooManyRequestsError",
    "UnauthenticatedError",
    "UserContextError",
]


def _portable(value: object) -> object:
    """
    Return *value* if it pickles, else a string that says what it was.

    An error must reach the process that waits for it even when it carries an
    offending value that cannot travel (a lock, a mappingproxy): losing that
    one value beats losing the whole error to a pickling failure.
    """
    import pickle  # only when an error is pickled: it costs `import usercontext` 6 ms

    try:
        pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:  # pickling fails with many types, all meaning "cannot"
        return f"<a {type(value).__name__} that cannot be pickled>"
    return value


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """
    Recreate an error from its *args* and attributes, without calling ``__init__``.
    """
    # The __new__ that cls(*args) would run: the one of the base CPython lays
    # the instance out from (OSError's for TimeoutError subclasses), which
    # attribute lookup along the MRO does not always find first.
    base: Any = cls
    while "__new__" not in vars(base):
        base = base.__base__
    error = base.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class UserContextError(Exception):
    """
    Base class of every error raised by usercontext.

    Every subclass pickles with its message and attributes, so an error raised
    in a worker process reaches the process that waits for it intact.

    .. versionadded:: 0.1.0
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds with cls(*args), which fails for errors whose
        # __init__ takes keyword-only arguments (InvalidContextError): rebuild
        # from args and attributes instead, whatever __init__ takes.
        return (
            _rebuild,
            (
                type(self),
                tuple(_portable(a) for a in self.args),
                {k: _portable(v) for k, v in vars(self).items()},
            ),
        )


class NoContextError(UserContextError, LookupError):
    """
    Raised by `usercontext.current` when no `usercontext.UserContext` is bound.

    .. versionadded:: 0.1.0
    """


class InvalidContextError(UserContextError, ValueError):
    """
    A value given for a `usercontext.UserContext` field breaks a validation rule.

    Attributes:
        field: The name of the offending field (``"user_id"``, ``"metadata['plan']"``, ...).
        value: The offending value, as given.
        reason: A short description of the broken rule.

    .. versionadded:: 0.1.0
    """

    field: str
    value: object
    reason: str

    def __init__(self, message: str, *, field: str, value: object, reason: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.reason = reason


class InvalidSignatureError(InvalidContextError):
    """
    Signed context headers failed verification: the signature is missing,
    malformed, made with an unknown key, expired, not yet valid, or does not
    match the headers (one was changed, added or removed after signing).

    Raised by `usercontext.UserContext.from_headers` and
    `usercontext.bound_from_job` when given a *verifier*. Its *field* is
    ``"signature"``, its *reason* one of ``"missing"``, ``"malformed"``,
    ``"unknown key"``, ``"mismatch"``, ``"expired"``, ``"not yet valid"`` and
    ``"lifetime too long"``; the message says how to fix it. Answer it as an
    authentication failure: never fall back to the unsigned headers.

    .. versionadded:: 0.1.0
    """


class ConfigurationError(UserContextError, RuntimeError):
    """
    Work runs in a process configured differently from the one that sent it.

    `usercontext.ContextExecutor` raises it in a worker process whose
    `usercontext.configure` rules differ from those of the process that
    submitted the task: the worker would validate the context, and every
    context the task creates, by other rules. Configure the worker in the
    pool's initializer.

    .. versionadded:: 0.1.0
    """


class IsolationError(UserContextError, RuntimeError):
    """
    Code tried to cross from one user's context into another's.

    Raised when a child or evolved context would change the user, when a context of
    a different user is bound inside an active one, and (in later modules) when a
    resource of one user is touched under another user's context.

    .. versionadded:: 0.1.0
    """


def _arg_reader(index: int, name: str) -> property:
    """
    Return a read-only property that gives positional argument *index* of an
    error, under the name *name*.
    """

    def read(error: BaseException) -> Any:
        return error.args[index]

    read.__name__ = name
    return property(read, doc=f"The error's *{name}*: ``args[{index}]``.")


class _NamedArgsError(UserContextError):
    """
    An error built from positional arguments that read back as attributes.

    A subclass lists the names of its arguments in ``_arg_names``, in order,
    and annotates each name with its type; each becomes a read-only attribute
    over ``args``. Building one costs what building any exception costs (the
    message is made only when shown, from the attributes), and it pickles as
    its args.
    """

    _arg_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for index, name in enumerate(vars(cls).get("_arg_names", ())):
            setattr(cls, name, _arg_reader(index, name))


class QuotaError(_NamedArgsError):
    """
    Base class of the errors raised when a quota cannot grant a slot.

    It is raised with six positional arguments, each readable as an
    attribute: *key* (usually a user id), the *limit* reached, its *scope*
    (``"key"`` for the per-key limit, ``"total"`` for the global one), the
    slots *in_use* under it, how long the request *waited* in seconds (0 for
    a rejection), and the *timeout* it gave.

    .. versionadded:: 0.1.0
    """

    # Constructed positionally, as QuotaExceededError(key, limit, scope, in_use,
    # waited, timeout), and formatted only when shown: a busy service rejects
    # often, and most rejections become a 429 without ever printing one.
    _arg_names = ("key", "limit", "scope", "in_use", "waited", "timeout")
    args: tuple[str, int, str, int, float, float | None]
    key: str
    limit: int
    scope: str
    in_use: int
    waited: float
    timeout: float | None

    def _where(self) -> str:
        if self.scope == "key":
            return f"key {self.key!r} holds {self.in_use} of its {self.limit} slots"
        return f"all {self.limit} slots are in use (the total limit)"


class QuotaExceededError(QuotaError, RuntimeError):
    """
    The quota was full and the request was not allowed to wait (``timeout=0``
    or ``acquire_nowait``).

    .. versionadded:: 0.1.0
    """

    def __str__(self) -> str:
        return (
            f"No slot is free: {self._where()}. Retry later, pass a timeout > 0 to wait "
            "(None waits as long as it takes), or raise the limit."
        )


class QuotaTimeoutError(QuotaError, TimeoutError):
    """
    The quota stayed full for the whole timeout the request was willing to wait.

    .. versionadded:: 0.1.0
    """

    def __str__(self) -> str:
        return (
            f"Waited {self.waited:.3f} s (the timeout of {self.timeout} s) for a slot, but "
            f"{self._where()}. Raise the timeout or the limit, or make the work holding "
            "slots finish sooner."
        )


class LeaseReleasedError(UserContextError, RuntimeError):
    """
    A lease was handed back to its quota twice through `usercontext.Quota.arelease`.

    `usercontext.Lease.release` and leaving ``async with`` are idempotent; the
    raw call is strict, so double bookkeeping shows up instead of silently
    freeing someone else's slot.

    .. versionadded:: 0.1.0
    """


class LeaseLostError(UserContextError, RuntimeError):
    """
    A quota shared across processes found that a lease of this process had
    expired (its holder was paused or cut off past the lease's time to live),
    so its slot may have gone to someone else.

    The body holding the lease was cancelled when the loss was noticed, and
    this error is raised in its place. Retry the work under a new lease.

    .. versionadded:: 0.1.0
    """


class BackendUnavailableError(UserContextError, ConnectionError):
    """
    The server a quota or an event bus shares its state through (Redis) did
    not answer in time, and the failure policy is ``"fail_closed"``.

    The request was refused rather than admitted without the shared limits.
    Web adapters answer it with 503 and ``Retry-After``.

    .. versionadded:: 0.1.0
    """


class FactoryClosedError(UserContextError, RuntimeError):
    """
    The `usercontext.EngineFactory` was closed: it creates no more engines,
    and bodies still running when its close timeout ran out were cancelled.

    .. versionadded:: 0.1.0
    """


class EngineDeadlineError(UserContextError, TimeoutError):
    """
    The body using an engine ran past the factory's *deadline* and was cancelled.

    Only that body is cancelled; other engines and requests are untouched.

    .. versionadded:: 0.1.0
    """


class CloseTimeoutError(UserContextError, TimeoutError):
    """
    Closing an engine or resource took longer than its close timeout and was cut.

    .. versionadded:: 0.1.0
    """


class ScopeClosedError(UserContextError, RuntimeError):
    """
    A `usercontext.Scope` was asked for a resource before it was entered or
    after it was closed.

    .. versionadded:: 0.1.0
    """


class EmitterFullError(_NamedArgsError, RuntimeError):
    """
    An event did not fit in a sink's full buffer and could not be dropped.

    Raised at once under the ``error`` overflow policy, by
    `usercontext.Emitter.emit_nowait` under ``block``, and for a critical event
    when a buffer holds only critical events (which are never dropped).

    It is raised with six positional arguments, each readable as an attribute:
    the *user_id* of the stream, the buffer's *maxsize*, the *overflow* policy,
    whether the event was *critical*, how long the emit *waited* in seconds,
    and the *timeout* it gave.

    .. versionadded:: 0.1.0
    """

    _arg_names = ("user_id", "maxsize", "overflow", "critical", "waited", "timeout")
    args: tuple[str, int, str, bool, float, float | None]
    user_id: str
    maxsize: int
    overflow: str
    critical: bool
    waited: float
    timeout: float | None

    def __str__(self) -> str:
        what = "critical event" if self.critical else "event"
        if self.overflow in ("block", "error") or not self.critical:
            why = f"a sink's buffer holds its {self.maxsize} events"
        else:
            why = f"a sink's buffer holds {self.maxsize} critical events, which are never dropped"
        return (
            f"The {what} for user {self.user_id!r} does not fit: {why} (overflow="
            f"{self.overflow!r}). The sink is slower than the producer: use `await emit()` to "
            "wait for room, choose a drop policy, raise maxsize, or detach the slow sink."
        )


class EmitterTimeoutError(EmitterFullError, TimeoutError):
    """
    An emit waited for room in a full buffer for its whole timeout.

    .. versionadded:: 0.1.0
    """

    def __str__(self) -> str:
        return (
            f"Waited {self.waited:.3f} s (the timeout of {self.timeout} s) for room in a "
            f"buffer of user {self.user_id!r}, but its sink did not take events fast enough. "
            "Raise the timeout or maxsize, or find out why the sink is slow."
        )


class EmitterClosedError(UserContextError, RuntimeError):
    """
    The `usercontext.EmitterHub` was closed: it accepts no more events or sinks.

    .. versionadded:: 0.1.0
    """


class SinkClosedError(UserContextError, ConnectionError):
    """
    Raised by a sink's ``send`` when its connection is gone for good.

    The hub does not retry it: it detaches the sink at once and hands the
    undelivered events to its dead-letter hook.

    .. versionadded:: 0.1.0
    """


# The builtin, under a name that RequestRefusedError's *type* argument does not hide.
_type = type


# -- Refusals: errors a resolver raises to answer a request with an HTTP error.

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

"""
Public exceptions of usercontext.

Every exception derives from `UserContextError` and from the builtin that fits,
so ``except LookupError`` or ``except ValueError`` keep working.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ._error_base import UserContextError
from ._refusals import (
    CircuitOpenError,
    ForbiddenError,
    LoadShedError,
    RateLimitedError,
    RequestRefusedError,
    ServiceUnavailableError,
    TooManyRequestsError,
    UnauthenticatedError,
)


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


# The base and the refusals are defined in modules of their own; they are public here.
for _cls in (
    UserContextError,
    CircuitOpenError,
    ForbiddenError,
    LoadShedError,
    RateLimitedError,
    RequestRefusedError,
    ServiceUnavailableError,
    TooManyRequestsError,
    UnauthenticatedError,
):
    _cls.__module__ = __name__

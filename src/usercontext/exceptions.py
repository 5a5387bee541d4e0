"""
Public exceptions of usercontext.

Every exception derives from `UserContextError` and from the builtin that fits,
so ``except LookupError`` or ``except ValueError`` keep working.
"""

from __future__ import annotations


__all__ = [
    "CloseTimeoutError",
    "EngineDeadlineExceeded",
    "FactoryClosedError",
    "InvalidContextError",
    "IsolationError",
    "LeaseReleasedError",
    "NoContextError",
    "QuotaError",
    "QuotaExceeded",
    "QuotaTimeout",
    "ScopeClosedError",
    "UserContextError",
]


class UserContextError(Exception):
    """
    Base class of every error raised by usercontext.

    .. versionadded:: 0.1.0
    """


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


class IsolationError(UserContextError, RuntimeError):
    """
    Code tried to cross from one user's context into another's.

    Raised when a child or evolved context would change the user, when a context of
    a different user is bound inside an active one, and (in later modules) when a
    resource of one user is touched under another user's context.

    .. versionadded:: 0.1.0
    """


class QuotaError(UserContextError):
    """
    Base class of the errors raised when a quota cannot grant a slot.

    It is raised with six positional arguments, each readable as an
    attribute: *key* (usually a user id), the *limit* reached, its *scope*
    (``"key"`` for the per-key limit, ``"total"`` for the global one), the
    slots *in_use* under it, how long the request *waited* in seconds (0 for
    a rejection), and the *timeout* it gave.

    .. versionadded:: 0.1.0
    """

    # Constructed positionally, as QuotaExceeded(key, limit, scope, in_use,
    # waited, timeout): the arguments stay in args, read through properties,
    # and the message is built only when shown. A busy service rejects often,
    # and most rejections become a 429 without ever printing one.
    args: tuple[str, int, str, int, float, float | None]

    @property
    def key(self) -> str:
        """
        The key (usually a user id) that asked for a slot.
        """
        return self.args[0]

    @property
    def limit(self) -> int:
        """
        The limit that was reached.
        """
        return self.args[1]

    @property
    def scope(self) -> str:
        """
        ``"key"`` for the per-key limit, ``"total"`` for the global one.
        """
        return self.args[2]

    @property
    def in_use(self) -> int:
        """
        How many slots were in use under that limit.
        """
        return self.args[3]

    @property
    def waited(self) -> float:
        """
        How long the request waited, in seconds.
        """
        return self.args[4]

    @property
    def timeout(self) -> float | None:
        """
        The timeout the request gave, in seconds.
        """
        return self.args[5]

    def _where(self) -> str:
        if self.scope == "key":
            return f"key {self.key!r} holds {self.in_use} of its {self.limit} slots"
        return f"all {self.limit} slots are in use (the total limit)"


class QuotaExceeded(QuotaError, RuntimeError):  # noqa: N818  # the name says what happened
    """
    The quota was full and the request was not allowed to wait (``timeout=0``).

    .. versionadded:: 0.1.0
    """

    def __str__(self) -> str:
        return (
            f"No slot is free: {self._where()}. Retry later, pass a timeout > 0 to wait "
            "(None waits as long as it takes), or raise the limit."
        )


class QuotaTimeout(QuotaError, TimeoutError):  # noqa: N818  # the name says what happened
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
    A lease was handed back to its quota twice through `usercontext.Quota.release`.

    `usercontext.Lease.release` and leaving ``async with`` are idempotent; the
    raw call is strict, so double bookkeeping shows up instead of silently
    freeing someone else's slot.

    .. versionadded:: 0.1.0
    """


class FactoryClosedError(UserContextError, RuntimeError):
    """
    The `usercontext.EngineFactory` was closed: it creates no more engines,
    and bodies still running when its close timeout ran out were cancelled.

    .. versionadded:: 0.1.0
    """


class EngineDeadlineExceeded(UserContextError, TimeoutError):  # noqa: N818  # says what happened
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

"""
Public exceptions of usercontext.

Every exception derives from `UserContextError` and from the builtin that fits,
so ``except LookupError`` or ``except ValueError`` keep working.
"""

from __future__ import annotations


__all__ = [
    "InvalidContextError",
    "IsolationError",
    "NoContextError",
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

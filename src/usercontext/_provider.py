"""
What a `Registry` keeps for each key: the provider, its close hook, and the
count of resources it made; read by the scopes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._lifecycle import PLAIN, kind_of


if TYPE_CHECKING:
    from collections.abc import Callable, Hashable
    from types import CodeType

    from ._context import UserContext


def key_name(key: object) -> str:
    """
    Return how error messages and stats name *key*: its qualified name, or repr.
    """
    return getattr(key, "__qualname__", None) or repr(key)


def unknown(key: object) -> KeyError:
    """
    Return the error for *key*, for which nothing is registered.
    """
    msg = (
        f"Nothing is registered for {key_name(key)}. Register a provider first: "
        "registry.register(key, provider)."
    )
    return KeyError(msg)


class Counts:
    """
    The resources of one key created and closed so far, by every provider
    registered for it: counting in a slot of an object the scope holds anyway
    costs less than keeping a dict of open counts.
    """

    __slots__ = ("closed", "created", "key")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.created = 0
        self.closed = 0


class Provider:
    """
    What makes the resource of a key: *make* and its *close* hook, or, for an
    override, no *make* and a fixed *value*, with nothing to clean up.
    """

    # last is the type make last returned, with its kind; code is the code of
    # the async generator it last returned, and whether that can await. Each
    # is one tuple, so that threads never see half of an update.
    __slots__ = ("close", "code", "counts", "last", "make", "value")

    def __init__(
        self,
        make: Callable[[UserContext], Any] | None,
        close: Callable[[Any], object] | None,
        counts: Counts,
        value: object = None,
    ) -> None:
        self.make = make
        self.close = close
        self.counts = counts
        self.value = value
        self.last: tuple[type | None, str] = (None, PLAIN)
        self.code: tuple[CodeType | None, bool] = (None, True)

    def kind(self, result: object) -> str:
        """
        Return `kind_of` the type of *result*, and remember it: most providers
        return the same type every time, and a scope looks there first.
        """
        cls = type(result)
        kind = kind_of(cls)
        self.last = (cls, kind)
        return kind

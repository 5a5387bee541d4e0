"""
The idle pool of an `EngineFactory`: engines parked after use, handed out
again to the same user only, and given back for closing when they are too many
or too old.
"""

from __future__ import annotations

import time

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar


class Parkable(Protocol):
    """
    What the pool keeps: an engine of a user, stamped when it was parked.
    """

    user_id: str
    parked_at: float


M = TypeVar("M", bound=Parkable)


class IdlePool(Generic[M]):
    """
    Up to *per_user* idle engines per user and *most* over all users, each
    kept at most *ttl* seconds.

    The pool never closes anything: `park`, `take_stale` and `drain` hand back
    what leaves it, and the factory closes those.
    """

    __slots__ = ("_by_user", "_lru", "most", "per_user", "ttl")

    def __init__(self, per_user: int, most: int, ttl: float) -> None:
        self.per_user = per_user
        self.most = most
        self.ttl = ttl
        self._by_user: dict[str, list[M]] = {}
        # Every parked engine, oldest first: by id, as engines need not hash.
        self._lru: OrderedDict[int, M] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def has_room(self, user_id: str) -> bool:
        """
        Say whether one more engine of *user_id* may be parked.
        """
        stack = self._by_user.get(user_id)
        return stack is None or len(stack) < self.per_user

    def park(self, made: M) -> list[M]:
        """
        Park *made*, stamped now; return the oldest engines that no longer fit.
        """
        made.parked_at = time.monotonic()
        self._by_user.setdefault(made.user_id, []).append(made)
        self._lru[id(made)] = made
        evicted: list[M] = []
        while len(self._lru) > self.most:
            _, old = self._lru.popitem(last=False)
            self._forget(old)
            evicted.append(old)
        return evicted

    def take(self, user_id: str) -> M | None:
        """
        Take the engine of *user_id* parked last, or return `None`.
        """
        stack = self._by_user.get(user_id)
        if not stack:
            return None
        made = stack.pop()
        if not stack:
            del self._by_user[user_id]
        del self._lru[id(made)]
        return made

    def take_stale(self) -> list[M]:
        """
        Take the engines parked longer than the TTL ago.
        """
        stale = time.monotonic() - self.ttl
        taken: list[M] = []
        lru = self._lru
        while lru:
            made = next(iter(lru.values()))
            if made.parked_at > stale:
                break
            del lru[id(made)]
            self._forget(made)
            taken.append(made)
        return taken

    def drain(self) -> list[M]:
        """
        Take every engine, oldest first.
        """
        taken = list(self._lru.values())
        self._lru.clear()
        self._by_user.clear()
        return taken

    def _forget(self, made: M) -> None:
        stack = self._by_user[made.user_id]
        stack.remove(made)
        if not stack:
            del self._by_user[made.user_id]

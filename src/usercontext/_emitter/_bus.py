"""
`EventBus`: what an `EmitterHub` needs from a shared log of each user's events,
so that several processes and hosts serve one user's connections.

The bus is a dumb, ordered log per user: it numbers what is published, keeps the
last entries, and tells the hubs that follow a user what was added. Everything
else (dropping repeats, filling gaps, replay, the overflow policy) is the hub's,
the same for every backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


@runtime_checkable
class EventBus(Protocol):
    """
    A log of each user's events shared by several `EmitterHub` instances, in
    several processes or on several hosts: pass one to each hub as
    ``EmitterHub(bus=...)``. `usercontext.redis.RedisBus` is one; implement
    this protocol for another backend.

    For each user the bus keeps a *stream*: entries numbered 1, 2, 3, ... in
    the order they were published, the last ones held for replay, under a
    *stream id* (16 lowercase hex digits) that changes when the stream is
    started anew (after it expired, say). The hub gives it each event as an
    opaque str *payload*, and makes the events' ``seq`` and ``event_id`` from
    the entry's number and the stream id, so that they mean the same on every
    instance.

    The hub enters the bus with `start` and closes it with `aclose`; it calls
    `follow` when the first sink of a user attaches and `unfollow` when the last
    one goes. For the users it follows, the bus calls *notify* with each entry
    it hears of, in order per user, at least once as far as it can; a
    notification may be lost (the hub notices the gap at the next one, or at a
    position the bus reports at least every few seconds and after it
    reconnects) or repeated (the hub drops repeats by number). The hub reads
    what it missed with `read`.

    Every method but `unfollow` may raise
    `usercontext.exceptions.BackendUnavailableError` when the backend does not
    answer in time; `EmitterHub` passes it on to the caller of `Emitter.emit`
    and `EmitterHub.aattach`.

    .. versionadded:: 0.1.0
    """

    async def start(self, notify: Callable[[str, str, int, str | None], None]) -> None:
        """
        Start serving one hub, which *notify* tells of what its followed users'
        streams get: ``notify(user_id, stream_id, seq, payload)``, where
        *payload* is `None` for a position (the stream holds up to *seq*).
        """
        ...

    async def aclose(self) -> None:
        """
        Stop following every user, and release what `start` took.
        """
        ...

    async def publish(self, user_id: str, payload: str) -> tuple[str, int]:
        """
        Append *payload* to the stream of *user_id* (starting a stream if none
        is held), and return the stream id and the entry's number once the
        backend stored it.
        """
        ...

    async def follow(self, user_id: str) -> tuple[str, int]:
        """
        Start notifying the entries of *user_id*'s stream, and return the
        stream id and the number of its last entry (0 for none) once every
        entry after it will be notified. It starts a stream if none is held.
        """
        ...

    def unfollow(self, user_id: str) -> None:
        """
        Stop notifying the entries of *user_id*'s stream; it never waits, and
        calls of `follow` and `unfollow` take effect in the order they were
        made.
        """
        ...

    async def read(
        self, user_id: str, after: int, limit: int
    ) -> tuple[str, int, Sequence[tuple[int, str]]]:
        """
        Return the stream id of *user_id*'s stream, the number of its last
        entry, and at most *limit* of the held entries numbered above *after*,
        oldest first, as ``(seq, payload)`` pairs. It starts a stream if none
        is held.
        """
        ...

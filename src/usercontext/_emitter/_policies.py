"""
The hub's policies: how a full buffer is handled, how failing sends are
retried, and what is handed over when a sink is given up.
"""

from __future__ import annotations

import random

from typing import TYPE_CHECKING, Literal

import attrs

from usercontext import _checks


if TYPE_CHECKING:
    from typing import TypeAlias

    from ._event import Event
    from ._sinks import Sink

    Overflow: TypeAlias = Literal["block", "drop_oldest", "drop_newest", "error"]


_OVERFLOWS = ("block", "drop_oldest", "drop_newest", "error")


@attrs.frozen
class Retry:
    """
    How a failing send is retried before its sink is given up.

    A batch is tried up to *attempts* times. Each try may take at most
    *timeout* seconds (then it counts as failed), and the *n*-th retry waits
    ``backoff * 2 ** (n - 1)`` seconds, at most *max_backoff*; with *jitter*,
    a random 50-100% of that, so that many failing connections do not retry in
    step. When the last try fails, the sink is detached and its undelivered
    events go to the hub's dead-letter hook.

    Args:
        attempts: Tries per batch, the first included (1 means no retry).
        backoff: The wait before the first retry, in seconds.
        max_backoff: The longest wait between tries, in seconds.
        timeout: The longest a single send may take, in seconds, or `None`.
        jitter: Whether to randomise each wait.

    .. versionadded:: 0.1.0
    """

    attempts: int = 4
    backoff: float = 0.05
    max_backoff: float = 2.0
    timeout: float | None = 10.0
    jitter: bool = True

    def __attrs_post_init__(self) -> None:
        _checks.count("Retry.attempts", self.attempts, minimum=1)
        _checks.seconds("Retry.backoff", self.backoff, allow_none=False, zero_ok=True)
        _checks.seconds("Retry.max_backoff", self.max_backoff, allow_none=False, zero_ok=True)
        _checks.seconds("Retry.timeout", self.timeout, allow_none=True, zero_ok=False)
        jitter: object = self.jitter
        if jitter.__class__ is not bool:
            msg = f"Retry.jitter must be a bool, got {self.jitter!r}."
            raise TypeError(msg)

    def delay(self, retry: int) -> float:
        """
        Return the wait before the *retry*-th retry (1 for the first), in seconds.
        """
        # The exponent is capped: 2.0 ** 1024 overflows, and 2 ** 64 backoffs
        # exceed any max_backoff already.
        base: float = min(self.max_backoff, self.backoff * 2.0 ** min(retry - 1, 64))
        return base * random.uniform(0.5, 1.0) if self.jitter else base  # noqa: S311  # not crypto


@attrs.frozen
class DeadLetter:
    """
    Events that could not be delivered to a sink, handed to the hub's
    *on_dead_letter* hook (or logged as a warning when there is none).

    Attributes:
        user_id: The user the events belong to.
        sink: The sink they were meant for; it is detached.
        events: The undelivered events, in order: the batch being sent, then
            the ones queued behind it (never a hub's `EVENTS_MISSED` notice).
        reason: ``"failed"`` when every retry failed, ``"sink_closed"`` when
            the sink said it is closed for good, ``"hub_closed"`` when the hub's
            drain deadline passed first.
        error: The last error, if any.

    .. versionadded:: 0.1.0
    """

    user_id: str
    sink: Sink
    events: tuple[Event, ...]
    reason: Literal["failed", "sink_closed", "hub_closed"]
    error: BaseException | None

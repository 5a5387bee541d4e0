"""
What the emitter tests share: an event type, sinks that stall or fail on
purpose, a history of events, and small waits on the hub's state.
"""

from __future__ import annotations

import anyio

from usercontext.testing import RecordingSink

from helpers import until  # noqa: F401  # re-exported: the tests of this folder import it from here


TYPE = "tool_executing"


class GateSink:
    """
    Records batches; while *gate* is not set, each send waits for it.
    """

    def __init__(self, user_id="u-42"):
        self.user_id = user_id
        self.gate = anyio.Event()
        self.events = []
        self.calls = 0
        self.started = anyio.Event()

    async def send(self, events):
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        self.events.extend(events)


class FlakySink(RecordingSink):
    """
    Fails its first *failures* sends with *error*, then records.
    """

    def __init__(self, failures, error=None):
        super().__init__()
        self.failures = failures
        self.error = error or OSError("connection reset")
        self.attempts = 0

    async def send(self, events):
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        await super().send(events)


def pending_events(hub):
    """
    Return the events pending for the sinks of *hub* it reports.
    """
    return sum(s.pending for s in hub.stats().top)


def emit_history(hub, ctx, n):
    """
    Emit *n* events for *ctx*'s user, each with its index as data, and return
    them.
    """
    emitter = hub.emitter(ctx)
    return [emitter.emit_nowait(TYPE, {"i": i}) for i in range(n)]

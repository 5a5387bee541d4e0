"""
Per-user event streams: `Event`, `Emitter`, `EmitterHub` and the sinks.

Each user has one stream: a sequence counter, a bounded replay history and the
sinks attached to it (one per open connection). Every sink has its own bounded
queue and its own delivery task, so a slow connection delays nobody else; on
asyncio, sinks that cannot block (a `CallbackSink` of a plain function) are
called once per loop turn instead, their task only retrying and draining.

The modules, in the order they build on each other: ``_event`` (an event and
its JSON), ``_sinks``, ``_policies`` (overflow, retry, dead letters),
``_state`` (a user's stream, an attached sink, the `Attachment`), ``_stats``,
``_streams`` (the table of streams and idle users), ``_overflow`` (what a full
buffer does to an emit), ``_emit`` (the hot path), ``_delivery`` (a sink's
delivery task) and ``_hub``.
"""

from __future__ import annotations

from ._bus import EventBus
from ._emit import Emitter
from ._event import (
    AGENT_COMPLETED,
    AGENT_ERROR,
    AGENT_STARTED,
    AGENT_THINKING,
    EVENTS_MISSED,
    TOOL_COMPLETED,
    TOOL_EXECUTING,
    Event,
)
from ._hub import EmitterHub
from ._policies import DeadLetter, Retry
from ._sinks import CallbackSink, Sink
from ._state import Attachment
from ._stats import EmitterStats, SinkStats


__all__ = [
    "AGENT_COMPLETED",
    "AGENT_ERROR",
    "AGENT_STARTED",
    "AGENT_THINKING",
    "EVENTS_MISSED",
    "TOOL_COMPLETED",
    "TOOL_EXECUTING",
    "Attachment",
    "CallbackSink",
    "DeadLetter",
    "Emitter",
    "EmitterHub",
    "EmitterStats",
    "Event",
    "EventBus",
    "Retry",
    "Sink",
    "SinkStats",
]

"""
Per-request isolation for multi-user Python services.

Everything public is importable from here; the ``_``-modules may change.
"""

from __future__ import annotations

from ._context import DEFAULT_PLACEHOLDERS, IdRules, UserContext, configure
from ._current import (
    ContextExecutor,
    bind,
    current,
    current_or_none,
    isolated,
    to_thread,
    wrap,
)
from ._emitter import (
    AGENT_COMPLETED,
    AGENT_ERROR,
    AGENT_STARTED,
    AGENT_THINKING,
    EVENTS_MISSED,
    TOOL_COMPLETED,
    TOOL_EXECUTING,
    Attachment,
    CallbackSink,
    DeadLetter,
    Emitter,
    EmitterHub,
    EmitterStats,
    Event,
    RecordingSink,
    Retry,
    Sink,
    SinkStats,
)
from ._factory import EngineFactory, FactoryStats
from ._quota import Lease, LocalQuota, Quota, QuotaStats, ThreadQuota
from ._registry import Registry, RegistryStats, Scope
from .exceptions import (
    CloseTimeoutError,
    ConfigurationError,
    EmitterClosedError,
    EmitterFullError,
    EmitterTimeout,
    EngineDeadlineExceeded,
    FactoryClosedError,
    Forbidden,
    InvalidContextError,
    IsolationError,
    LeaseReleasedError,
    NoContextError,
    QuotaError,
    QuotaExceeded,
    QuotaTimeout,
    RequestRefused,
    ScopeClosedError,
    ServiceUnavailable,
    SinkClosedError,
    TooManyRequests,
    Unauthenticated,
    UserContextError,
)


__all__ = [
    "AGENT_COMPLETED",
    "AGENT_ERROR",
    "AGENT_STARTED",
    "AGENT_THINKING",
    "DEFAULT_PLACEHOLDERS",
    "EVENTS_MISSED",
    "TOOL_COMPLETED",
    "TOOL_EXECUTING",
    "Attachment",
    "CallbackSink",
    "CloseTimeoutError",
    "ConfigurationError",
    "ContextExecutor",
    "DeadLetter",
    "Emitter",
    "EmitterClosedError",
    "EmitterFullError",
    "EmitterHub",
    "EmitterStats",
    "EmitterTimeout",
    "EngineDeadlineExceeded",
    "EngineFactory",
    "Event",
    "FactoryClosedError",
    "FactoryStats",
    "Forbidden",
    "IdRules",
    "InvalidContextError",
    "IsolationError",
    "Lease",
    "LeaseReleasedError",
    "LocalQuota",
    "NoContextError",
    "Quota",
    "QuotaError",
    "QuotaExceeded",
    "QuotaStats",
    "QuotaTimeout",
    "RecordingSink",
    "Registry",
    "RegistryStats",
    "RequestRefused",
    "Retry",
    "Scope",
    "ScopeClosedError",
    "ServiceUnavailable",
    "Sink",
    "SinkClosedError",
    "SinkStats",
    "ThreadQuota",
    "TooManyRequests",
    "Unauthenticated",
    "UserContext",
    "UserContextError",
    "bind",
    "configure",
    "current",
    "current_or_none",
    "isolated",
    "to_thread",
    "wrap",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("usercontext")

    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)

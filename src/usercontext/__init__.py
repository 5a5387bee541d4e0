"""
Per-request isolation for multi-user Python services.

Everything public is importable from here; the ``_``-modules may change.
"""

from __future__ import annotations

from ._attach import AttachToken, attach, detach
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
    EventBus,
    Retry,
    Sink,
    SinkStats,
)
from ._engine_use import EngineUse
from ._factory import EngineFactory, FactoryStats
from ._job import bound_from_job, child_from_job, to_job
from ._local_quota import LocalQuota, ThreadQuota
from ._quota import Lease, Quota, QuotaStats
from ._registry import Registry, RegistryStats
from ._scope import Scope
from .exceptions import (
    BackendUnavailableError,
    CloseTimeoutError,
    ConfigurationError,
    EmitterClosedError,
    EmitterFullError,
    EmitterTimeoutError,
    EngineDeadlineError,
    FactoryClosedError,
    ForbiddenError,
    InvalidContextError,
    IsolationError,
    LeaseLostError,
    LeaseReleasedError,
    NoContextError,
    QuotaError,
    QuotaExceededError,
    QuotaTimeoutError,
    RequestRefusedError,
    ScopeClosedError,
    ServiceUnavailableError,
    SinkClosedError,
    TooManyRequestsError,
    UnauthenticatedError,
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
    "AttachToken",
    "Attachment",
    "BackendUnavailableError",
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
    "EmitterTimeoutError",
    "EngineDeadlineError",
    "EngineFactory",
    "EngineUse",
    "Event",
    "EventBus",
    "FactoryClosedError",
    "FactoryStats",
    "ForbiddenError",
    "IdRules",
    "InvalidContextError",
    "IsolationError",
    "Lease",
    "LeaseLostError",
    "LeaseReleasedError",
    "LocalQuota",
    "NoContextError",
    "Quota",
    "QuotaError",
    "QuotaExceededError",
    "QuotaStats",
    "QuotaTimeoutError",
    "Registry",
    "RegistryStats",
    "RequestRefusedError",
    "Retry",
    "Scope",
    "ScopeClosedError",
    "ServiceUnavailableError",
    "Sink",
    "SinkClosedError",
    "SinkStats",
    "ThreadQuota",
    "TooManyRequestsError",
    "UnauthenticatedError",
    "UserContext",
    "UserContextError",
    "attach",
    "bind",
    "bound_from_job",
    "child_from_job",
    "configure",
    "current",
    "current_or_none",
    "detach",
    "isolated",
    "to_job",
    "to_thread",
    "wrap",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("usercontext")

    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)

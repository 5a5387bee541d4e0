"""
Per-request isolation for multi-user Python services.

Everything public is importable from here; the ``_``-modules may change.
"""

from __future__ import annotations

import importlib
import typing

from ._attach import AttachToken, attach, detach
from ._context import DEFAULT_PLACEHOLDERS, IdRules, UserContext, configure
from ._current import (
    bind,
    current,
    current_or_none,
    isolated,
    to_thread,
    wrap,
)
from ._edge import strip_context_headers
from ._job import bound_from_job, child_from_job, to_job
from .exceptions import (
    BackendUnavailableError,
    CircuitOpenError,
    CloseTimeoutError,
    ConfigurationError,
    EmitterClosedError,
    EmitterFullError,
    EmitterTimeoutError,
    EngineDeadlineError,
    FactoryClosedError,
    ForbiddenError,
    InvalidContextError,
    InvalidSignatureError,
    IsolationError,
    LeaseLostError,
    LeaseReleasedError,
    LoadShedError,
    NoContextError,
    QuotaError,
    QuotaExceededError,
    QuotaTimeoutError,
    RateLimitedError,
    RequestRefusedError,
    ScopeClosedError,
    ServiceUnavailableError,
    SinkClosedError,
    TooManyRequestsError,
    UnauthenticatedError,
    UserContextError,
)


if typing.TYPE_CHECKING:  # what the type checkers and documentation tools read
    from ._admission import (
        Admission,
        AdmissionStats,
        BreakerStats,
        CircuitBreaker,
        Shed,
        ShedStats,
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
    from ._executor import ContextExecutor
    from ._factory import EngineFactory, FactoryStats
    from ._local_quota import LocalQuota, ThreadQuota
    from ._quota import Lease, Quota, QuotaStats
    from ._rate import LocalRateLimiter, RateLimiter, RateLimitStats
    from ._registry import Registry, RegistryStats
    from ._scope import Scope
    from ._signing import HeaderSigner, HeaderVerifier


#: The public names loaded on first use, each with the private module that
#: defines it: the emitter, the factory, the quotas and the registry import
#: asyncio and more, which `import usercontext` need not pay for when a
#: service uses only `UserContext` and `bind` (PEP 562).
_LAZY: dict[str, str] = {
    "Admission": "_admission",
    "AdmissionStats": "_admission",
    "BreakerStats": "_admission",
    "CircuitBreaker": "_admission",
    "Shed": "_admission",
    "ShedStats": "_admission",
    "AGENT_COMPLETED": "_emitter",
    "AGENT_ERROR": "_emitter",
    "AGENT_STARTED": "_emitter",
    "AGENT_THINKING": "_emitter",
    "Attachment": "_emitter",
    "CallbackSink": "_emitter",
    "DeadLetter": "_emitter",
    "EVENTS_MISSED": "_emitter",
    "Emitter": "_emitter",
    "EmitterHub": "_emitter",
    "EmitterStats": "_emitter",
    "Event": "_emitter",
    "EventBus": "_emitter",
    "Retry": "_emitter",
    "Sink": "_emitter",
    "SinkStats": "_emitter",
    "TOOL_COMPLETED": "_emitter",
    "TOOL_EXECUTING": "_emitter",
    "EngineUse": "_engine_use",
    "ContextExecutor": "_executor",
    "EngineFactory": "_factory",
    "FactoryStats": "_factory",
    "LocalQuota": "_local_quota",
    "ThreadQuota": "_local_quota",
    "Lease": "_quota",
    "Quota": "_quota",
    "QuotaStats": "_quota",
    "LocalRateLimiter": "_rate",
    "RateLimitStats": "_rate",
    "RateLimiter": "_rate",
    "Registry": "_registry",
    "RegistryStats": "_registry",
    "Scope": "_scope",
    "HeaderSigner": "_signing",
    "HeaderVerifier": "_signing",
}


__all__ = [
    "AGENT_COMPLETED",
    "AGENT_ERROR",
    "AGENT_STARTED",
    "AGENT_THINKING",
    "DEFAULT_PLACEHOLDERS",
    "EVENTS_MISSED",
    "TOOL_COMPLETED",
    "TOOL_EXECUTING",
    "Admission",
    "AdmissionStats",
    "AttachToken",
    "Attachment",
    "BackendUnavailableError",
    "BreakerStats",
    "CallbackSink",
    "CircuitBreaker",
    "CircuitOpenError",
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
    "HeaderSigner",
    "HeaderVerifier",
    "IdRules",
    "InvalidContextError",
    "InvalidSignatureError",
    "IsolationError",
    "Lease",
    "LeaseLostError",
    "LeaseReleasedError",
    "LoadShedError",
    "LocalQuota",
    "LocalRateLimiter",
    "NoContextError",
    "Quota",
    "QuotaError",
    "QuotaExceededError",
    "QuotaStats",
    "QuotaTimeoutError",
    "RateLimitStats",
    "RateLimitedError",
    "RateLimiter",
    "Registry",
    "RegistryStats",
    "RequestRefusedError",
    "Retry",
    "Scope",
    "ScopeClosedError",
    "ServiceUnavailableError",
    "Shed",
    "ShedStats",
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
    "strip_context_headers",
    "to_job",
    "to_thread",
    "wrap",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later reads find it without this call
        return value
    if name == "__version__":
        from importlib.metadata import version

        return version("usercontext")

    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

"""
OpenTelemetry for multi-user services: the bound context on every span, W3C
Baggage as a propagation format, and the library's stats as metrics.

- `UserContextSpanProcessor` sets ``enduser.id``, ``usercontext.request_id``
  and the other ids of the context bound where a span starts (it needs the
  OpenTelemetry SDK, as every span processor does);
- `baggage_context`, `inject_baggage` and `extract_baggage` carry a context
  as ``usercontext.<field>`` members of W3C Baggage, and read it back from
  trusted peers only, validated like `usercontext.UserContext.from_headers`;
- `instrument` registers observable instruments that read the stats of
  quotas, engine factories, registries and hubs.

It needs the ``otel`` extra (``opentelemetry-api``):
``pip install usercontext[otel]``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from ._otel_baggage import baggage_context, extract_baggage, inject_baggage
from ._otel_metrics import instrument
from ._otel_spans import UserContextSpanProcessor


__all__ = [
    "UserContextSpanProcessor",
    "baggage_context",
    "extract_baggage",
    "inject_baggage",
    "instrument",
]

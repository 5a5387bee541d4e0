"""
Benchmarks of `usercontext.otel.UserContextSpanProcessor`: what it adds to
starting and ending a span, beside its floor.

Every benchmarked call starts and ends ``ROUNDS`` (1,000) spans with the real
SDK's tracer, so the times that pytest-benchmark prints in microseconds read
as nanoseconds per span. The tracer exports nothing (no exporting processor),
so that the span itself, not an exporter, is the measure.

- ``test_span_bare``: a tracer without the processor, no context bound: what
  a span costs;
- ``test_span_floor``: a processor that sets a prebuilt dict of the same
  attributes: the least any processor doing the job could cost;
- ``test_span_processor``: `UserContextSpanProcessor`, a context bound, one
  allowlisted metadata key. Target: at most 1.3x the floor.
"""

from __future__ import annotations

import pytest


pytest.importorskip("opentelemetry.sdk", reason="the otel benchmarks need the SDK")

from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

import usercontext as uc

from usercontext.otel import UserContextSpanProcessor


ROUNDS = 1_000
CTX = uc.UserContext(
    user_id="u-42", thread_id="t-7", run_id="r-1", request_id="req-1", metadata={"plan": "pro"}
)


class FloorProcessor(SpanProcessor):
    """
    Sets a prebuilt dict of the attributes: no context read, nothing built.
    """

    def __init__(self, attributes):
        self.attributes = attributes

    def on_start(self, span, parent_context=None):  # noqa: ARG002  # the SDK's signature
        span.set_attributes(self.attributes)


def _tracer(*processors):
    provider = TracerProvider()
    for processor in processors:
        provider.add_span_processor(processor)
    return provider.get_tracer("bench")


def _spans(tracer):
    start = tracer.start_span

    def run():
        for _ in range(ROUNDS):
            start("s").end()

    return run


@pytest.mark.benchmark(group="otel-span")
def test_span_bare(benchmark):
    """
    A span started and ended on a tracer without the processor.
    """
    benchmark(_spans(_tracer()))


@pytest.mark.benchmark(group="otel-span")
def test_span_floor(benchmark):
    """
    A span whose processor sets a prebuilt dict of the same 6 attributes.
    """
    attributes = UserContextSpanProcessor(metadata=("plan",)).attributes(CTX)
    assert len(attributes) == 6
    benchmark(_spans(_tracer(FloorProcessor(attributes))))


@pytest.mark.benchmark(group="otel-span")
def test_span_processor(benchmark):
    """
    A span started under a bound context, with `UserContextSpanProcessor`.
    """
    tracer = _tracer(UserContextSpanProcessor(metadata=("plan",)))
    with uc.bind(CTX):
        span = tracer.start_span("check")
        span.end()
        assert span.attributes["enduser.id"] == "u-42"
        benchmark(_spans(tracer))

# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of usercontext.otel, checked by mypy and pyright.
"""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.util.types import AttributeValue
from typing_extensions import assert_type

import usercontext as uc

from usercontext.otel import (
    UserContextSpanProcessor,
    baggage_context,
    extract_baggage,
    inject_baggage,
    instrument,
)


ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")

processor = UserContextSpanProcessor(metadata=("plan",))
provider = TracerProvider()
provider.add_span_processor(processor)
base: SpanProcessor = processor
assert_type(processor.metadata, tuple[str, ...])
assert_type(processor.attributes(ctx), dict[str, AttributeValue])

headers: dict[str, str] = {}
assert_type(inject_baggage(headers, ctx, metadata=["plan"]), None)
assert_type(baggage_context(ctx), Context)
assert_type(extract_baggage(headers, trusted=True), uc.UserContext | None)
extract_baggage(headers)  # type: ignore[call-arg]

assert_type(
    instrument(
        meter_provider=MeterProvider(),
        quotas={"engines": uc.LocalQuota(), "threads": uc.ThreadQuota()},
        registries={"requests": uc.Registry()},
    ),
    None,
)

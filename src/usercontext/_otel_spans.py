"""
The span processor of `usercontext.otel`. Span processors are a concept of
the OpenTelemetry SDK, which the rest of the adapter does not need: without
the SDK, this module imports and the processor refuses to be made.
"""

from __future__ import annotations

import json

from typing import TYPE_CHECKING, cast

from usercontext import current_or_none
from usercontext._codec import _thaw
from usercontext._log_fields import metadata_keys as _metadata_keys


if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, Span
    from opentelemetry.util.types import AttributeValue

    from usercontext import UserContext


__all__ = ["ATTRIBUTES", "METADATA_PREFIX", "UserContextSpanProcessor"]

_sdk_missing: ImportError | None = None
if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor as _Base
else:
    try:
        from opentelemetry.sdk.trace import SpanProcessor as _Base
    except ImportError as e:
        # Raised, as the cause, when a processor is made.
        _sdk_missing = e
        _Base = object

ATTRIBUTES = {
    "user_id": "enduser.id",
    "thread_id": "usercontext.thread_id",
    "run_id": "usercontext.run_id",
    "request_id": "usercontext.request_id",
    "connection_id": "usercontext.connection_id",
    "parent_request_id": "usercontext.parent_request_id",
    "depth": "usercontext.depth",
}
METADATA_PREFIX = "usercontext.metadata."
_PRIMITIVE = (str, bool, int, float)


def _attribute(value: object) -> AttributeValue:
    # OpenTelemetry takes str, bool, int, float and homogeneous sequences of
    # them; anything else (mappings, mixed tuples, None) travels as JSON text.
    if isinstance(value, _PRIMITIVE):
        return value
    if isinstance(value, tuple):
        items = cast("tuple[object, ...]", value)
        kinds = {type(item) for item in items}
        if len(kinds) == 1 and next(iter(kinds)) in _PRIMITIVE:
            return cast("Sequence[str]", items)  # one of the sequences OpenTelemetry takes
        value = items
    return json.dumps(_thaw(value), ensure_ascii=False, sort_keys=True, default=repr)


class UserContextSpanProcessor(_Base):
    """
    UserContextSpanProcessor(*, metadata=())

    A span processor that puts the ids of the bound context on every span
    started while it is bound.

    Add it to the SDK's ``TracerProvider``; each span started where a
    `usercontext.UserContext` is bound (the request's task, its child tasks,
    `usercontext.to_thread`, ...) gets these attributes, and a span started
    where none is bound gets none:

    ====================================  =========================================
    attribute                             value
    ====================================  =========================================
    ``enduser.id``                        *user_id* (OpenTelemetry's semantic
                                          convention for the end user)
    ``usercontext.thread_id``             *thread_id*
    ``usercontext.run_id``                *run_id*
    ``usercontext.request_id``            *request_id*
    ``usercontext.connection_id``         *connection_id*, when set
    ``usercontext.parent_request_id``     *parent_request_id*, when set
    ``usercontext.depth``                 *depth* (an int; 0 for a root context)
    ``usercontext.metadata.<key>``        the metadata value of each allowlisted
                                          *key* the context has
    ====================================  =========================================

    Metadata reaches spans only through the allowlist *metadata*: spans leave
    the service for a tracing backend, and metadata may hold what must not.
    A str, bool, int or float value is set as it is, a tuple of one of those
    types as a sequence, and anything else as JSON text.

    >>> import usercontext as uc
    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> from usercontext.otel import UserContextSpanProcessor
    >>> exporter = InMemorySpanExporter()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(UserContextSpanProcessor(metadata=("plan",)))
    >>> provider.add_span_processor(SimpleSpanProcessor(exporter))
    >>> tracer = provider.get_tracer("example")
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1",
    ...                      request_id="req-1", metadata={"plan": "pro", "email": "a@b.c"})
    >>> with uc.bind(ctx), tracer.start_as_current_span("charge"):
    ...     pass
    >>> dict(exporter.get_finished_spans()[0].attributes)  # doctest: +NORMALIZE_WHITESPACE
    {'enduser.id': 'u-42', 'usercontext.thread_id': 't-7', 'usercontext.run_id': 'r-1',
     'usercontext.request_id': 'req-1', 'usercontext.depth': 0,
     'usercontext.metadata.plan': 'pro'}

    Args:
        metadata: The metadata keys to copy onto spans, as
            ``usercontext.metadata.<key>`` attributes.

    Raises:
        ImportError: If the OpenTelemetry SDK (``opentelemetry-sdk``) is not
            installed.
        TypeError: If *metadata* is not an iterable of str (a single str
            included).
        ValueError: If a key in *metadata* is empty, one of the ids or a field
            of `usercontext.UserContext`.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, metadata: Iterable[str] = ()) -> None:
        if _sdk_missing is not None:
            msg = (
                "usercontext.otel.UserContextSpanProcessor is a span processor of the "
                "OpenTelemetry SDK, which cannot be imported. Install it with "
                "`pip install opentelemetry-sdk`."
            )
            raise ImportError(msg, name="opentelemetry.sdk") from _sdk_missing
        self._metadata = _metadata_keys(
            metadata,
            owner="UserContextSpanProcessor",
            reserved=frozenset(),
            where="span",
            identifiers=False,
        )
        self._names = tuple((key, METADATA_PREFIX + key) for key in self._metadata)

    @property
    def metadata(self) -> tuple[str, ...]:
        """
        The metadata keys copied onto spans.
        """
        return self._metadata

    def attributes(self, ctx: UserContext) -> dict[str, AttributeValue]:
        """
        Return the attributes this processor sets for *ctx*.

        Use it to put the same attributes on something the processor does
        not see, such as a span event or a metric's attributes.

        Args:
            ctx: The context to read.

        Returns:
            A new dict, from attribute name to value.
        """
        out: dict[str, AttributeValue] = {
            "enduser.id": ctx.user_id,
            "usercontext.thread_id": ctx.thread_id,
            "usercontext.run_id": ctx.run_id,
            "usercontext.request_id": ctx.request_id,
            "usercontext.depth": ctx.depth,
        }
        if ctx.connection_id is not None:
            out["usercontext.connection_id"] = ctx.connection_id
        if ctx.parent_request_id is not None:
            out["usercontext.parent_request_id"] = ctx.parent_request_id
        if self._names:
            metadata = ctx.metadata
            for key, name in self._names:
                if key in metadata:
                    out[name] = _attribute(metadata[key])
        return out

    def on_start(
        self,
        span: Span,
        parent_context: Context | None = None,  # noqa: ARG002  # the SDK's signature
    ) -> None:
        """
        on_start(span, parent_context=None)

        Set the attributes of the context bound where *span* starts, if any.
        """
        ctx = current_or_none()
        if ctx is not None:
            span.set_attributes(self.attributes(ctx))

    def on_end(self, span: ReadableSpan) -> None:
        """
        on_end(span)

        Do nothing: the attributes were set when *span* started.
        """

    def __repr__(self) -> str:
        return f"<usercontext.otel.UserContextSpanProcessor(metadata={self._metadata!r})>"

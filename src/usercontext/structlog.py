"""
Put the current context in every event of ``structlog``.

Add `add_context` (or a configured `AddContext`) to your processors, before
the renderer, and every event carries the ids of the
`usercontext.UserContext` bound where the log call ran. It needs the
``structlog`` extra: ``pip install usercontext[structlog]``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usercontext._log_fields import MISSING as _MISSING
from usercontext._log_fields import add_fields as _add_fields
from usercontext._log_fields import metadata_keys as _metadata_keys


if TYPE_CHECKING:
    from collections.abc import Iterable

    from structlog.typing import EventDict, WrappedLogger


__all__ = ["AddContext", "add_context"]

# Keys structlog's own processors read: a metadata value under one of them
# would become the event's message, or make format_exc_info format an
# exception, or confuse structlog.stdlib.ProcessorFormatter.
_EVENT_KEYS = frozenset(
    {"event", "exc_info", "exception", "stack_info", "_record", "_from_structlog"}
)


def add_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:  # noqa: ARG001  # structlog's processor signature
    """
    add_context(logger, method_name, event_dict)

    A structlog processor that adds the ids of the current context to each
    event.

    The event gets the keys ``user_id``, ``thread_id``, ``run_id`` and
    ``request_id`` of the `usercontext.UserContext` bound where the log call
    ran, or ``"-"`` when none is bound (but ``request_id`` while
    `usercontext.asgi.UserContextMiddleware` resolves or refuses a request:
    see `usercontext.stdlib.ContextFilter`). Keys the event has already (passed to
    the log call, bound to the logger, or merged from
    ``structlog.contextvars``) are kept. For metadata, or another default, use
    `AddContext`.

    >>> import sys
    >>> import structlog
    >>> import usercontext as uc
    >>> from usercontext.structlog import add_context
    >>> log = structlog.wrap_logger(
    ...     structlog.PrintLogger(sys.stdout),
    ...     processors=[add_context, structlog.processors.KeyValueRenderer(sort_keys=True)],
    ... )
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1", request_id="req-1")
    >>> with uc.bind(ctx):
    ...     log.info("invoice_sent")
    event='invoice_sent' request_id='req-1' run_id='r-1' thread_id='t-7' user_id='u-42'
    >>> log.info("idle")
    event='idle' request_id='-' run_id='-' thread_id='-' user_id='-'

    .. versionadded:: 0.1.0
    """
    _add_fields(event_dict, (), _MISSING)
    return event_dict


class AddContext:
    """
    AddContext(*, metadata=(), default="-")

    A structlog processor like `add_context`, that also copies allowlisted
    metadata and takes another default.

    Each event gets the four ids of the `usercontext.UserContext` bound where
    the log call ran, or *default* when none is bound, and, for each key in
    *metadata*, the value of the context's metadata under that key, or
    *default* when it lacks one. Keys the event has already are kept.

    >>> import structlog
    >>> import usercontext as uc
    >>> from usercontext.structlog import AddContext
    >>> events = structlog.testing.LogCapture()
    >>> log = structlog.wrap_logger(
    ...     structlog.ReturnLogger(),
    ...     processors=[AddContext(metadata=("plan", "tenant"), default=None), events],
    ... )
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1",
    ...                      metadata={"plan": "pro"})
    >>> with uc.bind(ctx):
    ...     log.info("sent", run_id="r-1.retry")
    >>> [(e["user_id"], e["run_id"], e["plan"], e["tenant"]) for e in events.entries]
    [('u-42', 'r-1.retry', 'pro', None)]

    The processor runs where the log call runs (structlog's async methods,
    such as ``await log.ainfo(...)``, run it in a worker thread with a copy of
    the caller's context), so each event carries the ids of its own request.
    With ``structlog.stdlib.ProcessorFormatter``, records of loggers that are
    not structlog's go through its *foreign_pre_chain* in the handler, which
    runs in the calling thread too, unless a
    ``logging.handlers.QueueHandler`` moves them to another thread first: see
    `usercontext.stdlib.ContextFilter` for that case.

    Args:
        metadata: The metadata keys to copy into events; none of them may be
            one of the four ids, a field of `usercontext.UserContext`, or a
            key structlog reads (``event``, ``exc_info``, ``exception``,
            ``stack_info``).
        default: The value of each key when no context is bound, and of each
            allowlisted key the context's metadata lacks.

    Raises:
        TypeError: If *metadata* is not an iterable of str (a single str
            included).
        ValueError: If a key in *metadata* is empty, one of the four ids, a
            field of `usercontext.UserContext`, or a key structlog reads.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_default", "_metadata")

    def __init__(self, *, metadata: Iterable[str] = (), default: object = _MISSING) -> None:
        self._metadata = _metadata_keys(
            metadata, owner="AddContext", reserved=_EVENT_KEYS, where="event", identifiers=False
        )
        self._default = default

    @property
    def metadata(self) -> tuple[str, ...]:
        """
        The metadata keys copied into events.
        """
        return self._metadata

    @property
    def default(self) -> object:
        """
        The value given for an id when no context is bound, and for an
        allowlisted key the context's metadata lacks.
        """
        return self._default

    def __call__(
        self,
        logger: WrappedLogger,  # noqa: ARG002  # structlog's processor signature
        method_name: str,  # noqa: ARG002  # ditto
        event_dict: EventDict,
    ) -> EventDict:
        """
        Add the current context's ids, and its allowlisted metadata, to
        *event_dict*; keep the keys *event_dict* has already.
        """
        _add_fields(event_dict, self._metadata, self._default)
        return event_dict

    def __repr__(self) -> str:
        return (
            f"<usercontext.structlog.AddContext(metadata={self._metadata!r}, "
            f"default={self._default!r})>"
        )

"""
Put the current context in every log line of the standard library's ``logging``.

Attach a `ContextFilter` to your handlers, and every record they handle
carries the ids of the `usercontext.UserContext` bound where the log call ran,
ready for a format string such as ``"%(user_id)s %(request_id)s
%(message)s"``. It needs nothing beyond the standard library:
``pip install usercontext[stdlib]`` installs nothing more than the core.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import logging

from typing import TYPE_CHECKING

from usercontext._log_fields import MISSING as _MISSING
from usercontext._log_fields import add_fields as _add_fields
from usercontext._log_fields import metadata_keys as _metadata_keys


if TYPE_CHECKING:
    from collections.abc import Iterable


__all__ = ["ContextFilter"]

# Every attribute a LogRecord has, or gets from a formatter ("message",
# "asctime"), or has on newer Pythons ("taskName", 3.12): a metadata value
# there would replace the record's own and break formatting. Methods too:
# an instance attribute named "getMessage" would hide the method.
_RECORD_ATTRIBUTES = frozenset(
    {
        *vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None)),
        *dir(logging.LogRecord),
        "message",
        "asctime",
        "taskName",
    }
)


class ContextFilter(logging.Filter):
    """
    ContextFilter(*, metadata=(), default="-")

    A logging filter that adds the ids of the current context to each record.

    Each record it sees gets the attributes ``user_id``, ``thread_id``,
    ``run_id`` and ``request_id`` of the `usercontext.UserContext` bound where
    the log call ran, or *default* when none is bound. Values of the context's
    metadata are added only for the keys listed in *metadata*, as attributes of
    the same name, and *default* stands in for a key the context's metadata
    lacks. Attributes the record has already, from ``extra=`` or from an
    earlier `ContextFilter`, are kept. It never drops a record.

    While `usercontext.asgi.UserContextMiddleware` resolves a request, or
    refuses it, no context is bound yet, but ``request_id`` is already the id
    the client gets back (in the response header and the error body), so
    that a refused request can be found in the logs.

    >>> import logging, sys
    >>> import usercontext as uc
    >>> from usercontext.stdlib import ContextFilter
    >>> handler = logging.StreamHandler(sys.stdout)
    >>> handler.addFilter(ContextFilter(metadata=("plan",)))
    >>> handler.setFormatter(logging.Formatter("%(user_id)s %(request_id)s %(plan)s %(message)s"))
    >>> log = logging.getLogger("example.billing")
    >>> log.addHandler(handler)
    >>> log.propagate = False
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1",
    ...                      request_id="req-1", metadata={"plan": "pro"})
    >>> with uc.bind(ctx):
    ...     log.warning("invoice sent")
    u-42 req-1 pro invoice sent
    >>> log.warning("outside any request")
    - - - outside any request
    >>> log.removeHandler(handler)

    **Attach it to handlers.** A filter added to a logger sees only the
    records logged on that very logger, not those its child loggers pass up
    to its handlers: one on ``logging.getLogger("app")`` misses every record
    of ``logging.getLogger("app.db")``. A filter on a handler sees every
    record the handler handles. With ``logging.config.dictConfig``, name the
    class in a filter's ``"()"`` key, and the filter in each handler::

        logging.config.dictConfig({
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "usercontext": {
                    "()": "usercontext.stdlib.ContextFilter",
                    "metadata": ["plan"],
                },
            },
            "formatters": {
                "ids": {"format": "%(levelname)s %(user_id)s %(request_id)s %(message)s"},
            },
            "handlers": {
                "console": {
                    "class": "logging.StreamHandler",
                    "filters": ["usercontext"],
                    "formatter": "ids",
                },
            },
            "root": {"level": "INFO", "handlers": ["console"]},
        })

    **Where the ids come from.** The filter reads the context where it runs,
    and a handler runs its filters in the thread and task that made the log
    call, so each record carries the ids of its own request, whatever other
    requests log at the same time. Code in other threads sees a context only
    when it was carried there (`usercontext.to_thread`,
    `usercontext.ContextExecutor`, `usercontext.wrap`); elsewhere its records
    get *default*.

    **Queues.** A ``logging.handlers.QueueHandler`` runs its filters in the
    calling thread, before it puts the record on the queue, and the
    attributes travel with the record. Attach the filter to the
    ``QueueHandler``: the handlers of the ``QueueListener`` then format the
    ids of the request that logged. A filter attached only to the listener's
    handlers runs in the listener's thread, where no context is bound, and
    every record gets *default*.

    Args:
        metadata: The metadata keys to copy onto records, each a Python
            identifier that is not an attribute of ``logging.LogRecord`` (such
            as ``name`` or ``msg``) nor one of the four ids.
        default: The value of each attribute when no context is bound, and of
            each allowlisted key the context's metadata lacks.

    Raises:
        TypeError: If *metadata* is not an iterable of str (a single str
            included).
        ValueError: If a key in *metadata* is not an identifier, is one of the
            four ids or a field of `usercontext.UserContext`, or is an
            attribute of ``logging.LogRecord``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, metadata: Iterable[str] = (), default: object = _MISSING) -> None:
        super().__init__()
        self._metadata = _metadata_keys(
            metadata,
            owner="ContextFilter",
            reserved=_RECORD_ATTRIBUTES,
            where="log record",
            identifiers=True,
        )
        self._default = default

    @property
    def metadata(self) -> tuple[str, ...]:
        """
        The metadata keys copied onto records.
        """
        return self._metadata

    @property
    def default(self) -> object:
        """
        The value given for an id when no context is bound, and for an
        allowlisted key the context's metadata lacks.
        """
        return self._default

    def filter(self, record: logging.LogRecord) -> bool:
        """
        filter(record)

        Add the current context's ids, and its allowlisted metadata, to
        *record*; keep the attributes *record* has already.

        Returns:
            Always `True`; the record is never dropped.
        """
        _add_fields(record.__dict__, self._metadata, self._default)
        return True

    def __repr__(self) -> str:
        return (
            f"<usercontext.stdlib.ContextFilter(metadata={self._metadata!r}, "
            f"default={self._default!r})>"
        )

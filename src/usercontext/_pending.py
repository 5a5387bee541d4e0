"""
The request id of a request that has no `UserContext` yet: while its resolver
runs, and while it is refused.

It lives in a `ContextVar` of its own, set only around that moment by the ASGI
middleware and read by the logging adapters when no context is bound, so that
those log lines carry the id the client gets back. The one variable of the
current context stays the only one set for the rest of a request.
"""

from __future__ import annotations

import contextvars

from typing import TYPE_CHECKING

from ._context import _check_request_id
from ._ids import new_id
from .exceptions import InvalidContextError


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["Pending", "pending", "readers"]

#: Set to [True] when a logging adapter is imported. Nothing else reads the
#: variable, so without one the middleware does not set it: a set and reset
#: of a ContextVar cost a few hundred ns per request.
readers: list[bool] = []


class Pending:
    """
    The id of one request, made on first use when the client sent none: most
    requests are never logged before their context exists, and then keep the
    id of the context the resolver made.
    """

    __slots__ = ("_checked", "_make", "id")

    def __init__(self, request_id: str | None, make: Callable[[], str] | None) -> None:
        #: The id, or None while none was asked for. An id from the client is
        #: checked against the library's rules when first asked for: an
        #: accepted request checks it anyway, when its context takes it.
        self.id = request_id
        self._make = make
        self._checked = False

    def get(self) -> str:
        """
        Return the id, made now if the request has none (valid) yet.
        """
        if not self._checked:
            self._checked = True
            if self.id is not None:
                try:
                    _check_request_id("request_id", self.id)
                except InvalidContextError:
                    self.id = None
        request_id = self.id
        if request_id is None:
            request_id = self.id = new_id() if self._make is None else self._make()
        return request_id


#: The request being resolved or refused in this Context, if any.
pending: contextvars.ContextVar[Pending] = contextvars.ContextVar("usercontext_pending")

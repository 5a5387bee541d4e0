"""
How `usercontext.asgi.UserContextMiddleware` answers a request whose resolver
refused it: which errors are refusals, the status and problem document each
gets, and how a WebSocket handshake is refused.
"""

from __future__ import annotations

import builtins
import importlib

from typing import TYPE_CHECKING, Any

from usercontext._asgi_response import _send_json
from usercontext.exceptions import (
    InvalidContextError,
    RequestRefusedError,
    _check_header,
    _phrase,
)


if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping

    from usercontext._asgi_response import Send


__all__ = ["Refusal", "refusal", "refuse"]

# WebSocket close codes for a refused handshake (RFC 6455, IANA registry): a
# client error is a policy violation; 429 and 503 say try again later; any
# other server error, an internal error.
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011
_TRY_AGAIN_LATER = 1013
# The longest reason a close frame may carry, in bytes (RFC 6455).
_MAX_REASON = 123
# BaseExceptionGroup is a builtin from Python 3.11 on; the backport (a
# dependency on 3.10) provides it before.
_Group: type[BaseException] = (
    getattr(builtins, "BaseExceptionGroup", None)
    or importlib.import_module("exceptiongroup").BaseExceptionGroup
)
_RETRY_LATER = frozenset((429, 503))


class Refusal:
    """
    How to answer a refused request: its status, problem document and headers.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers


def refusal(error: BaseException) -> Refusal | None:
    """
    Return how to answer a request whose resolver raised *error*, or `None`
    when *error* is not a refusal (it then propagates).
    """
    if isinstance(error, RequestRefusedError):
        body: dict[str, Any] = {
            "type": error.type,
            "title": error.title,
            "detail": error.detail,
            "error": error.error,
        }
        if error.retry_after is not None:
            body["retry_after"] = error.retry_after
        headers = [
            (name.lower().encode("ascii"), value.encode("latin-1"))
            for name, value in error.headers.items()
        ]
        return Refusal(error.status, body, headers)
    if isinstance(error, InvalidContextError):
        body = {"detail": str(error), "error": "invalid_context", "field": error.field}
        return Refusal(400, body, [])
    if isinstance(error, _Group):
        # A task group in the resolver: answered as its first refusal, in the
        # order the group lists them, when it holds nothing but refusals.
        refusals = [refusal(leaf) for leaf in _leaves(error)]
        if None in refusals:
            return None
        return refusals[0]
    return _http_exception(error)


def _leaves(group: Any) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, _Group):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves


def _http_exception(error: BaseException) -> Refusal | None:
    """
    Map an ``HTTPException`` of Starlette or FastAPI (anything with an int
    *status_code* from 400 to 599 and a *detail*) to a refusal, without
    importing either.
    """
    status = getattr(error, "status_code", None)
    if type(status) is not int or not 400 <= status <= 599 or not hasattr(error, "detail"):  # noqa: PLR2004  # error statuses
        return None
    title, code = _phrase(status)
    detail: object = getattr(error, "detail")  # noqa: B009  # checked above: it has one
    body: dict[str, Any] = {"title": title, "detail": detail, "error": code}
    if type(detail) is not str:
        # FastAPI allows any JSON as detail; a problem's detail is a string.
        body["detail"] = title
        body["errors"] = detail
    headers: list[tuple[bytes, bytes]] = []
    given: Mapping[Any, Any] = getattr(error, "headers", None) or {}
    for name, value in given.items():
        _check_header(f"{type(error).__name__}(headers=...) raised by the resolver", name, value)
        headers.append((name.lower().encode("ascii"), value.encode("latin-1")))
    return Refusal(status, body, headers)


async def refuse(
    scope: MutableMapping[str, Any], send: Send, refused: Refusal, header: tuple[bytes, bytes]
) -> None:
    """
    Answer a refused request with *refused*: a problem document carrying the
    request id *header*, or for a WebSocket whose server has no denial
    responses, a close frame whose code says whether to try again.
    """
    headers = [*refused.headers, header]
    if scope["type"] == "http":
        await _send_json(send, "http.response", refused.status, refused.body, headers)
    elif "websocket.http.response" in scope.get("extensions", {}):
        kind = "websocket.http.response"
        await _send_json(send, kind, refused.status, refused.body, headers)
    else:
        status = refused.status
        if status in _RETRY_LATER:
            code = _TRY_AGAIN_LATER
        elif status >= 500:  # noqa: PLR2004  # server errors
            code = _INTERNAL_ERROR
        else:
            code = _POLICY_VIOLATION
        reason = f"{status} {refused.body['error']}".encode()[:_MAX_REASON]
        await send(
            {
                "type": "websocket.close",
                "code": code,
                "reason": reason.decode("utf-8", "ignore"),
            }
        )

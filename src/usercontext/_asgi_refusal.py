"""
How `usercontext.asgi.UserContextMiddleware` answers a request whose resolver
refused it: with a problem document, or for a WebSocket handshake the server
cannot answer with one, a close frame. Which errors are refusals, and the
status and document each gets, is `usercontext._http`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from usercontext._asgi_response import _send_json


if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from usercontext._asgi_response import Send
    from usercontext._http import Refusal


__all__ = ["refuse"]

# WebSocket close codes for a refused handshake (RFC 6455, IANA registry): a
# client error is a policy violation; 429 and 503 say try again later; any
# other server error, an internal error.
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011
_TRY_AGAIN_LATER = 1013
# The longest reason a close frame may carry, in bytes (RFC 6455).
_MAX_REASON = 123
_RETRY_LATER = frozenset((429, 503))


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

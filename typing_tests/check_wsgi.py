# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of the WSGI middleware, checked by mypy and pyright.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import assert_type

import usercontext as uc

from usercontext.asgi import RequestState
from usercontext.wsgi import UserContextMiddleware, request_state


if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    state = request_state(environ)
    assert_type(state, RequestState)
    assert_type(state.resources, uc.Scope | None)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [state.ctx.user_id.encode()]


def resolve(environ: dict[str, Any]) -> uc.UserContext | None:
    user_id = environ.get("HTTP_X_USER")
    return None if user_id is None else uc.UserContext(user_id=user_id, thread_id="t", run_id="r")


middleware = UserContextMiddleware(
    app,
    resolver=resolve,
    registry=uc.Registry(),
    exempt=("/health",),
    trust_request_id=lambda request_id: request_id.startswith("gw-"),
    request_id_factory=lambda: "req-1",
    strip_context_headers=True,
)
# The middleware is a WSGI application, as a server expects one.
served: WSGIApplication = middleware


# A coroutine function is no resolver of a WSGI request.
async def resolve_async(environ: dict[str, Any]) -> uc.UserContext | None:
    return resolve(environ)


UserContextMiddleware(app, resolver=resolve_async)  # type: ignore[arg-type]

"""
`usercontext.asgi.RequestState`: what the ASGI middleware set up for one
request, kept in its ASGI scope.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from usercontext import Emitter, EmitterHub, Scope, UserContext


__all__ = ["RequestState"]


class RequestState:
    """
    What `usercontext.asgi.UserContextMiddleware` set up for one request or
    connection.

    The middleware keeps it in the ASGI scope (see
    `usercontext.asgi.request_state`), so that
    endpoints and framework integrations can reach the request's resources.

    Attributes:
        ctx: The request's context, bound while the request runs.
        resources: The request's scope of the registry given to the middleware,
            or `None` without one. It is open until the response has been sent
            (HTTP) or the connection ends (WebSocket).
        hub: The hub given to the middleware, or `None`.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("ctx", "hub", "resources")

    ctx: UserContext
    resources: Scope | None
    hub: EmitterHub | None

    def __init__(self, ctx: UserContext, resources: Scope | None, hub: EmitterHub | None) -> None:
        self.ctx = ctx
        self.resources = resources
        self.hub = hub

    @property
    def emitter(self) -> Emitter:
        """
        The emitter of the request's user, from the middleware's hub.

        Raises:
            LookupError: If the middleware was given no hub.
        """
        if self.hub is None:
            msg = "UserContextMiddleware was given no hub: pass hub=EmitterHub(...) to it."
            raise LookupError(msg)
        return self.hub.emitter(self.ctx)

    def __repr__(self) -> str:
        return (
            f"<usercontext.asgi.RequestState(user_id={self.ctx.user_id!r}, "
            f"request_id={self.ctx.request_id!r})>"
        )

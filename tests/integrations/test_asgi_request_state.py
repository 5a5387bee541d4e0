"""
Tests of `usercontext.asgi.RequestState` and `usercontext.asgi.request_state`,
what the middleware leaves in each request's ASGI scope.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import usercontext as uc

from usercontext.asgi import RequestState, UserContextMiddleware, request_state
from usercontext.testing import RecordingSink

from asgi_helpers import Client, http_scope, json_app, resolve


class TestRequestState:
    async def test_emitter_from_the_hub(self):
        """
        `RequestState.emitter` is the hub's emitter for the request's context:
        its events go to the request's user, with the request's ids.
        """
        sink = RecordingSink()
        async with uc.EmitterHub() as hub:
            hub.attach("u-42", sink)

            async def app(scope, receive, send):
                state = request_state(scope)
                assert state.hub is hub
                await state.emitter.emit(uc.TOOL_EXECUTING, {"tool": "search"})
                await json_app()(scope, receive, send)

            client = Client()
            mw = UserContextMiddleware(app, resolver=resolve, hub=hub)
            await mw(http_scope(("x-request-id", "req-e")), client.receive, client.send)
            with anyio.fail_after(5):
                await sink.wait_for(1)

        [event] = sink.events
        assert (event.type, event.user_id, event.request_id) == (
            "tool_executing",
            "u-42",
            "req-e",
        )
        assert event.data["tool"] == "search"

    def test_emitter_without_a_hub(self, ctx):
        """
        Without a hub, `RequestState.emitter` raises a LookupError saying how
        to pass one.
        """
        state = RequestState(ctx, None, None)
        with pytest.raises(LookupError) as e:
            state.emitter  # noqa: B018  # the property raises

        assert str(e.value) == (
            "UserContextMiddleware was given no hub: pass hub=EmitterHub(...) to it."
        )

    def test_repr(self, ctx):
        """
        The repr names the user and the request.
        """
        assert repr(RequestState(ctx, None, None)) == (
            f"<usercontext.asgi.RequestState(user_id='u-42', request_id={ctx.request_id!r})>"
        )

    def test_request_state_outside_the_middleware(self):
        """
        `request_state` on a scope that did not pass through the middleware
        raises NoContextError, saying how to add it.
        """
        with pytest.raises(uc.NoContextError) as e:
            request_state({"type": "http"})

        assert str(e.value) == (
            "This request did not pass through usercontext.asgi.UserContextMiddleware. Add it "
            "around the application: app.add_middleware(UserContextMiddleware, resolver=...) or "
            "UserContextMiddleware(app, resolver=...)."
        )
        assert e.value.__cause__ is None
        assert e.value.__suppress_context__

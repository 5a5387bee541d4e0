"""
Tests of the example service the "Concurrent HTTP requests" report section
drives, and of its floor (`usercontext._report.service`).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from usercontext import AGENT_STARTED, UnauthenticatedError, UserContext
from usercontext._report.service import FloorService, Service, resolve


class TestService:
    def test_resolver(self):
        """
        The resolver finds the user of a known bearer token and refuses
        unknown and missing ones.
        """
        ctx = resolve({"headers": [(b"authorization", b"Bearer tok-042")]})

        assert ctx.user_id == "user-042"
        for headers in ([(b"authorization", b"Bearer nope")], [(b"host", b"x")]):
            with pytest.raises(UnauthenticatedError):
                resolve({"headers": headers})

    def test_settle_waits_for_deliveries(self):
        """
        Settling waits for the events still buffered, then disconnects the
        users and waits until the hub forgot them.
        """
        service = Service()

        async def main():
            async with service.hub:
                service.connect()
                ctx = UserContext(user_id="user-001", thread_id="web", run_id="agent")
                for _ in range(3):
                    service.hub.emitter(ctx).emit_nowait(AGENT_STARTED)
                return await service.settle()

        state = asyncio.run(main())

        assert (state["events_emitted"], state["events_delivered"]) == (3, 3)
        assert state["events_received"] == 3
        assert state["events_wrong_user"] == 0
        assert state["hub_users"] == state["hub_attached"] == 0

    def test_floor(self):
        """
        The floor refuses an unknown token with a 401, makes a request id when
        the client sent none, and reuses its semaphores.
        """
        floor = FloorService(work_s=0)
        sent = []

        async def send(message):
            sent.append(message)

        async def main():
            for token in (b"Bearer nope", b"Bearer tok-001", b"Bearer tok-001"):
                scope = {"type": "http", "headers": [(b"authorization", token)]}
                await floor.asgi(scope, None, send)
            return await floor.settle()

        state = asyncio.run(main())

        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        assert statuses == [401, 200, 200]
        bodies = [json.loads(m["body"]) for m in sent if m["type"] == "http.response.body"]
        assert len(bodies[1]["request_id"]) == 32
        assert bodies[1]["request_id"] != bodies[2]["request_id"]
        assert state == {"semaphores": 1, "event_lists": 1, "events": 4}

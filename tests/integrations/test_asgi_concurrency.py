"""
Tests of `usercontext.asgi.UserContextMiddleware` serving many users at once
on one event loop: each request sees only its own user, in its code and in
its log records.
"""

from __future__ import annotations

import json
import logging
import random

import anyio
import anyio.lowlevel
import anyio.to_thread

import usercontext as uc

from usercontext.asgi import UserContextMiddleware, request_state

from asgi_helpers import Client, Session, aresolve, http_scope, json_start
from helpers import KeepRecords


class _StampIds(logging.Filter):
    def filter(self, record):
        ctx = uc.current_or_none()
        record.user_id = None if ctx is None else ctx.user_id
        record.request_id = None if ctx is None else ctx.request_id
        return True


class TestConcurrency:
    async def test_many_users_many_requests(self):
        """
        50 users with 20 concurrent requests each, all on one event loop: every
        response carries its own user and request id, every log record the
        ids of the request that logged it, every request a session of its own;
        no scope is left open.
        """
        users, per_user = 50, 20
        registry = uc.Registry()
        sessions = []

        async def session(ctx):
            await anyio.lowlevel.checkpoint()
            s = Session(ctx)
            sessions.append(s)
            yield s

        registry.register(Session, session)
        logger = logging.getLogger("tests.asgi.concurrency")
        handler = KeepRecords()
        handler.addFilter(_StampIds())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

        async def app(scope, receive, send):
            state = request_state(scope)
            await anyio.sleep(random.random() / 1000)
            s = await state.resources.aget(Session)
            logger.info("handling %s %s", state.ctx.user_id, state.ctx.request_id)
            await anyio.sleep(random.random() / 1000)
            ctx = uc.current()
            body = json.dumps(
                {"user_id": ctx.user_id, "request_id": ctx.request_id, "session_of": s.ctx.user_id}
            ).encode()
            await send(json_start(body))
            await anyio.lowlevel.checkpoint()
            await send({"type": "http.response.body", "body": body})

        mw = UserContextMiddleware(app, resolver=aresolve, registry=registry)
        results = []

        async def request(user, n):
            client = Client()
            scope = http_scope(("x-request-id", f"{user}-req-{n}"), user=user)
            await mw(scope, client.receive, client.send)
            results.append((user, n, client.headers()[b"x-request-id"].decode(), client.json()))

        try:
            async with anyio.create_task_group() as tg:
                for n in range(per_user):
                    for u in range(users):
                        tg.start_soon(request, f"u-{u}", n)
        finally:
            logger.removeHandler(handler)

        mismatches = [
            r
            for r in results
            if not (
                r[3]["user_id"] == r[3]["session_of"] == r[0]
                and r[3]["request_id"] == r[2] == f"{r[0]}-req-{r[1]}"
            )
        ]
        assert len(results) == users * per_user
        assert mismatches == []
        records = handler.records
        assert len(records) == users * per_user
        assert [r for r in records if r.args != (r.user_id, r.request_id)] == []
        assert len({r.request_id for r in records}) == users * per_user
        assert len({id(s) for s in sessions}) == users * per_user
        stats = registry.stats()
        assert (stats.scopes, stats.opened, stats.top) == (
            0,
            users * per_user,
            (),
        )

"""
Tests of the agent service against a real server and real clients.

The app runs under uvicorn on 127.0.0.1, on a free port, in a background
thread (uvicorn runs on asyncio). The clients are httpx2 for HTTP and
websockets for WebSockets; every async test runs its clients on asyncio and on
trio. The websockets client is its threaded one, run in worker threads, because
its async client runs on asyncio only. What the server holds (open scopes,
engines, quota slots, database connections) is read on the server's own event
loop.

Run them from this folder with ``python -m pytest``; the library's suite runs
them too (``tests/integrations/test_examples.py``). They are skipped when
FastAPI, uvicorn, websockets, httpx2 or SQLAlchemy is missing, unless
``CI=true``, where a missing piece fails the run (the repository's
``conftest.py`` decides).

One test runs the service on PostgreSQL, in a schema of its own that it drops
afterwards: the server at ``USERCONTEXT_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``), else a throwaway one that the
repository's ``conftest.py`` starts from the ``pgserver`` package; it is
skipped when neither can be had, unless ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import sys
import threading
import time

from pathlib import Path

import anyio
import pytest


# What the example needs besides the library: its framework, the default
# database's driver, its server, and the clients of the tests. Install them with
# pip install "usercontext[fastapi,sqlalchemy]" aiosqlite uvicorn websockets httpx2
pytest.importorskip("aiosqlite")
pytest.importorskip("fastapi")
pytest.importorskip("httpx2")
pytest.importorskip("sqlalchemy")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

import httpx2
import uvicorn

from sqlalchemy import create_engine, event, make_url, select, union_all
from sqlalchemy.schema import DropSchema
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


# Each test runs the service under uvicorn.
pytestmark = [pytest.mark.anyio, pytest.mark.server("uvicorn")]

HERE = Path(__file__).resolve().parent

# The events of a run, in order: the agent thinks, calls its tool, thinks, answers.
SUCCEEDED = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_thinking",
    "agent_completed",
]
# ... or its tool fails.
FAILED = ["agent_started", "agent_thinking", "tool_executing", "agent_error"]
# What a settled server holds: nothing.
SETTLED = {
    "scopes": 0,
    "resources_in_use": 0,
    "engines_in_use": 0,
    "quota_in_use": 0,
    "quota_waiting": 0,
    "connections_held": 0,
}


def _load_app_module():
    # By path, under a name of its own, so that the tests run from any folder.
    spec = importlib.util.spec_from_file_location("agent_service_app", HERE / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


agent_service = _load_app_module()


class LiveServer:
    """
    An app served by uvicorn on 127.0.0.1 in a background thread, for a
    ``with`` block.
    """

    def __init__(self, app):
        self.app = app
        self.service = app.state.service
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        self._loop = None
        self._thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)

    def _run(self):
        asyncio.run(self._serve())

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        await self._server.serve(sockets=[self._sock])

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                msg = "uvicorn did not start the app; its log above says why."
                raise RuntimeError(msg)
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info):
        self._server.should_exit = True
        self._thread.join(15)
        self._sock.close()
        assert not self._thread.is_alive(), "uvicorn did not shut down within 15 s"

    def call(self, fn, *args):
        """
        Return ``fn(*args)``, called on the server's event loop.
        """

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=5)

    def held(self):
        """
        What the server holds right now, as in `SETTLED`.
        """
        s = self.service

        def snapshot():
            registry, quota = s.registry.stats(), s.factory.quota.stats()
            return {
                "scopes": registry.scopes,
                "resources_in_use": registry.in_use,
                "engines_in_use": s.factory.stats().in_use,
                "quota_in_use": quota.in_use,
                "quota_waiting": quota.waiting,
                "connections_held": s.pool.checked_out,
            }

        return self.call(snapshot)

    async def settled(self, timeout=5.0):
        """
        Wait until the server holds nothing (the last cleanups may run just
        after the client got its response), and return what it holds then.
        """
        with anyio.move_on_after(timeout):
            while self.held() != SETTLED:  # noqa: ASYNC110  # another thread's state
                await anyio.sleep(0.01)
        return self.held()

    def request_log(self, request_id):
        return self.call(self.service.request_logs.get, request_id)


@pytest.fixture(name="server", scope="module")
def _server():
    """
    The service with its default database (a SQLite file in a temporary
    directory), served by uvicorn for the tests of this module.
    """
    with LiveServer(agent_service.create_app()) as server:
        yield server


@pytest.fixture(name="http")
async def _http(server):
    """
    An HTTP client of the server.
    """
    limits = httpx2.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx2.AsyncClient(
        base_url=server.url, limits=limits, timeout=30, trust_env=False
    ) as client:
        yield client


@pytest.fixture(name="prefix")
def _prefix():
    """
    A prefix for user ids unique to the test, so that tests sharing the
    server do not share users.
    """
    return f"u{os.urandom(3).hex()}"


def auth(user_id, **headers):
    return {"authorization": f"Bearer {user_id}", **headers}


def read_and_leave(server, path, params, headers, count):
    """
    GET *path* and disconnect after *count* lines of JSON; return the status
    and the lines.

    It uses the threaded client: on trio, an async stream left mid-way leaves
    httpx2's inner async generators to the garbage collector, which trio
    reports with a ResourceWarning.
    """
    lines = []
    with (
        httpx2.Client(base_url=server.url, timeout=30, trust_env=False) as client,
        client.stream("GET", path, params=params, headers=headers) as response,
    ):
        for line in response.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == count:
                break
    return response.status_code, lines


def connect_events(server, user_id):
    """
    Return a context manager opening a WebSocket of *user_id* to ``/ws``,
    from every event still held.
    """
    return connect(
        f"{server.ws_url}/ws?last_seq=0",
        additional_headers=auth(user_id),
        proxy=None,
        open_timeout=5,
    )


def receive_events(ws, count, *, quiet=0.3, timeout=10.0):
    """
    Receive *count* events from *ws*, then check that nothing more arrives
    for *quiet* seconds; return every event received.
    """
    events = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        events += json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
    with contextlib.suppress(TimeoutError):
        events += json.loads(ws.recv(timeout=quiet))
    return events


class TestIsolation:
    async def test_concurrent_users_see_only_their_own_context(self, server, http, prefix):
        """
        50 users sending 20 requests each, all at once: every one of the 1,000
        responses echoes its caller's user, thread and run, and its own request
        id, in the body and in the x-request-id header. The ids a client sent
        are kept, and no two requests share an id.
        """
        users, per_user = 50, 20

        async def whoami(u, i):
            user_id = f"{prefix}-{u}"
            headers = auth(user_id, **{"x-thread-id": f"t-{u}", "x-run-id": f"r-{u}-{i}"})
            if i % 2 == 0:
                headers["x-request-id"] = f"req-{user_id}-{i}"
            response = await http.get("/whoami", headers=headers)
            results.append((user_id, u, i, headers.get("x-request-id"), response))

        results = []
        async with anyio.create_task_group() as tg:
            for u in range(users):
                for i in range(per_user):
                    tg.start_soon(whoami, u, i)

        mismatches = 0
        request_ids = set()
        for user_id, u, i, sent_id, response in results:
            body = response.json()
            expected = {"user_id": user_id, "thread_id": f"t-{u}", "run_id": f"r-{u}-{i}"}
            if response.status_code != 200 or {k: body[k] for k in expected} != expected:
                mismatches += 1
            if body["request_id"] != response.headers["x-request-id"]:
                mismatches += 1
            if sent_id is not None and body["request_id"] != sent_id:
                mismatches += 1
            request_ids.add(body["request_id"])
        assert len(results) == 1_000
        assert mismatches == 0
        assert len(request_ids) == 1_000
        assert await server.settled() == SETTLED


class TestStreaming:
    async def test_context_until_the_last_chunk(self, server, http, prefix):
        """
        Every chunk of a streaming response is produced with the request's
        context bound and its scope open; the scope closes after the last
        chunk, successfully.
        """
        user_id = f"{prefix}-stream"
        chunks = 20
        headers = auth(user_id, **{"x-request-id": f"req-{user_id}"})
        async with http.stream(
            "GET", "/stream", params={"chunks": chunks, "delay": 0.005}, headers=headers
        ) as response:
            lines = [json.loads(line) async for line in response.aiter_lines() if line]

        assert response.status_code == 200
        assert [line["chunk"] for line in lines] == list(range(chunks))
        assert {(line["user_id"], line["request_id"]) for line in lines} == {
            (user_id, f"req-{user_id}")
        }
        assert all(line["scope_open"] for line in lines)
        assert await server.settled() == SETTLED
        log = server.request_log(f"req-{user_id}")
        assert log.outcome == "ok"
        assert [what for what, _ in log.marks] == [f"chunk {i}" for i in range(chunks)] + ["closed"]
        assert log.marks[-1][1] >= log.marks[-2][1]

    async def test_client_disconnect_closes_the_scope(self, server, prefix):
        """
        When the client leaves in the middle of a long stream, the server stops
        producing it and closes the request's scope as failed (so a session
        would roll back) within seconds, and holds nothing afterwards.
        """
        user_id = f"{prefix}-gone"
        request_id = f"req-{user_id}"
        headers = auth(user_id, **{"x-request-id": request_id})
        params = {"chunks": 10_000, "delay": 0.01}  # 100 s if the client stayed
        status, lines = await anyio.to_thread.run_sync(
            read_and_leave, server, "/stream", params, headers, 3
        )

        assert status == 200
        assert [line["user_id"] for line in lines] == [user_id] * 3
        assert await server.settled(timeout=5) == SETTLED
        log = server.request_log(request_id)
        assert log.outcome.startswith("failed")
        assert log.marks[-1][0] == "closed"
        assert 3 <= len(log.marks) - 1 < 10_000


class TestWebSocket:
    async def test_events_reach_only_their_user(self, server, http, prefix):
        """
        Two users, each with a WebSocket open, each run the agent twice at the
        same time as the other: once to completion, once with a failing tool.
        Each socket gets exactly its user's ten events, in order, numbered 1 to
        10 in that user's stream, with the run id of their run, and none of the
        other's.
        """
        users = [f"{prefix}-a", f"{prefix}-b"]
        sockets = {}
        received = {}
        runs = {}

        async def run_twice(user_id):
            ok = await http.post("/runs", json={"step_delay": 0.01}, headers=auth(user_id))
            failed = await http.post(
                "/runs", json={"fail": True, "step_delay": 0.01}, headers=auth(user_id)
            )
            runs[user_id] = [ok.json(), failed.json()]

        async def receive(user_id):
            received[user_id] = await anyio.to_thread.run_sync(
                receive_events, sockets[user_id], len(SUCCEEDED) + len(FAILED)
            )

        opened = contextlib.ExitStack()
        try:
            for user_id in users:
                sockets[user_id] = await anyio.to_thread.run_sync(
                    opened.enter_context, connect_events(server, user_id)
                )
            async with anyio.create_task_group() as tg:
                for user_id in users:
                    tg.start_soon(run_twice, user_id)
                    tg.start_soon(receive, user_id)
        finally:
            await anyio.to_thread.run_sync(opened.close)

        for user_id, other in (users, users[::-1]):
            ok, failed = runs[user_id]
            assert (ok["status"], failed["status"]) == ("completed", "failed")
            events = received[user_id]
            assert [e["type"] for e in events] == SUCCEEDED + FAILED
            assert [e["run_id"] for e in events] == [ok["run_id"]] * 6 + [failed["run_id"]] * 4
            assert {e["user_id"] for e in events} == {user_id}
            assert sum(e["user_id"] == other for e in events) == 0
            assert [e["seq"] for e in events] == list(range(1, 11))
        assert await server.settled() == SETTLED

    async def test_handshake_without_token_is_refused(self, server):
        """
        A WebSocket handshake without a token is refused with 401 and the
        documented problem document, before any event could flow.
        """

        def handshake():
            with connect(f"{server.ws_url}/ws", proxy=None, open_timeout=5):
                pass

        with pytest.raises(InvalidStatus) as e:
            await anyio.to_thread.run_sync(handshake)

        response = e.value.response
        body = json.loads(response.body)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert (body["status"], body["error"]) == (401, "unauthenticated")
        assert body["request_id"] == response.headers["x-request-id"]


class TestErrors:
    async def test_401_without_a_bearer_token(self, http):
        """
        No Authorization header, or another scheme than Bearer: 401 with a
        challenge and a problem document (RFC 9457) with the request id.
        """
        for headers in ({}, {"authorization": "Basic dTpw"}, {"authorization": "Bearer"}):
            response = await http.get("/whoami", headers={**headers, "x-request-id": "req-401"})

            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json() == {
                "type": "about:blank",
                "title": "Unauthorized",
                "status": 401,
                "detail": "Send an `Authorization: Bearer <token>` header.",
                "error": "unauthenticated",
                "request_id": "req-401",
            }

    async def test_400_for_an_invalid_id(self, http):
        """
        An id that breaks the rules (a placeholder such as "null") is refused
        with 400 and a problem document naming the field.
        """
        cases = [
            ({"authorization": "Bearer null"}, "user_id"),
            (auth("u-1", **{"x-thread-id": "undefined"}), "thread_id"),
            (auth("u-1", **{"x-run-id": "n/a"}), "run_id"),
        ]
        for headers, field in cases:
            response = await http.get("/whoami", headers=headers)

            body = response.json()
            assert response.status_code == 400
            assert set(body) == {
                "type",
                "title",
                "status",
                "error",
                "field",
                "detail",
                "request_id",
            }
            assert (body["error"], body["field"]) == ("invalid_context", field)
            assert "placeholder" in body["detail"]
            assert body["request_id"] == response.headers["x-request-id"]

    async def test_api_docs_need_no_token(self, http):
        """
        The API docs are exempt from authentication: ``/docs`` and
        ``/openapi.json`` load in a browser, and the document shows the bearer
        scheme and the problem responses.
        """
        docs = await http.get("/docs")
        schema = await http.get("/openapi.json")

        assert docs.status_code == 200
        assert "swagger-ui" in docs.text
        assert schema.status_code == 200
        document = schema.json()
        assert document["components"]["securitySchemes"] == {
            "bearerAuth": {"type": "http", "scheme": "bearer"}
        }
        run = document["paths"]["/runs"]["post"]
        assert run["security"] == [{"bearerAuth": []}]
        assert {"401", "400", "429"} <= set(run["responses"])

    async def test_429_for_a_third_run_at_once(self, server, http, prefix):
        """
        A user may run the agent twice at once: a third run is refused at once
        with 429, a Retry-After header and the documented problem document, while the
        two runs go on and complete, and another user runs meanwhile. The
        refused run creates no engine and takes no slot.
        """
        user_id = f"{prefix}-busy"
        factory = server.service.factory

        def running():
            return dict(factory.stats().top).get(user_id, 0)

        def counters():
            stats = factory.stats()
            return stats.created, stats.quota.rejected, factory.quota.stats().granted

        async def run(results):
            response = await http.post("/runs", json={"step_delay": 0.5}, headers=auth(user_id))
            results.append(response)

        results = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, results)
            tg.start_soon(run, results)
            with anyio.fail_after(5):
                while server.call(running) < 2:  # noqa: ASYNC110  # another thread's state
                    await anyio.sleep(0.005)
            created, rejected, granted = server.call(counters)
            third = await http.post(
                "/runs", json={}, headers=auth(user_id, **{"x-request-id": "req-third"})
            )
            assert server.call(counters) == (created, rejected + 1, granted)
            assert server.call(running) == 2
            other = await http.post("/runs", json={}, headers=auth(f"{prefix}-other"))

        assert third.status_code == 429
        assert third.headers["retry-after"] == "1"
        assert third.headers["content-type"] == "application/problem+json"
        assert third.json() == {
            "type": "about:blank",
            "title": "Too Many Requests",
            "status": 429,
            "detail": "Too many of your requests are running at once (the limit is 2). "
            "Retry after 1 s.",
            "error": "quota_exceeded",
            "retry_after": 1,
            "request_id": "req-third",
        }
        assert other.status_code == 200
        assert [r.json()["status"] for r in results] == ["completed", "completed"]
        assert await server.settled() == SETTLED


# The kinds of request of Caller, and the statuses each may get.
KINDS = {
    "whoami": {200},
    "add_note": {201},
    "list_notes": {200},
    "list_runs": {200},
    "run": {200, 429},
    "failing_run": {200, 429},
    "stream": {200},
    "abandoned_stream": {200},
    "no_token": {401},
    "bad_id": {400},
}


class Caller:
    """
    A client making requests of every kind for its users, that checks every
    user id in the responses.
    """

    def __init__(self, server, http):
        self.server = server
        self.http = http
        self.statuses = {kind: [] for kind in KINDS}
        self.notes_written = {}
        self.foreign = []  # user ids found in a response to another user

    async def request(self, kind, user_id):
        self.statuses[kind].append(await getattr(self, kind)(user_id))

    def unexpected(self):
        """
        Return the kinds of request that got a status they should not have.
        """
        return {
            kind: sorted(set(got) - KINDS[kind])
            for kind, got in self.statuses.items()
            if set(got) - KINDS[kind]
        }

    def check(self, user_id, rows):
        self.foreign += [row["user_id"] for row in rows if row["user_id"] != user_id]

    async def whoami(self, user_id):
        response = await self.http.get("/whoami", headers=auth(user_id))
        self.check(user_id, [response.json()])
        return response.status_code

    async def add_note(self, user_id):
        response = await self.http.post("/notes", json={"text": "hi"}, headers=auth(user_id))
        self.check(user_id, [response.json()])
        self.notes_written[user_id] = self.notes_written.get(user_id, 0) + 1
        return response.status_code

    async def list_notes(self, user_id):
        response = await self.http.get("/notes", headers=auth(user_id))
        self.check(user_id, response.json())
        return response.status_code

    async def list_runs(self, user_id):
        response = await self.http.get("/runs", headers=auth(user_id))
        self.check(user_id, response.json())
        return response.status_code

    async def run(self, user_id, *, fail=False):
        response = await self.http.post("/runs", json={"fail": fail}, headers=auth(user_id))
        if response.status_code == 200:
            self.check(user_id, [response.json()])
            assert response.json()["status"] == ("failed" if fail else "completed")
        return response.status_code

    async def failing_run(self, user_id):
        return await self.run(user_id, fail=True)

    async def stream(self, user_id):
        params = {"chunks": 3, "delay": 0.005}
        async with self.http.stream("GET", "/stream", params=params, headers=auth(user_id)) as r:
            lines = [json.loads(line) async for line in r.aiter_lines() if line]
        self.check(user_id, lines)
        return r.status_code

    async def abandoned_stream(self, user_id):
        params = {"chunks": 1_000, "delay": 0.005}
        status, lines = await anyio.to_thread.run_sync(
            read_and_leave, self.server, "/stream", params, auth(user_id), 2
        )
        self.check(user_id, lines)
        return status

    async def no_token(self, _user_id):
        return (await self.http.get("/notes")).status_code

    async def bad_id(self, user_id):
        headers = auth(user_id, **{"x-thread-id": "null"})
        return (await self.http.get("/notes", headers=headers)).status_code


class TestNoLeaks:
    async def test_mixed_requests_leave_nothing_behind(self, server, http, prefix):
        """
        500 requests of 10 kinds by 7 users at once (reads, writes, agent runs
        completed, failed and refused, streams read to the end and abandoned,
        refused credentials): each answers as documented, and afterwards the
        server holds 0 open scopes, resources, engines, quota slots and
        database connections. Every user then sees exactly the notes they
        wrote, and none of another user.
        """
        users = [f"{prefix}-{u}" for u in range(7)]
        caller = Caller(server, http)
        kinds = list(KINDS)

        def rejected():
            return server.service.factory.stats().quota.rejected

        rejected_before = server.call(rejected)
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(caller.request, kinds[i % len(kinds)], users[i % len(users)])

        assert sum(map(len, caller.statuses.values())) == 500
        assert caller.unexpected() == {}
        assert caller.foreign == []
        refused = caller.statuses["run"].count(429) + caller.statuses["failing_run"].count(429)
        assert server.call(rejected) - rejected_before == refused
        assert await server.settled() == SETTLED

        for user_id in users:
            notes = (await http.get("/notes", headers=auth(user_id))).json()
            assert len(notes) == caller.notes_written[user_id]
            assert {note["user_id"] for note in notes} == {user_id}
        assert sum(caller.notes_written.values()) == 50
        assert await server.settled() == SETTLED


@contextlib.contextmanager
def concurrent_writers(server):
    """
    Yield a list that gets, at each write statement the server's database
    runs, how many connections are between their first write and their
    commit or rollback.
    """
    writing, counts = set(), []

    def before_execute(conn, _cursor, statement, *_args):
        if statement.lstrip()[:6].upper() in {"INSERT", "UPDATE", "DELETE"}:
            writing.add(id(conn))
            counts.append(len(writing))

    def ended(conn):
        writing.discard(id(conn))

    listeners = [("before_cursor_execute", before_execute), ("commit", ended), ("rollback", ended)]
    engine = server.service.engine.sync_engine
    for name, fn in listeners:
        server.call(event.listen, engine, name, fn)
    try:
        yield counts
    finally:
        for name, fn in listeners:
            server.call(event.remove, engine, name, fn)


class TestWriteTurns:
    async def test_one_writer_at_a_time_on_sqlite(self, server, http, prefix):
        """
        On SQLite, 10 users writing 6 notes and running the agent twice, all
        at once: at most one database connection at a time is between its
        first write and its commit or rollback (so no write waits on SQLite's
        lock, and no commit waits for another request), every request
        succeeds, and every note is saved.
        """
        users = [f"{prefix}-w{u}" for u in range(10)]
        statuses = []

        async def write(user_id, path, body):
            response = await http.post(path, json=body, headers=auth(user_id))
            statuses.append(response.status_code)

        with concurrent_writers(server) as counts:
            async with anyio.create_task_group() as tg:
                for user_id in users:
                    for i in range(6):
                        tg.start_soon(write, user_id, "/notes", {"text": f"note {i}"})
                    for _ in range(2):
                        tg.start_soon(write, user_id, "/runs", {})

        assert sorted(statuses) == [200] * 20 + [201] * 60
        assert len(counts) == 80
        assert max(counts) == 1
        for user_id in users:
            notes = (await http.get("/notes", headers=auth(user_id))).json()
            assert len(notes) == 6
        assert await server.settled() == SETTLED


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(name="pg_url", scope="module")
def _pg_url(postgres_url):
    """
    The URL of the test PostgreSQL, from the repository's ``postgres_url``
    fixture.
    """
    pytest.importorskip("asyncpg")
    pytest.importorskip("psycopg")
    return make_url(postgres_url)


@pytest.fixture(name="pg_server")
def _pg_server(pg_url):
    """
    The service on PostgreSQL (asyncpg), its tables in a schema unique to the
    test, and a psycopg engine to look at them; the schema is dropped
    afterwards.
    """
    schema = f"agent_service_{os.urandom(5).hex()}"
    url = pg_url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    admin = create_engine(pg_url.set(drivername="postgresql+psycopg"))
    try:
        with LiveServer(agent_service.create_app(url, db_schema=schema)) as server:
            yield server, admin, schema
    finally:
        with admin.begin() as conn:
            conn.execute(DropSchema(schema, cascade=True, if_exists=True))
        admin.dispose()


class TestPostgreSQL:
    async def test_rows_are_per_user(self, pg_server):
        """
        On PostgreSQL, 10 users writing 5 notes and running the agent once
        each, all at once: the tables hold exactly each user's 5 notes and 1
        run, each row under the user whose request wrote it, and each user
        lists only their own.
        """
        server, admin, schema = pg_server
        users = [f"pg-{os.urandom(3).hex()}-{u}" for u in range(10)]
        written = {}  # request id -> the user who sent it

        async def work(client, user_id):
            for i in range(5):
                response = await client.post(
                    "/notes", json={"text": f"note {i}"}, headers=auth(user_id)
                )
                assert response.status_code == 201
                written[response.headers["x-request-id"]] = user_id
            response = await client.post("/runs", json={}, headers=auth(user_id))
            assert response.status_code == 200
            written[response.headers["x-request-id"]] = user_id

        async with httpx2.AsyncClient(base_url=server.url, timeout=30, trust_env=False) as client:
            async with anyio.create_task_group() as tg:
                for user_id in users:
                    tg.start_soon(work, client, user_id)
            listed = {}
            for user_id in users:
                listed[user_id] = (await client.get("/notes", headers=auth(user_id))).json()
        assert await server.settled() == SETTLED

        notes, runs = agent_service.Note, agent_service.Run
        query = union_all(
            select(notes.user_id, notes.request_id), select(runs.user_id, runs.request_id)
        )
        with admin.connect().execution_options(schema_translate_map={None: schema}) as conn:
            rows = conn.execute(query).all()
        assert len(rows) == 60
        assert sorted(map(tuple, rows)) == sorted(
            (user_id, request_id) for request_id, user_id in written.items()
        )
        for user_id in users:
            assert len(listed[user_id]) == 5
            assert {note["user_id"] for note in listed[user_id]} == {user_id}

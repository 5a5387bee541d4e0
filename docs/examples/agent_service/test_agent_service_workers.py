"""
The agent service on several workers sharing one Redis.

Each test starts the service with ``AGENT_SERVICE_REDIS_URL`` set, as a user
deploys it: ``uvicorn app:app`` processes from the command line, either two of
them on two ports (so that a test decides which worker serves what) or one with
``--workers 2``. The quota of runs and the users' event streams then hold
across the workers. Redis is a database of the test server of its own (the
``redis_db`` fixture of the repository's ``conftest.py``); the tests are
skipped without one, unless ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from pathlib import Path

import anyio
import pytest


pytest.importorskip("aiosqlite")
pytest.importorskip("fastapi")
pytest.importorskip("httpx2")
pytest.importorskip("redis")
pytest.importorskip("sqlalchemy")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

import httpx2

from websockets.sync.client import connect


pytestmark = [pytest.mark.anyio, pytest.mark.server("uvicorn")]

HERE = Path(__file__).resolve().parent
SUCCEEDED = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_thinking",
    "agent_completed",
]
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Uvicorn:
    """
    ``uvicorn app:app`` in a process of its own on a free port, started from
    the example's folder with the service's Redis in its environment.
    """

    def __init__(self, redis_url: str, *options: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        env = {**os.environ, "AGENT_SERVICE_REDIS_URL": redis_url}
        env.pop("AGENT_SERVICE_DATABASE_URL", None)
        self.process = subprocess.Popen(  # noqa: S603  # our interpreter, the example app
            [
                sys.executable,
                *("-m", "uvicorn", "app:app", "--host", "127.0.0.1"),
                *("--port", str(self.port), "--log-level", "warning", *options),
            ],
            cwd=HERE,
            env=env,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "uvicorn exited at startup"
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{self.url}/openapi.json", timeout=1, trust_env=False).is_success:
                    return
            time.sleep(0.05)
        pytest.fail(f"uvicorn did not answer within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def serving(redis_url: str, *instances: tuple[str, ...]):
    servers = [Uvicorn(redis_url, *options) for options in instances]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def auth(user_id: str) -> dict[str, str]:
    return {"authorization": f"Bearer {user_id}"}


async def run_at_once(urls: list[str], user_id: str, step_delay: float) -> list[int]:
    """
    Start one run of *user_id* on each of *urls* at once; return the statuses.
    """
    statuses: list[int] = []

    async def run(url: str) -> None:
        async with httpx2.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
            response = await client.post(
                "/runs", json={"step_delay": step_delay}, headers=auth(user_id)
            )
            statuses.append(response.status_code)

    async with anyio.create_task_group() as tg:
        for url in urls:
            tg.start_soon(run, url)
    return sorted(statuses)


class TestTwoInstances:
    async def test_the_quota_holds_across_instances(self, redis_db):
        """
        Six runs of one user at once, three on each instance, with 2 runs
        allowed per user: exactly 2 are admitted and 4 refused with 429, where
        two instances with quotas of their own would admit 4.
        """
        with serving(redis_db, (), ()) as (a, b):
            statuses = await run_at_once([a.url] * 3 + [b.url] * 3, "u-busy", 1.0)
            # The slots are given back: the next two runs are admitted.
            again = await run_at_once([a.url, b.url], "u-busy", 0.0)

        assert statuses == [200, 200, 429, 429, 429, 429]
        assert again == [200, 200]

    async def test_a_websocket_gets_the_runs_of_the_other_instance(self, redis_db):
        """
        A WebSocket on instance A receives, in order and once, every event of
        runs served by instance B; and a client that reconnects to B resumes
        after the last seq it saw on A.
        """
        with serving(redis_db, (), ()) as (a, b):

            def receive(count: int, last_seq: int) -> list[dict[str, object]]:
                events: list[dict[str, object]] = []
                with connect(
                    f"{a.ws_url}/ws?last_seq={last_seq}",
                    additional_headers=auth("u-watch"),
                    proxy=None,
                    open_timeout=5,
                ) as ws:
                    ready.set()
                    while len(events) < count:
                        events += json.loads(ws.recv(timeout=10))
                return events

            ready = threading.Event()
            async with anyio.create_task_group() as tg:
                result: list[list[dict[str, object]]] = []

                async def watch() -> None:
                    result.append(await anyio.to_thread.run_sync(receive, 12, 0))

                tg.start_soon(watch)
                await anyio.to_thread.run_sync(ready.wait, 5)
                await run_at_once([b.url], "u-watch", 0.0)
                await run_at_once([b.url], "u-watch", 0.0)
            (events,) = result

            # Reconnect to the other instance after the 6th event.
            with connect(
                f"{b.ws_url}/ws?last_seq={events[5]['seq']}",
                additional_headers=auth("u-watch"),
                proxy=None,
                open_timeout=5,
            ) as ws:
                resumed: list[dict[str, object]] = []
                while len(resumed) < 6:
                    resumed += json.loads(ws.recv(timeout=10))

        assert [e["type"] for e in events] == SUCCEEDED * 2
        assert [e["seq"] for e in events] == list(range(1, 13))
        assert {e["user_id"] for e in events} == {"u-watch"}
        assert resumed == events[6:]


class TestWorkers:
    async def test_uvicorn_workers_share_the_quota(self, redis_db):
        """
        Under ``uvicorn --workers 2``, six runs of one user at once on six
        connections admit exactly 2, whichever worker each lands on.
        """
        with serving(redis_db, ("--workers", "2")) as (server,):
            statuses = await run_at_once([server.url] * 6, "u-workers", 1.0)

        assert statuses == [200, 200, 429, 429, 429, 429]

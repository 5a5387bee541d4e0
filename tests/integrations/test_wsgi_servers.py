"""
Tests of `usercontext.wsgi.UserContextMiddleware` under real threaded WSGI
servers, with real HTTP clients.

Each server runs in a process of its own on a free port of 127.0.0.1, serving
``wsgi_apps.application``: a Flask app and a Django view, each behind the
middleware, and ``/stats``, what the server process counted (cross-user
observations, Contexts left behind, sessions opened, committed and rolled
back, scopes still open, engines held). The servers are gunicorn with its
threaded worker (``gthread``) and waitress, both with 16 threads, so each
thread serves request after request.

A server whose package is missing is skipped, unless ``CI=true``, where that
fails the run (see the ``server`` marker in the root conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import re
import socket
import struct
import subprocess
import sys
import time

from pathlib import Path

import pytest


pytest.importorskip("flask", reason="flask is not installed: pip install flask")
pytest.importorskip("django", reason="django is not installed: pip install django")
pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")

import httpx2


HERE = Path(__file__).resolve().parent
# Every bound on a wait, in seconds: the tests never hang.
TIMEOUT = 20.0
THREADS = 16
USERS = 20
REQUESTS_PER_USER = 20
FRAMEWORKS = ("flask", "django")


def _gunicorn_command() -> list[str]:
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--worker-class",
        "gthread",
        "--threads",
        str(THREADS),
        "--error-logfile",
        "-",
    ]
    from gunicorn.config import KNOWN_SETTINGS

    if any("--no-control-socket" in (setting.cli or ()) for setting in KNOWN_SETTINGS):
        # Newer releases open a control socket, at one path per user of the
        # machine: none for a test server.
        command.append("--no-control-socket")
    return [*command, "wsgi_apps:application"]


SERVERS = {
    "gunicorn-gthread": _gunicorn_command,
    "waitress": (
        lambda: [
            sys.executable,
            "-m",
            "waitress",
            "--listen=127.0.0.1:0",
            f"--threads={THREADS}",
            "wsgi_apps:application",
        ]
    ),
}
_LISTENING = re.compile(r"(?:Listening at:|Serving on) http://127\.0\.0\.1:(\d+)")


class Server:
    """
    A WSGI server process serving ``wsgi_apps.application``.
    """

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.log = tmp_path / f"{name}.log"
        command = SERVERS[name]()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(  # noqa: S603  # our interpreter, our app
                command, cwd=HERE, stdout=out, stderr=subprocess.STDOUT
            )
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"{self.name} did not start:\n{self.log.read_text(errors='replace')}")

    def stats(self) -> dict:
        return httpx2.get(f"{self.url}/stats", timeout=TIMEOUT).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover  # a server that hangs
            self.process.kill()
            self.process.wait()


@pytest.fixture(name="server", params=list(SERVERS), scope="module")
def _server(request, tmp_path_factory):
    server = Server(request.param, tmp_path_factory.mktemp(request.param))
    yield server
    server.stop()


@pytest.fixture(name="client")
def _client(server):
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx2.Client(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
        yield client


def bearer(user_id: str, **more: str) -> dict[str, str]:
    return {"authorization": f"Bearer {user_id}", **more}


def wait_for(server: Server, check) -> dict:
    """
    Return the server's stats once *check* holds for them (the server may
    still be cleaning up after a response was read), or fail.
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        stats = server.stats()
        if check(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


@pytest.mark.server("gunicorn", "waitress", "flask", "django")
class TestIsolationUnderLoad:
    def test_twenty_users_twenty_requests_each(self, server, client):
        """
        20 users send 20 requests each to both frameworks, all at once, from
        64 client threads over keep-alive connections; the server's 16 threads
        each serve many of them. Every request sees its own user in
        `usercontext.current()`, its session and its engine, before and after
        a pause in which the others run: 0 cross-user observations, 0 requests
        that find what an earlier one left in their thread, every session
        committed, 0 scopes open after, and no user ever held more than its 2
        engines of the ThreadQuota.
        """
        before = server.stats()
        jobs = [
            (framework, f"u-{user}")
            for _ in range(REQUESTS_PER_USER)
            for user in range(USERS)
            for framework in FRAMEWORKS
        ]

        def call(job):
            framework, user_id = job
            response = client.get(f"/{framework}/whoami", headers=bearer(user_id))
            return user_id, response

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(call, jobs))

        statuses = {response.status_code for _, response in results}
        assert statuses == {200}
        wrong = [
            (user_id, response.json())
            for user_id, response in results
            if set(response.json()["seen"]) != {user_id} or response.json()["user"] != user_id
        ]
        assert wrong == []
        ids = {response.headers["x-request-id"] for _, response in results}
        assert len(ids) == len(jobs)  # one id per request, as the body says
        assert all(r.headers["x-request-id"] == r.json()["request_id"] for _, r in results)

        after = wait_for(server, lambda s: s["commits"] - before["commits"] == len(jobs))
        served = after["requests"] - before["requests"]
        print(  # noqa: T201  # the figures, with -s
            f"{server.name}: {served} requests on {after['threads']} threads, "
            f"cross-user {after['cross_user']}, left behind {after['leaks']}, "
            f"open scopes {after['open_scopes']}, engine peak per user {after['engine_peak']}"
        )
        assert served == len(jobs) == 800
        assert after["cross_user"] == 0
        assert after["leaks"] == 0
        assert after["threads"] <= THREADS < served  # threads were reused
        # A session per request, each committed (closed without an error).
        assert after["opened"] - before["opened"] == len(jobs)
        assert after["commits"] - before["commits"] == len(jobs)
        assert after["rollbacks"] == before["rollbacks"]
        assert after["open_scopes"] == 0
        assert after["engines_in_use"] == after["quota_in_use"] == 0
        assert 1 <= after["engine_peak"] <= 2
        assert after["bound_outside"] is False


@pytest.mark.server("gunicorn", "waitress", "flask", "django")
@pytest.mark.parametrize("framework", FRAMEWORKS)
class TestRefusals:
    @pytest.mark.parametrize(
        ("headers", "status", "error"),
        [
            ({}, 401, "unauthenticated"),
            (bearer("u-1", **{"x-thread-id": "undefined"}), 400, "invalid_context"),
            (bearer("u-banned"), 403, "forbidden"),
            (bearer("u-1", **{"x-load": "high"}), 429, "too_many_requests"),
            (bearer("u-1", **{"x-maintenance": "1"}), 503, "service_unavailable"),
        ],
        ids=["401", "400", "403", "429", "503"],
    )
    def test_refusal(self, server, client, framework, headers, status, error):  # noqa: PLR0913, PLR0917  # parameters
        """
        A refused request gets its status and a problem document carrying the
        request id, which is also in the response's header; the view never
        runs, and no scope is opened.
        """
        before = server.stats()
        response = client.get(
            f"/{framework}/whoami", headers={**headers, "x-request-id": f"req-{status}"}
        )
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["status"] == status
        assert body["error"] == error
        assert body["request_id"] == response.headers["x-request-id"] == f"req-{status}"
        if status == 401:
            assert response.headers["www-authenticate"] == "Bearer"
        if status == 400:
            assert body["field"] == "thread_id"
        if status in {429, 503}:
            assert response.headers["retry-after"] == str(body["retry_after"])
        after = server.stats()
        assert after["requests"] == before["requests"]
        assert after["opened"] == before["opened"]

    def test_exempt_path(self, server, client, framework):
        """
        An exempt path is served without credentials and with no user bound,
        and its response still carries a request id; a path that is not
        exempt is refused.
        """
        response = client.get(f"/{framework}/health")
        assert response.json() == {"ok": True, "user": None}
        assert len(response.headers["x-request-id"]) == 32
        assert client.get(f"/{framework}/whoami").status_code == 401

    def test_resolver_returning_none(self, server, client, framework):
        """
        A request the resolver lets through with no user reaches the view
        with nothing bound.
        """
        response = client.get(f"/{framework}/health", headers=bearer("u-anonymous"))
        assert response.json() == {"ok": True, "user": None}


@pytest.mark.server("gunicorn", "waitress", "flask", "django")
@pytest.mark.parametrize("framework", FRAMEWORKS)
class TestResponses:
    def test_streaming_response(self, server, client, framework):
        """
        Every chunk of a streamed response runs under the request's user, with
        its session; the session is committed once the stream is over.
        """
        before = server.stats()
        response = client.get(f"/{framework}/stream", params={"n": 5}, headers=bearer("u-s"))
        assert response.status_code == 200
        assert response.text.splitlines() == [f"{i} u-s u-s" for i in range(5)]
        after = wait_for(server, lambda s: s["commits"] > before["commits"])
        assert after["commits"] == before["commits"] + 1
        assert after["rollbacks"] == before["rollbacks"]
        assert after["open_scopes"] == 0

    def test_client_leaving_a_stream(self, server, framework):
        """
        A client that leaves in the middle of a long stream has its request's
        session rolled back (with a ConnectionError) once the server notices,
        and the scope closed.
        """
        before = server.stats()
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.sendall(
                f"GET /{framework}/stream?n=2000&pause=0.005 HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nAuthorization: Bearer u-gone\r\n\r\n".encode()
            )
            first = sock.recv(4096)
            assert first.startswith(b"HTTP/1.1 200")
            # Reset the connection rather than close it: the server's next
            # write fails at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        after = wait_for(server, lambda s: len(s["rollbacks"]) > len(before["rollbacks"]))
        assert after["rollbacks"][len(before["rollbacks"]) :] == ["_DisconnectedError"]
        assert after["commits"] == before["commits"]
        assert after["open_scopes"] == 0

    def test_view_that_raises(self, server, client, framework):
        """
        A view that raises gets a 500 problem document with the request id,
        and its session is rolled back with the view's exception.
        """
        before = server.stats()
        response = client.get(
            f"/{framework}/broken", headers=bearer("u-1", **{"x-request-id": "req-500"})
        )
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["error"] == "internal_error"
        assert response.json()["request_id"] == response.headers["x-request-id"] == "req-500"
        after = wait_for(server, lambda s: len(s["rollbacks"]) > len(before["rollbacks"]))
        assert after["rollbacks"][len(before["rollbacks"]) :] == ["LookupError"]
        assert after["open_scopes"] == 0


@pytest.mark.server("gunicorn", "waitress", "flask", "django")
class TestStripContextHeaders:
    def test_stripped_at_the_edge(self, server, client):
        """
        The Flask app faces clients (``strip_context_headers=True``): a
        client's ``x-usercontext-user-id`` is dropped before the resolver
        reads it, so it cannot claim a user, and the app sees neither that
        header nor the ``usercontext.*`` members of its baggage.
        """
        claim = {"x-usercontext-user-id": "u-admin"}
        assert client.get("/flask/peer", headers=claim).status_code == 401
        headers = {
            **bearer("u-1"),
            **claim,
            "baggage": "usercontext.user_id=u-admin,tenant=acme",
        }
        response = client.get("/flask/peer", headers=headers)
        assert response.json() == {"user": "u-1", "context_headers": [], "baggage": "tenant=acme"}

    def test_kept_between_trusted_services(self, server, client):
        """
        The Django app sits behind a trusted peer (the option is off): the
        peer's ``x-usercontext-user-id`` reaches the resolver and the view.
        """
        headers = {"x-usercontext-user-id": "u-7", "baggage": "usercontext.user_id=u-7"}
        response = client.get("/django/peer", headers=headers)
        assert response.json() == {
            "user": "u-7",
            "context_headers": ["HTTP_X_USERCONTEXT_USER_ID"],
            "baggage": "usercontext.user_id=u-7",
        }

"""
What the tests of `usercontext.wsgi` share: a threaded wsgiref server on a
free port of 127.0.0.1, a registry of sessions that log their commits and
rollbacks, a resolver and a small WSGI application.
"""

from __future__ import annotations

import json
import socketserver
import threading
import wsgiref.simple_server

from typing import Any

import pytest

import usercontext as uc

from usercontext.wsgi import UserContextMiddleware, request_state


TIMEOUT = 10.0


class _ThreadingServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(name="serve")
def _serve():
    """
    Serve a WSGI application with a threaded wsgiref server; return its URL.
    """
    servers = []

    def serve(app) -> str:
        server = wsgiref.simple_server.make_server(
            "127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@pytest.fixture(name="log")
def _log():
    return []


@pytest.fixture(name="registry")
def _registry(log):
    """
    A registry of one "session" per request, which commits when its request
    succeeded (and fails to when the request says so), and rolls back when it
    failed.
    """
    registry = uc.Registry()

    def open_session(ctx):
        state = {"fail": False}
        log.append(f"open {ctx.user_id}")
        try:
            yield state
        except BaseException as e:
            log.append(f"rollback {ctx.user_id} {type(e).__name__}")
            raise
        if state["fail"]:
            log.append(f"failed commit {ctx.user_id}")
            msg = "the database went away"
            raise OSError(msg)
        log.append(f"commit {ctx.user_id}")

    registry.register("session", open_session)
    return registry


def resolve(environ) -> uc.UserContext | None:
    user_id = environ.get("HTTP_X_USER", "")
    if not user_id:
        raise uc.UnauthenticatedError("Send x-user.")
    if user_id == "anonymous":
        return None
    return uc.UserContext(user_id=user_id, thread_id="t-1", run_id="r-1")


def whoami(environ, start_response):
    state = request_state(environ)
    if state.resources is not None:
        state.resources.get("session")
    body = json.dumps({"user": uc.current().user_id, "request_id": uc.current().request_id})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]


def wrap(app, registry=None, **options) -> UserContextMiddleware:
    return UserContextMiddleware(app, resolver=resolve, registry=registry, **options)


def problem(response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    return body

"""
Benchmarks of `usercontext.wsgi.UserContextMiddleware`: what it adds to every
request of a bare WSGI app, beside the same work written by hand.

The app is the least a WSGI app can be: a status, a Content-Length and a
one-item list. Requests are driven in-process as a server would (a copy of a
prepared environ, ``start_response``, the body iterated, then closed: no
sockets), and every timed call serves ``BATCH`` (1,000) requests, so a time
per call read one unit down is the time per request: milliseconds as
microseconds.

- The floor: the bare app.
- By hand: the least a service could write for the same isolation: read the
  user from a header, make a `UserContext`, run the request in a copy of the
  Context with it bound and a registry scope open (``with``), close the scope
  after the body, add the request id header.
- Ours: ``UserContextMiddleware(app, resolver=..., registry=...)``, which also
  holds the response until the scope is closed, checks the client's request
  id, answers refusals and crashes with problem documents, and runs every
  step of the response in the request's Context.

The ``interleaved`` benchmark times the three in turn within every call and
stores the overheads (time per request minus the floor's) and their ratio in
``extra_info``. It asserts nothing about speed.
"""

from __future__ import annotations

import contextvars
import statistics
import time

import pytest

import usercontext as uc

from usercontext.wsgi import UserContextMiddleware


BATCH = 1_000
BODY = b'{"ok":true}'
ENVIRON = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/whoami",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "HTTP_X_USER_ID": "u-42",
    "wsgi.url_scheme": "http",
}


def bare_app(environ, start_response):  # noqa: ARG001  # the WSGI signature
    """
    The floor: a status, a Content-Length, one body item.
    """
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")])
    return [BODY]


def resolve(environ):
    return uc.UserContext(user_id=environ["HTTP_X_USER_ID"], thread_id="t-1", run_id="r-1")


def _registry() -> uc.Registry:
    registry = uc.Registry()
    registry.register("session", lambda ctx: ctx.user_id)
    return registry


def by_hand(app, registry):
    """
    The same isolation written by hand, for a body in memory.
    """

    def serve(environ, start_response):
        ctx = resolve(environ)
        header = ("x-request-id", ctx.request_id)

        def start(status, headers, exc_info=None):
            return start_response(status, [*headers, header], exc_info)

        with registry.scope(ctx):  # binds ctx
            body = app(environ, start)
            try:
                chunks = list(body)
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        return chunks

    def middleware(environ, start_response):
        return contextvars.copy_context().run(serve, environ, start_response)

    return middleware


class _Client:
    """
    Serves a batch of requests to one app, as a WSGI server would.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.served = 0
        self.status = None
        self.headers = None

    def start_response(self, status, headers, exc_info=None):  # noqa: ARG002  # PEP 3333's
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data):  # pragma: no cover  # no app here writes
        raise AssertionError(data)

    def batch(self):
        app, start_response = self.app, self.start_response
        for _ in range(BATCH):
            body = app(dict(ENVIRON), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        self.served += BATCH

    def check(self, *, with_id: bool) -> None:
        assert self.status == "200 OK"
        names = [name.lower() for name, _ in self.headers]
        assert ("x-request-id" in names) is with_id


@pytest.mark.benchmark(group="wsgi: overheads interleaved")
def test_interleaved(benchmark):
    """
    The bare app, the same work by hand and ours, each timed over a batch in
    every call, in turn: the overheads and their ratio (best batches, and the
    median of the ratios within a call) are in ``extra_info``. Every scope
    opened was closed.
    """
    ours_registry, hand_registry = _registry(), _registry()
    clients = {
        "bare": _Client(bare_app),
        "by_hand": _Client(by_hand(bare_app, hand_registry)),
        "usercontext": _Client(
            UserContextMiddleware(bare_app, resolver=resolve, registry=ours_registry)
        ),
    }
    order = list(clients)
    times: dict[str, list[float]] = {kind: [] for kind in order}
    perf_counter_ns = time.perf_counter_ns

    def call():
        order.append(order.pop(0))  # each app goes first in turn
        for kind in order:
            started = perf_counter_ns()
            clients[kind].batch()
            times[kind].append((perf_counter_ns() - started) / BATCH)

    benchmark.extra_info["requests_per_call"] = 3 * BATCH
    benchmark(call)

    best = {kind: min(ts) for kind, ts in times.items()}
    ours, hand = best["usercontext"] - best["bare"], best["by_hand"] - best["bare"]
    pairs = [
        (u - b) / (h - b)
        for b, h, u in zip(times["bare"], times["by_hand"], times["usercontext"], strict=True)
        if h > b
    ]
    benchmark.extra_info.update(
        {
            "rounds": len(times["bare"]),
            "best_ns_per_request": best,
            "overhead_ns": ours,
            "by_hand_overhead_ns": hand,
            "overhead_ratio": ours / hand if hand > 0 else None,
            "median_round_ratio": statistics.median(pairs) if pairs else None,
        }
    )
    for kind, client in clients.items():
        client.check(with_id=kind != "bare")
    for registry, kind in ((ours_registry, "usercontext"), (hand_registry, "by_hand")):
        stats = registry.stats()
        assert (stats.scopes, stats.opened) == (0, clients[kind].served)

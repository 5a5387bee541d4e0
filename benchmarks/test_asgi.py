"""
Benchmarks of `usercontext.asgi.UserContextMiddleware` beside starlette-context's
`RawContextMiddleware`: what each adds to every request of a bare ASGI app.

The app is the least an ASGI app can be: one ``http.response.start`` with a
Content-Length and one ``http.response.body``. Requests are driven in-process
with a hand-made scope, ``receive`` and ``send`` (no server, no sockets), and
every timed call serves ``BATCH`` (1,000) requests, so a time per call read one
unit down is the time per request: milliseconds as microseconds.

*Overhead* is the time per request through a middleware minus the time of the
bare app (the floor). The target: our overhead, while also opening and closing
a registry scope for every request, is at most 1.0x starlette-context's.

- Ours: ``UserContextMiddleware(app, resolver=..., registry=...)``. The
  resolver builds a `UserContext` from the ``x-user-id`` header; the registry
  has one provider, and each request opens and closes a scope of it without
  asking for the resource (the bare app asks for nothing, and starlette-context
  has no scopes: what a resource costs is the registry's own benchmark).
  A variant passes ``isolate=False`` (no Context copy per request), as for a
  server that runs every request in a task of its own.
- starlette-context: ``RawContextMiddleware`` (its pure ASGI middleware) with
  ``RequestIdPlugin()`` and a plugin reading ``x-user-id``: the same work
  without the scope. Both take the request id from ``x-request-id`` or make
  one, keep it in a context variable for the request, and send it back in the
  response; both keep the user id from its header.

Each case is run twice: the client sends no request id (each middleware makes
one), and the client sends one (each takes and checks it). pytest-benchmark
times each benchmark on its own, so the overheads and their ratio stored in
``extra_info`` subtract minimums of separate runs; the ``interleaved``
benchmarks time the three apps in turn within every call and store the ratio
measured that way, which is the one to trust on a busy machine.

starlette-context is a benchmark-only dependency: without it its benchmarks,
and the interleaved ones, are skipped.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from typing import Any

import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware


BATCH = 1_000
BODY = b'{"ok":true}'
USER = b"u-42"
REQUEST_ID = uuid.uuid4().hex  # valid for both: starlette-context wants a UUID

# Every variant measured, by (kind, whether the client sends a request id):
# the best time per request, in ns, for the overheads in extra_info.
_BEST: dict[tuple[str, bool], float] = {}


async def bare_app(scope, receive, send):  # noqa: ARG001  # an ASGI app takes all three
    """
    The floor: one response start with a Content-Length, one body.
    """
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def _scope(*, sent_id: bool) -> dict[str, Any]:
    headers = [
        (b"host", b"testserver"),
        (b"user-agent", b"bench"),
        (b"accept", b"*/*"),
        (b"x-user-id", USER),
    ]
    if sent_id:
        headers.append((b"x-request-id", REQUEST_ID.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


async def _receive():
    return _REQUEST


class _Client:
    """
    Serves batches of requests to one app in-process and keeps the last
    response's messages, to check them.
    """

    def __init__(self, app, *, sent_id: bool) -> None:
        self.app = app
        self.base = _scope(sent_id=sent_id)
        self.sent: list[dict[str, Any]] = []
        self.served = 0

    async def _send(self, message):
        self.sent.append(message)

    async def batch(self, n: int = BATCH) -> None:
        app, base, receive, send = self.app, self.base, _receive, self._send
        for _ in range(n):
            # A fresh scope per request, as a server makes: middlewares write to it.
            await app(dict(base), receive, send)
        self.served += n
        del self.sent[:-2]

    def check(self, *, request_id: str | None) -> None:
        """
        Check that the last response is the app's, with the request id header.
        """
        start, body = self.sent
        assert start["status"] == 200
        assert body["body"] == BODY
        if request_id is not None:
            ids = [v for k, v in start["headers"] if k.lower() == b"x-request-id"]
            assert len(ids) == 1
            if request_id:
                assert ids[0] == request_id.encode()


def _resolve(scope):
    for name, value in scope["headers"]:
        if name == b"x-user-id":
            return uc.UserContext(
                user_id=value.decode("latin-1"), thread_id="t-web", run_id="r-web"
            )
    raise uc.UnauthenticatedError("Send the user id in the x-user-id header.")


class Session:
    """
    The registry's one resource (the benchmarks never ask for it).
    """


def _ours(app=bare_app, *, isolate=True):
    def session(_ctx):
        yield Session()

    registry = uc.Registry()
    registry.register(Session, session)
    middleware = UserContextMiddleware(app, resolver=_resolve, registry=registry, isolate=isolate)
    return middleware, registry


def _theirs(app=bare_app):
    pytest.importorskip("starlette_context")
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import Plugin, RequestIdPlugin

    class UserIdPlugin(Plugin):
        key = "x-user-id"

    return RawContextMiddleware(app, plugins=(RequestIdPlugin(), UserIdPlugin()))


@pytest.fixture(name="loop", scope="module")
def _loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _run(benchmark, loop, client: _Client, kind: str, *, sent_id: bool) -> None:
    benchmark.extra_info["requests_per_call"] = BATCH
    benchmark(lambda: loop.run_until_complete(client.batch()))
    if benchmark.stats:  # timed (with --benchmark-enable)
        _BEST[kind, sent_id] = per_request = benchmark.stats.stats.min / BATCH * 1e9
        benchmark.extra_info["best_ns_per_request"] = per_request
        bare = _BEST.get(("bare", sent_id))
        if kind != "bare" and bare is not None:
            benchmark.extra_info["overhead_ns"] = overhead = per_request - bare
            theirs = _BEST.get(("starlette_context", sent_id))
            if kind.startswith("usercontext") and theirs is not None:
                benchmark.extra_info["starlette_context_overhead_ns"] = theirs - bare
                benchmark.extra_info["overhead_ratio"] = overhead / (theirs - bare)


def _bare(benchmark, loop, *, sent_id: bool) -> None:
    client = _Client(bare_app, sent_id=sent_id)
    _run(benchmark, loop, client, "bare", sent_id=sent_id)
    client.check(request_id=None)


def _starlette_context(benchmark, loop, *, sent_id: bool) -> None:
    client = _Client(_theirs(), sent_id=sent_id)
    _run(benchmark, loop, client, "starlette_context", sent_id=sent_id)
    client.check(request_id=REQUEST_ID if sent_id else "")


def _usercontext(benchmark, loop, *, sent_id: bool, isolate: bool = True) -> None:
    middleware, registry = _ours(isolate=isolate)
    client = _Client(middleware, sent_id=sent_id)
    kind = "usercontext" if isolate else "usercontext_isolate_off"
    _run(benchmark, loop, client, kind, sent_id=sent_id)
    client.check(request_id=REQUEST_ID if sent_id else "")
    stats = registry.stats()
    assert (stats.scopes, stats.opened) == (0, client.served)


@pytest.mark.parametrize("sent_id", [False, True])
def test_same_work(loop, sent_id):
    """
    Not timed: inside the app, each middleware has the user id and the request
    id at hand (the client's when sent), and the response carries the id.
    """
    context = pytest.importorskip("starlette_context").context
    seen: list[tuple[str, str]] = []

    async def ours(scope, receive, send):
        ctx = uc.current()
        seen.append((ctx.user_id, ctx.request_id))
        await bare_app(scope, receive, send)

    async def theirs(scope, receive, send):
        seen.append((context["x-user-id"], context["X-Request-ID"]))
        await bare_app(scope, receive, send)

    for app in (_theirs(theirs), _ours(ours)[0]):
        client = _Client(app, sent_id=sent_id)
        loop.run_until_complete(client.batch(1))
        (user_id, request_id), *_ = seen
        headers = [(k.lower(), v) for k, v in client.sent[0]["headers"]]
        assert (b"x-request-id", request_id.encode()) in headers
        assert user_id == USER.decode()
        assert (request_id == REQUEST_ID) is sent_id
        seen.clear()


NO_ID = "asgi: per-request overhead over a bare app, no request id sent"
WITH_ID = "asgi: per-request overhead over a bare app, request id sent"


@pytest.mark.benchmark(group=NO_ID)
def test_bare_app(benchmark, loop):
    """
    Floor: the bare app, called directly.
    """
    _bare(benchmark, loop, sent_id=False)


@pytest.mark.benchmark(group=NO_ID)
def test_starlette_context(benchmark, loop):
    """
    starlette-context: `RawContextMiddleware` with `RequestIdPlugin()` and a
    user id plugin; it makes a request id (a UUID4). Its overhead over the
    floor is in ``extra_info``.
    """
    _starlette_context(benchmark, loop, sent_id=False)


@pytest.mark.benchmark(group=NO_ID)
def test_usercontext_middleware(benchmark, loop):
    """
    `UserContextMiddleware` with a resolver reading the user id header and a
    registry scope opened and closed per request; it makes a request id.
    Target: overhead <= 1.0x starlette-context's (``extra_info``).
    """
    _usercontext(benchmark, loop, sent_id=False)


@pytest.mark.benchmark(group=NO_ID)
def test_usercontext_middleware_isolate_off(benchmark, loop):
    """
    The same with ``isolate=False``, for a server that runs each request in a
    task of its own: no copy of the Context per request. Target: overhead
    <= 1.0x starlette-context's (``extra_info``).
    """
    _usercontext(benchmark, loop, sent_id=False, isolate=False)


@pytest.mark.benchmark(group=WITH_ID)
def test_bare_app_request_id_sent(benchmark, loop):
    """
    Floor: the bare app, called directly, the request carrying an id.
    """
    _bare(benchmark, loop, sent_id=True)


@pytest.mark.benchmark(group=WITH_ID)
def test_starlette_context_request_id_sent(benchmark, loop):
    """
    starlette-context, as above; it takes and validates the client's id.
    """
    _starlette_context(benchmark, loop, sent_id=True)


@pytest.mark.benchmark(group=WITH_ID)
def test_usercontext_middleware_request_id_sent(benchmark, loop):
    """
    `UserContextMiddleware`, as above; it takes and checks the client's id.
    Target: overhead <= 1.0x starlette-context's (``extra_info``).
    """
    _usercontext(benchmark, loop, sent_id=True)


@pytest.mark.benchmark(group=WITH_ID)
def test_usercontext_middleware_isolate_off_request_id_sent(benchmark, loop):
    """
    ``isolate=False``, as above, the client sending a request id. Target:
    overhead <= 1.0x starlette-context's (``extra_info``).
    """
    _usercontext(benchmark, loop, sent_id=True, isolate=False)


def _interleaved(benchmark, loop, *, sent_id: bool) -> None:
    middleware, registry = _ours()
    clients = {
        "bare": _Client(bare_app, sent_id=sent_id),
        "starlette_context": _Client(_theirs(), sent_id=sent_id),
        "usercontext": _Client(middleware, sent_id=sent_id),
    }
    order = list(clients)
    times: dict[str, list[float]] = {kind: [] for kind in order}
    perf_counter_ns = time.perf_counter_ns

    def call():
        order.append(order.pop(0))  # each app goes first in turn
        for kind in order:
            client = clients[kind]
            started = perf_counter_ns()
            loop.run_until_complete(client.batch())
            times[kind].append((perf_counter_ns() - started) / BATCH)

    benchmark.extra_info["requests_per_call"] = 3 * BATCH
    benchmark(call)

    best = {kind: min(ts) for kind, ts in times.items()}
    ours, theirs = best["usercontext"] - best["bare"], best["starlette_context"] - best["bare"]
    pairs = [
        (u - b) / (s - b)
        for b, s, u in zip(
            times["bare"], times["starlette_context"], times["usercontext"], strict=True
        )
        if s > b
    ]
    benchmark.extra_info.update(
        {
            "rounds": len(times["bare"]),
            "best_ns_per_request": best,
            "overhead_ns": ours,
            "starlette_context_overhead_ns": theirs,
            "overhead_ratio": ours / theirs if theirs > 0 else None,
            "median_round_ratio": statistics.median(pairs) if pairs else None,
            "target_ratio": 1.0,
        }
    )
    for kind, client in clients.items():
        client.check(request_id=None if kind == "bare" else REQUEST_ID if sent_id else "")
    stats = registry.stats()
    assert (stats.scopes, stats.opened) == (0, clients["usercontext"].served)


@pytest.mark.benchmark(group="asgi: overheads interleaved, no request id sent")
def test_interleaved(benchmark, loop):
    """
    The bare app, starlette-context and ours, each timed over a batch in
    every call, in turn: the overheads and their ratio (best batches, and the
    median of the ratios within a call) are in ``extra_info``. It asserts
    nothing about speed.
    """
    _interleaved(benchmark, loop, sent_id=False)


@pytest.mark.benchmark(group="asgi: overheads interleaved, request id sent")
def test_interleaved_request_id_sent(benchmark, loop):
    """
    The same, the client sending a request id.
    """
    _interleaved(benchmark, loop, sent_id=True)

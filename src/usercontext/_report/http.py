"""
The "Concurrent HTTP requests" section of ``usercontext report``.

It replays the legacy report's concurrent-requests scenario (1,000 requests
from 100 users, all released at once) against the example service of
`usercontext._report.service`, built the way the library is meant to be used,
as a pure ASGI app: `usercontext.asgi.UserContextMiddleware` resolving each user from a bearer
token, a `usercontext.Registry` with a per-request session, an
`usercontext.EngineFactory` with two engines per user running a short fake
agent, and an `usercontext.EmitterHub` carrying the agent's events to one
connection per user. Each response echoes the user id and request id that the
request ran under; the client checks every one of them.

It measures the success rate, latency percentiles, memory growth and the
per-request state left behind, beside the same service written without the
library (a plain `asyncio.Semaphore` per user) as a floor, and the lean
reference (`usercontext._report.lean`) as the physical limit; then an
unsaturated scenario of 100 requests at once. It needs nothing
beyond the core: the requests are driven in-process through hand-made ASGI
messages, or, with ``usercontext report --http-server uvicorn`` and uvicorn
installed, sent over keep-alive connections to a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import threading
import time
import tracemalloc

from typing import TYPE_CHECKING, Any, Literal

import attrs

from .frame import Progress, Section, SectionResult, Table, in_thread
from .lean import LeanService
from .rows import LEGACY_SUCCESS, Goal, Quantity, Row, success_rate_row
from .service import IDLE_TTL, PER_USER, SETTLE_S, TOKENS, USERS, WORK_S, FloorService, Service
from .timing import curve, fmt_pairs, in_empty_context, paired_ratios, percentile, ratio_ok


if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        Awaitable,
        Callable,
        MutableMapping,
        Sequence,
    )

    from .scale import Scale

    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


__all__ = ["SERVERS", "STEPS", "http_section", "with_server"]

Server = Literal["in-process", "uvicorn"]
SERVERS: tuple[Server, ...] = ("in-process", "uvicorn")

LEGACY_P50_MS, LEGACY_P95_MS, LEGACY_P99_MS = 45.0, 125.0, 250.0
LEGACY_WALL_S = 8.5
LEGACY_GROWTH_MB = 35.0
REQUESTS_PER_USER = 10
CONNECTIONS_PER_USER = 4  # under uvicorn: 400 keep-alive connections in all
RETAINED_LIMIT = 1 << 20
# Ours against the service written by hand without the library: P50 and P99
# of the legacy scenario, and P50 of the unsaturated one.
TARGET = 1.3
UNSATURATED_TARGET = 1.1
UNSATURATED_ROUNDS = 3  # runs of each side per scale round: 100 requests are few

STEPS = ("legacy scenario", "unsaturated scenario", "memory and state left")
AnyService = Service | FloorService | LeanService


# -- Clients ----------------------------------------------------------------------


@attrs.define
class Run:
    """
    One run of the scenario: what the client saw, and what the service held after.
    """

    server: str
    latencies_ms: list[float] = attrs.Factory(list[float])
    failed: int = 0
    cross_user: int = 0
    wall_s: float = 0.0
    state: dict[str, Any] = attrs.Factory(dict[str, Any])

    @property
    def requests(self) -> int:
        """
        Requests sent.
        """
        return len(self.latencies_ms) + self.failed

    def percentile(self, p: float) -> float:
        """
        Return the *p*-th percentile latency in ms (nearest rank).
        """
        return percentile(self.latencies_ms, p)

    def check(self, user_id: str, request_id: str, status: int, echoed: bytes, body: bytes) -> bool:
        """
        Count the response to a request of *user_id* with *request_id*: a
        failure unless it is a 200, a cross-user response if any id in it is
        not the request's. Return whether it succeeded.
        """
        if status != 200:
            self.failed += 1
            return False
        data = json.loads(body)
        users = {data["user_id"], data["session_user_id"], data["engine_user_id"]}
        if users != {user_id} or {data["request_id"], echoed.decode()} != {request_id}:
            self.cross_user += 1
        return True


def _requests(per_user: int) -> list[tuple[str, bytes, str]]:
    """
    *per_user* requests of every user, users interleaved: (user id, token,
    request id).
    """
    tokens = list(TOKENS.items())
    prefix = os.urandom(4).hex()
    return [
        (user_id, token, f"{prefix}-{i:03d}-{n:03d}")
        for i in range(per_user)
        for n, (token, user_id) in enumerate(tokens)
    ]


def _http_scope(token: bytes, request_id: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/agent",
        "raw_path": b"/agent",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"report"),
            (b"authorization", token),
            (b"x-request-id", request_id.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


_REQUEST = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT = {"type": "http.disconnect"}


@contextlib.asynccontextmanager
async def _lifespan_of(app: ASGIApp) -> AsyncGenerator[None]:
    """
    Start *app* as a server would (ASGI lifespan), and shut it down after.
    """
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def serve() -> None:
        await app(scope, inbox.get, outbox.put)

    task = asyncio.create_task(serve())
    inbox.put_nowait({"type": "lifespan.startup"})
    await outbox.get()
    try:
        yield
    finally:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


async def _in_process_round(app: ASGIApp, per_user: int) -> Run:
    """
    Release *per_user* requests of every user at once, through hand-made ASGI
    messages; time each from the release to its last byte.
    """
    run = Run("in-process")
    gate = asyncio.Event()

    async def request(user_id: str, token: bytes, request_id: str) -> None:
        sent: list[Message] = []
        received = False

        async def receive() -> Message:
            nonlocal received
            if received:
                return _DISCONNECT
            received = True
            return _REQUEST

        async def send(message: Message) -> None:
            sent.append(message)

        await gate.wait()
        started = time.perf_counter()
        await app(_http_scope(token, request_id), receive, send)
        elapsed = time.perf_counter() - started
        start, body = sent
        echoed = dict(start["headers"]).get(b"x-request-id", b"")
        if run.check(user_id, request_id, start["status"], echoed, body["body"]):
            run.latencies_ms.append(elapsed * 1e3)

    tasks = [asyncio.create_task(request(*r)) for r in _requests(per_user)]
    await asyncio.sleep(0)
    started = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    run.wall_s = time.perf_counter() - started
    return run


async def _serve_in_process(
    service: AnyService,
    *,
    per_user: int,
    rounds: int = 1,
    memory: bool = False,
) -> tuple[Run, dict[str, Any]]:
    """
    Run the scenario *rounds* times on one service, with *per_user* requests
    of every user; return the last run and, with *memory*, what tracemalloc
    saw of it (the rounds before warm the service up).
    """

    async def one_round() -> Run:
        service.connect()
        run = await _in_process_round(service.asgi, per_user)
        run.state = await service.settle()
        return run

    async with _lifespan_of(service.asgi):
        for _ in range(rounds - 1):
            await one_round()
        if not memory:
            return await one_round(), {}
        gc.collect()
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run = await one_round()
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return run, {"retained_bytes": after - before, "peak_growth_bytes": peak - before}


async def _keep_alive_client(port: int, per_user: int | None = None) -> Run:
    """
    Send the scenario's requests (*per_user* of every user, by default
    `REQUESTS_PER_USER`) to 127.0.0.1:*port* over keep-alive connections,
    several per user, all opened before the release; time each request from
    its write to the last byte of its response.
    """
    run = Run("uvicorn")
    by_connection: dict[tuple[str, int], list[tuple[str, bytes, str]]] = {}
    for n, r in enumerate(_requests(per_user or REQUESTS_PER_USER)):
        by_connection.setdefault((r[0], n // USERS % CONNECTIONS_PER_USER), []).append(r)
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in by_connection]
    gate = asyncio.Event()

    async def connection(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: list[tuple[str, bytes, str]],
    ) -> None:
        await gate.wait()
        for user_id, token, request_id in requests:
            started = time.perf_counter()
            writer.write(
                b"GET /agent HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: %s\r\n"
                b"x-request-id: %s\r\n\r\n" % (token, request_id.encode())
            )
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if line)
            body = await reader.readexactly(int(headers[b"content-length"]))
            elapsed = time.perf_counter() - started
            status = int(lines[0].split()[1])
            echoed = headers.get(b"x-request-id", b"")
            if run.check(user_id, request_id, status, echoed, body):
                run.latencies_ms.append(elapsed * 1e3)
        writer.close()
        await writer.wait_closed()

    tasks = [
        asyncio.create_task(connection(reader, writer, requests))
        for (reader, writer), requests in zip(streams, by_connection.values(), strict=True)
    ]
    await asyncio.sleep(0)
    started = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    run.wall_s = time.perf_counter() - started
    return run


async def _call(fn: Callable[[], None]) -> None:
    fn()


def _serve_uvicorn(service: AnyService, per_user: int | None = None) -> Run:
    """
    Serve *service* with uvicorn on 127.0.0.1 in a thread of its own, and run
    the scenario against it over real connections.
    """
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        service.asgi,
        interface="asgi3",
        lifespan="on",
        loop="asyncio",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)

    def serve() -> None:
        with contextlib.suppress(SystemExit):  # how uvicorn stops when the app fails to start
            server.run(sockets=[sock])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SETTLE_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not server.started:
            msg = "uvicorn did not start; its log above says why."
            raise RuntimeError(msg)
        loop = service.loop
        assert loop is not None  # noqa: S101  # set by the app's lifespan startup
        asyncio.run_coroutine_threadsafe(_call(service.connect), loop).result()
        run = asyncio.run(_keep_alive_client(port, per_user))
        run.state = asyncio.run_coroutine_threadsafe(service.settle(), loop).result()
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
    return run


def _run(service: AnyService, server: Server, per_user: int | None = None) -> Run:
    if server == "uvicorn":
        return in_empty_context(lambda: _serve_uvicorn(service, per_user))
    n = per_user or REQUESTS_PER_USER
    return in_thread(lambda: asyncio.run(_serve_in_process(service, per_user=n)))[0]


# -- The section --------------------------------------------------------------------


def _legacy(
    scale: Scale, server: Server, per_user: int | None = None, rounds: int = 1
) -> dict[str, list[Run]]:
    """
    Run the floor, the lean reference and ours *scale.scenario_rounds* times
    *rounds* each, interleaved, each run on a new service.
    """
    runs: dict[str, list[Run]] = {"floor": [], "lean": [], "ours": []}
    for _ in range(scale.scenario_rounds * rounds):
        runs["floor"].append(_run(FloorService(), server, per_user))
        runs["lean"].append(_run(LeanService(), server, per_user))
        runs["ours"].append(_run(Service(), server, per_user))
    return runs


def _figures(run: Run) -> dict[str, Any]:
    return {
        "p50_ms": run.percentile(50),
        "p95_ms": run.percentile(95),
        "p99_ms": run.percentile(99),
        "curve_ms": curve(run.latencies_ms),
        "wall_s": run.wall_s,
        "requests": run.requests,
        "succeeded": len(run.latencies_ms),
        "failed": run.failed,
        "cross_user": run.cross_user,
        "state": run.state,
    }


def _pair(runs: dict[str, list[Run]], p: int, side: str = "ours") -> dict[str, Any]:
    return paired_ratios(
        [r.percentile(p) for r in runs[side]], [r.percentile(p) for r in runs["floor"]]
    )


def _ok(pair: dict[str, Any], target: float) -> bool:
    return ratio_ok(pair["ratio"], pair["median_pair_ratio"], target)


def _legacy_rows(out: Table, scale: Scale, server: Server) -> list[Run]:
    runs = _legacy(scale, server)
    ours = runs["ours"]
    best = min(ours, key=lambda r: r.percentile(99))
    total = sum(r.requests for r in ours)
    succeeded = sum(len(r.latencies_ms) for r in ours)
    cross = sum(r.cross_user for r in ours)
    wrong_events = sum(r.state["events_wrong_user"] for r in ours)
    received = sum(r.state["events_received"] for r in ours)
    p50, p95, p99 = best.percentile(50), best.percentile(95), best.percentile(99)
    ratios = {"p50": _pair(runs, 50), "p99": _pair(runs, 99)}
    limit = {"p50": _pair(runs, 50, "lean"), "p99": _pair(runs, 99, "lean")}
    out.figures["legacy_scenario"] = {
        "server": server,
        "users": USERS,
        "requests": USERS * REQUESTS_PER_USER,
        "per_user": PER_USER,
        "work_ms": WORK_S * 1e3,
        "ours": [_figures(r) for r in ours],
        "floor": [_figures(r) for r in runs["floor"]],
        "lean": [_figures(r) for r in runs["lean"]],
        "lean_ratios": limit,
        "target": TARGET,
        "success_rate": succeeded / total,
        "cross_user_responses": cross,
        "cross_user_events": wrong_events,
        "events_received": received,
        **ratios,
        "legacy": {
            "success_rate": LEGACY_SUCCESS,
            "p50_ms": LEGACY_P50_MS,
            "p95_ms": LEGACY_P95_MS,
            "p99_ms": LEGACY_P99_MS,
            "wall_s": LEGACY_WALL_S,
        },
    }
    out.rows += [
        success_rate_row(
            "http.success_rate", "Success rate (every run)", succeeded, total, LEGACY_SUCCESS
        ),
        Row(
            id="http.latency_p99",
            kind="performance",
            metric="Latency P50 / P95 / P99, best run",
            target=(
                f"P99 ≤ {LEGACY_P99_MS:g} ms (legacy {LEGACY_P50_MS:g} / {LEGACY_P95_MS:g} / "
                f"{LEGACY_P99_MS:g} ms)"
            ),
            achieved=(
                f"{p50:.1f} / {p95:.1f} / **{p99:.1f} ms**, wall {best.wall_s * 1e3:.0f} ms "
                f"(legacy {LEGACY_WALL_S:g} s), {best.requests / best.wall_s:,.0f} requests/s"
            ),
            ok=p99 <= LEGACY_P99_MS,
            value=Quantity(p99, "ms"),
            goal=Goal("<=", LEGACY_P99_MS, "ms"),
            details={
                "p50": Quantity(p50, "ms"),
                "p95": Quantity(p95, "ms"),
                "wall": Quantity(best.wall_s * 1e3, "ms"),
                "throughput": Quantity(best.requests / best.wall_s, "requests/s"),
            },
        ),
        Row(
            id="http.latency_vs_floor",
            kind="performance",
            metric=(
                "P50 / P99 vs the same service written by hand without the library "
                "(per-user `asyncio.Semaphore`)"
            ),
            target=f"P50 and P99 ≤ {TARGET:g}x",
            achieved=fmt_pairs(ratios["p50"], ratios["p99"], TARGET),
            ok=_ok(ratios["p50"], TARGET) and _ok(ratios["p99"], TARGET),
            value=Quantity(max(ratios["p50"]["ratio"], ratios["p99"]["ratio"]), "x"),
            goal=Goal("<=", TARGET, "x"),
            details={
                "p50_ratio": Quantity(ratios["p50"]["ratio"], "x"),
                "p99_ratio": Quantity(ratios["p99"]["ratio"], "x"),
                "floor_p50": Quantity(min(ratios["p50"]["floor_ms"]), "ms"),
                "floor_p99": Quantity(min(ratios["p99"]["floor_ms"]), "ms"),
            },
        ),
        Row(
            id="http.lean_vs_floor",
            kind="info",
            metric=(
                "Physical limit: the lean reference (written by hand with every guarantee "
                "the library gives) vs the same floor"
            ),
            target="none (info)",
            achieved=fmt_pairs(limit["p50"], limit["p99"], None),
            value=Quantity(limit["p99"]["ratio"], "x"),
            details={
                "p50_ratio": Quantity(limit["p50"]["ratio"], "x"),
                "p50": Quantity(min(limit["p50"]["ours_ms"]), "ms"),
                "p99": Quantity(min(limit["p99"]["ours_ms"]), "ms"),
            },
        ),
        Row(
            id="http.cross_user",
            kind="correctness",
            metric="Cross-user responses (user or request id not the request's), and events",
            target="0",
            achieved=f"**{cross}** in {total:,} responses, {wrong_events} in {received:,} events",
            ok=cross == wrong_events == 0 and received > 0,
            value=Quantity(cross + wrong_events, "observations"),
            goal=Goal("==", 0, "observations"),
            details={
                "responses": Quantity(cross, "responses"),
                "events": Quantity(wrong_events, "events"),
                "events_received": Quantity(received, "events"),
            },
        ),
    ]
    return ours


def _unsaturated_rows(out: Table, scale: Scale, server: Server) -> list[Run]:
    """
    One request of every user, 100 at once: the loop is idle most of the
    time, and a request's latency is its own cost plus the 10 ms of work.
    """
    runs = _legacy(scale, server, per_user=1, rounds=UNSATURATED_ROUNDS)
    pair, limit = _pair(runs, 50), _pair(runs, 50, "lean")
    best = {side: min(r.percentile(50) for r in rs) for side, rs in runs.items()}
    failed = sum(r.failed + r.cross_user for rs in runs.values() for r in rs)
    out.figures["unsaturated"] = {
        "requests": USERS,
        "runs": len(runs["ours"]),
        "p50": pair,
        "lean_p50": limit,
        "target": UNSATURATED_TARGET,
        "failed_or_cross_user": failed,
        **{side: [_figures(r) for r in rs] for side, rs in runs.items()},
    }
    out.rows.append(
        Row(
            id="http.unsaturated_p50",
            kind="performance",
            metric=f"Unsaturated: {USERS} requests at once, P50 vs the floor's",
            target=f"≤ {UNSATURATED_TARGET:g}x",
            achieved=(
                f"{best['ours']:.2f} vs {best['floor']:.2f} ms: **{pair['ratio']:.2f}x** "
                f"(lean reference {best['lean']:.2f} ms, {limit['ratio']:.2f}x; best of "
                f"{len(runs['ours'])} runs)"
                + (f"; {failed} failed or cross-user responses" if failed else "")
            ),
            ok=_ok(pair, UNSATURATED_TARGET) and not failed,
            value=Quantity(pair["ratio"], "x"),
            goal=Goal("<=", UNSATURATED_TARGET, "x"),
            details={
                "ours_p50": Quantity(best["ours"], "ms"),
                "floor_p50": Quantity(best["floor"], "ms"),
                "lean_p50": Quantity(best["lean"], "ms"),
                "lean_ratio": Quantity(limit["ratio"], "x"),
            },
        )
    )
    return runs["ours"]


# What a service may hold once every request has ended: nothing.
_LEFT = (
    "scopes",
    "resources_open",
    "engines_active",
    "quota_in_use",
    "quota_waiting",
    "quota_keys",
    "hub_users",
    "hub_attached",
)


def _balanced(run: Run) -> bool:
    """
    Tell whether the service behind *run* closed a session and an engine for
    every request it served, and delivered every event to its user.
    """
    state = run.state
    return bool(
        state["sessions_opened"] == state["sessions_closed"] == state["requests"]
        and state["engines_created"] == state["engines_closed"] == state["requests"]
        and state["events_emitted"] == state["events_delivered"] == state["events_received"]
    )


def _memory_rows(out: Table, scale: Scale, ours: list[Run]) -> None:
    # At the full scale one round warms the service up first, so that what a
    # first request builds once (caches, lazy imports) is not counted; the
    # quick scale sends fewer requests, as tracemalloc slows every one.
    rounds = 2 if scale.scenario_rounds > 1 else 1
    per_user = max(1, min(REQUESTS_PER_USER, scale.memory_contexts // 1_000))
    service = Service()
    run, mem = in_thread(
        lambda: asyncio.run(
            _serve_in_process(service, rounds=rounds, per_user=per_user, memory=True)
        )
    )
    runs = [*ours, run]
    left = {key: sum(r.state[key] for r in runs) for key in _LEFT}
    balanced = all(_balanced(r) for r in runs)
    requests = sum(r.state["requests"] for r in runs)
    out.figures["memory"] = {**mem, "requests": run.requests, "warm_up_rounds": rounds - 1}
    out.figures["state_left"] = {"runs": len(runs), "requests": requests, **left}
    retained, growth = mem["retained_bytes"], mem["peak_growth_bytes"]
    out.rows += [
        Row(
            id="http.memory_retained",
            kind="correctness",
            metric=(
                f"Memory over {run.requests:,} requests (tracemalloc): retained after / peak growth"
            ),
            target=f"retained < 1 MiB (legacy: {LEGACY_GROWTH_MB:g} MB growth)",
            achieved=f"**{retained / 1024:.0f} KiB** / {growth / 1024**2:.1f} MiB",
            ok=retained < RETAINED_LIMIT and run.failed == 0,
            value=Quantity(retained, "B"),
            goal=Goal("<", RETAINED_LIMIT, "B"),
            details={
                "peak_growth": Quantity(growth, "B"),
                "failed": Quantity(run.failed, "requests"),
            },
        ),
        Row(
            id="http.state_left",
            kind="correctness",
            metric=(
                "Per-request state left after every run: scopes, resources, engines, quota "
                "slots and users, hub users and connections"
            ),
            target="0; every session and engine closed, every event delivered",
            achieved=f"**{sum(left.values())}** after {requests:,} requests in {len(runs)} runs"
            + ("" if balanced else "; not every session, engine or event accounted for")
            + "".join(f"; {key} {n}" for key, n in left.items() if n),
            ok=not any(left.values()) and balanced,
            value=Quantity(sum(left.values()), "items"),
            goal=Goal("==", 0, "items"),
            details={
                **{key: Quantity(n, "items") for key, n in left.items()},
                "unbalanced_runs": Quantity(sum(not _balanced(r) for r in runs), "runs"),
            },
        ),
    ]


def http_section(scale: Scale, progress: Progress, server: Server = "in-process") -> SectionResult:
    """
    Run the concurrent-requests scenario against the example service and its
    floor, then measure its memory and the state it leaves behind.
    """
    out = progress.table("http")
    progress("http", STEPS[0])
    ours = _legacy_rows(out, scale, server)
    progress("http", STEPS[1])
    ours += _unsaturated_rows(out, scale, server)
    progress("http", STEPS[2])
    _memory_rows(out, scale, ours)
    how = (
        "in-process, through hand-made ASGI messages (no sockets)"
        if server == "in-process"
        else (
            f"under uvicorn on 127.0.0.1, over {USERS * CONNECTIONS_PER_USER} keep-alive "
            f"connections ({CONNECTIONS_PER_USER} per user) opened before the release"
        )
    )
    notes = (
        (
            f"The scenario: {USERS * REQUESTS_PER_USER:,} requests from {USERS} users, released "
            f"at once, {how}. Each request resolves its user from a bearer token "
            "(`UserContextMiddleware`), opens a registry scope and takes a session from it, "
            f"runs a fake agent for {WORK_S * 1e3:g} ms on an engine of an `EngineFactory` "
            f"({PER_USER} per user), which emits two events to the user's connection through an "
            "`EmitterHub`, and answers with the user and request ids it ran under."
        ),
        (
            "Latency counts from the release to the last byte of the response"
            if server == "in-process"
            else "Latency counts from a request's write to the last byte of its response"
        )
        + f"; ours, the lean reference and the floor ran {scale.scenario_rounds} time(s) "
        "each, interleaved, each on a new service, and the rows show the best run. With two "
        "engines per user, a user's ten requests run in five waves of 10 ms: the floor's "
        "latency is the scenario's own, and ours adds the time the library takes for all "
        "1,000 requests. "
        "A response is cross-user if its user id, the session's, the engine's or its "
        "request id is not the request's.",
        (
            "Floor: the same service without the library: the user from a dict of tokens, one "
            "`asyncio.Semaphore` per user, the session and engine made and closed by hand, the "
            "events appended to a list per user, the same JSON response. Ours is held to "
            f"{TARGET:g}x its P50 and P99."
        ),
        (
            "Lean reference (the physical limit): the service written by hand with every "
            "guarantee the library gives (`usercontext._report.lean` lists them); what it costs "
            "above the floor, no library can save. `python benchmarks/instructions.py` counts "
            "the instructions per request of all three."
        ),
        (
            f"Unsaturated scenario: one request of every user ({USERS} at once), "
            f"{UNSATURATED_ROUNDS * scale.scenario_rounds} run(s) of each service, interleaved; "
            f"ours is held to {UNSATURATED_TARGET:g}x the floor's P50."
        ),
        (
            "Memory is measured in-process on one service"
            + (", after a first round that warms it up" if scale.scenario_rounds > 1 else "")
            + ". After each run, every user disconnects and the hub forgets users idle for "
            f"{IDLE_TTL * 1e3:g} ms; the state is read then."
        ),
        (
            "Legacy figures (98.7% success, P50 45 ms, P95 125 ms, P99 250 ms, 8.5 s wall, "
            "35 MB growth) are those of the legacy report, not measured here."
        ),
    )
    return SectionResult(tuple(out.rows), out.figures, notes)


def with_server(sections: Sequence[Section], server: Server) -> tuple[Section, ...]:
    """
    Return *sections* with the HTTP section run under *server*.
    """

    def run(scale: Scale, progress: Progress) -> SectionResult:
        return http_section(scale, progress, server)

    return tuple(attrs.evolve(s, run=run) if s.key == "http" else s for s in sections)

"""
The "Engines and quotas" section of ``usercontext report``.

It replays the legacy report's scenario (1,000 requests from 100 users, two
engines per user, 10 ms of work each, all released at once) under a per-user
`asyncio.Semaphore` floor, under `usercontext.LocalQuota`, and through
`usercontext.EngineFactory` with a context per request; then it times the
quota's hot paths against their floors and checks that rejections, timeouts and
a flood of distinct users leave nothing behind.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

from typing import TYPE_CHECKING, Any

import attrs

from usercontext import (
    EngineFactory,
    LocalQuota,
    QuotaExceededError,
    QuotaTimeoutError,
    UserContext,
)

from .floors import DictQuota, RejectedError
from .frame import Progress, SectionResult, Table
from .rows import LEGACY_SUCCESS, Goal, Quantity, Row, success_rate_row
from .timing import (
    Comparison,
    LoopOp,
    Op,
    compare,
    fmt_ns,
    in_empty_context,
    paired_ratios,
    percentile,
    ratio_ok,
)


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from .scale import Scale


__all__ = ["STEPS", "engines_section"]

LEGACY_P50_MS, LEGACY_P95_MS, LEGACY_P99_MS = 45.0, 125.0, 250.0
LEGACY_WALL_S = 8.5
LEGACY_ENGINE_MS = 8.0 + 2.0  # "~8ms" to create an engine, "~2ms" to clean it up
SPEEDUP_TARGET = 100.0
P50_TARGET = 1.1
P99_TARGET = 1.15
ACQUIRE_TARGET = 1.3
REJECT_TARGET = 1.5
PER_USER = 2
USERS = 100
REQUESTS_PER_USER = 10
WORK_S = 0.01
RETAINED_LIMIT = 1 << 20

STEPS = (
    "legacy scenario",
    "memory under load",
    "engine cost",
    "quota hot paths",
    "reject and timeout",
    "distinct users",
)


@attrs.define
class _Run:
    """
    One run of the legacy scenario.
    """

    latencies_ms: list[float] = attrs.Factory(list[float])
    failed: int = 0
    wall_s: float = 0.0
    peak_per_user: int = 0
    in_flight: dict[int, int] = attrs.Factory(dict[int, int])

    def percentile(self, p: float) -> float:
        """
        Return the *p*-th percentile latency in ms (nearest rank).
        """
        return percentile(self.latencies_ms, p)

    async def work(self, user: int) -> None:
        """
        The body of a request: 10 ms of waiting, with the user's engines counted.
        """
        n = self.in_flight[user] = self.in_flight.get(user, 0) + 1
        self.peak_per_user = max(self.peak_per_user, n)
        try:
            await asyncio.sleep(WORK_S)
        finally:
            self.in_flight[user] -= 1


async def _scenario(handle: Callable[[_Run, int], Awaitable[None]]) -> _Run:
    """
    Release 1,000 requests of 100 users at once; time each from release to done.
    """
    run = _Run()
    gate = asyncio.Event()

    async def request(i: int) -> None:
        await gate.wait()
        started = time.perf_counter()
        try:
            await handle(run, i)
        except Exception:  # counted: the success rate is a figure
            run.failed += 1
            return
        run.latencies_ms.append((time.perf_counter() - started) * 1e3)

    tasks = [asyncio.create_task(request(i)) for i in range(USERS * REQUESTS_PER_USER)]
    await asyncio.sleep(0)
    started = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    run.wall_s = time.perf_counter() - started
    return run


def _semaphore_handler() -> Callable[[_Run, int], Awaitable[None]]:
    sems: dict[int, asyncio.Semaphore] = {}

    async def handle(run: _Run, i: int) -> None:
        user = i % USERS
        sem = sems.get(user)
        if sem is None:
            sem = sems[user] = asyncio.Semaphore(PER_USER)
        async with sem:
            await run.work(user)

    return handle


def _quota_handler() -> Callable[[_Run, int], Awaitable[None]]:
    quota = LocalQuota(per_key=PER_USER)

    async def handle(run: _Run, i: int) -> None:
        user = i % USERS
        async with await quota.acquire(f"user-{user}"):
            await run.work(user)

    return handle


def _factory_handler() -> Callable[[_Run, int], Awaitable[None]]:
    factory: EngineFactory[object] = EngineFactory(lambda _ctx: object(), per_user=PER_USER)

    async def handle(run: _Run, i: int) -> None:
        user = i % USERS
        ctx = UserContext(user_id=f"user-{user}", thread_id=f"thread-{i}", run_id=f"run-{i}")
        async with factory.engine(ctx):
            await run.work(user)

    return handle


VARIANTS: dict[str, Callable[[], Callable[[_Run, int], Awaitable[None]]]] = {
    "floor": _semaphore_handler,
    "quota": _quota_handler,
    "factory": _factory_handler,
}


def _run_variant(name: str) -> _Run:
    return in_empty_context(lambda: asyncio.run(_scenario(VARIANTS[name]())))


def _legacy(scale: Scale) -> dict[str, list[_Run]]:
    """
    Run each variant *scale.scenario_rounds* times, interleaved.
    """
    runs: dict[str, list[_Run]] = {name: [] for name in VARIANTS}
    for _ in range(scale.scenario_rounds):
        for name in VARIANTS:
            runs[name].append(_run_variant(name))
    return runs


def _percentiles(run: _Run) -> dict[str, float]:
    return {
        "p50_ms": run.percentile(50),
        "p95_ms": run.percentile(95),
        "p99_ms": run.percentile(99),
        "wall_s": run.wall_s,
        "succeeded": len(run.latencies_ms),
        "failed": run.failed,
        "peak_per_user": run.peak_per_user,
    }


def _latency_row(out: Table, runs: dict[str, list[_Run]], p: int, target: float) -> dict[str, Any]:
    pair = paired_ratios(
        [r.percentile(p) for r in runs["quota"]], [r.percentile(p) for r in runs["floor"]]
    )
    best, median = pair["ratio"], pair["median_pair_ratio"]
    out.rows.append(
        Row(
            id=f"engines.legacy_p{p}_vs_floor",
            kind="performance",
            metric=f"Legacy scenario P{p}, `LocalQuota` vs per-user `asyncio.Semaphore`",
            target=f"≤ {target:g}x",
            achieved=(
                f"{min(pair['ours_ms']):.1f} ms vs {min(pair['floor_ms']):.1f} ms: **{best:.2f}x**"
            )
            + (
                f" (median of pairs {median:.2f}x: within noise)"
                if (best > target) != (median > target)
                else ""
            ),
            ok=ratio_ok(best, median, target),
            value=Quantity(best, "x"),
            goal=Goal("<=", target, "x"),
            details={
                "median_pair_ratio": Quantity(median, "x"),
                "ours": Quantity(min(pair["ours_ms"]), "ms"),
                "floor": Quantity(min(pair["floor_ms"]), "ms"),
            },
        )
    )
    return pair


def _legacy_rows(out: Table, scale: Scale) -> None:
    runs = _legacy(scale)
    figures: dict[str, Any] = {name: [_percentiles(r) for r in rs] for name, rs in runs.items()}
    figures["p50"] = _latency_row(out, runs, 50, P50_TARGET)
    figures["p99"] = _latency_row(out, runs, 99, P99_TARGET)
    every = [r for rs in runs.values() for r in rs]
    total = sum(len(r.latencies_ms) + r.failed for r in every)
    succeeded = sum(len(r.latencies_ms) for r in every)
    peak = max(r.peak_per_user for r in every)
    factory = min(runs["factory"], key=lambda r: r.percentile(50))
    out.rows += [
        success_rate_row(
            "engines.legacy_success_rate",
            "Legacy scenario success rate (all variants, all rounds)",
            succeeded,
            total,
            LEGACY_SUCCESS,
        ),
        Row(
            id="engines.legacy_factory_latency",
            kind="info",
            metric=(
                "Legacy scenario through `EngineFactory`, a context per request: P50 / P95 / P99"
            ),
            target="none (info); legacy 45 / 125 / 250 ms",
            achieved=(
                f"{factory.percentile(50):.1f} / {factory.percentile(95):.1f} / "
                f"{factory.percentile(99):.1f} ms, wall {factory.wall_s * 1e3:.0f} ms "
                f"(legacy {LEGACY_WALL_S:g} s)"
            ),
            value=Quantity(factory.percentile(99), "ms"),
            details={
                "p50": Quantity(factory.percentile(50), "ms"),
                "p95": Quantity(factory.percentile(95), "ms"),
                "p99": Quantity(factory.percentile(99), "ms"),
                "wall": Quantity(factory.wall_s * 1e3, "ms"),
            },
        ),
        Row(
            id="engines.peak_per_user",
            kind="correctness",
            metric="Peak engines in use per user vs the limit",
            target=f"≤ {PER_USER}",
            achieved=f"**{peak}**",
            ok=peak <= PER_USER,
            value=Quantity(peak, "engines"),
            goal=Goal("<=", PER_USER, "engines"),
        ),
    ]
    out.figures["legacy_scenario"] = figures


def _memory_rows(out: Table) -> None:
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run = _run_variant("factory")
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    retained, growth = after - before, peak - before
    out.figures["memory"] = {
        "retained_bytes": retained,
        "peak_growth_bytes": growth,
        "failed": run.failed,
    }
    out.rows.append(
        Row(
            id="engines.memory_retained",
            kind="correctness",
            metric=(
                "Memory under the legacy scenario (`EngineFactory`): retained after / peak growth"
            ),
            target="retained < 1 MiB (legacy: 35 MB growth)",
            achieved=f"**{retained / 1024:.0f} KiB** / {growth / 1024**2:.1f} MiB",
            ok=retained < RETAINED_LIMIT,
            value=Quantity(retained, "B"),
            goal=Goal("<", RETAINED_LIMIT, "B"),
            details={"peak_growth": Quantity(growth, "B")},
        )
    )


def _engine_rows(out: Table, scale: Scale, loop: asyncio.AbstractEventLoop) -> None:
    closed: list[object] = []
    factory: EngineFactory[object] = EngineFactory(
        lambda _ctx: object(), close=closed.append, per_user=PER_USER
    )
    ctx = UserContext(user_id="user-42", thread_id="thread-7", run_id="run-1")
    sems = {"user-42": asyncio.Semaphore(PER_USER)}

    async def ours(n: int) -> None:
        for _ in range(n):
            async with factory.engine(ctx):
                pass
        closed.clear()

    async def floor(n: int) -> None:
        for _ in range(n):
            async with sems["user-42"]:
                closed.append(object())
        closed.clear()

    c = compare(
        LoopOp("async with factory.engine(ctx)", ours, loop),
        LoopOp("per-user Semaphore, create and close by hand", floor, loop),
        scale,
    )
    speedup = LEGACY_ENGINE_MS * 1e6 / c.ours_ns
    out.figures["engine"] = {
        **c.figures(None, "INFO"),
        "legacy_ms": LEGACY_ENGINE_MS,
        "speedup": speedup,
    }
    out.rows += [
        Row(
            id="engines.engine_lifecycle_vs_floor",
            kind="info",
            metric="Engine lifecycle overhead (quota, bind, cancel scope, close) vs floor",
            target="none (info)",
            achieved=f"{fmt_ns(c.ours_ns)} vs {fmt_ns(c.floor_ns)}: {c.ratio:.1f}x",
            value=Quantity(c.ratio, "x"),
            details={"ours": Quantity(c.ours_ns, "ns"), "floor": Quantity(c.floor_ns, "ns")},
        ),
        Row(
            id="engines.engine_lifecycle_speedup_vs_legacy",
            kind="performance",
            metric="Engine lifecycle overhead vs legacy (8 ms create + 2 ms cleanup)",
            target=f"≥ {SPEEDUP_TARGET:g}x faster",
            achieved=f"**{speedup:,.0f}x** faster",
            ok=speedup >= SPEEDUP_TARGET,
            value=Quantity(speedup, "x"),
            goal=Goal(">=", SPEEDUP_TARGET, "x"),
            details={
                "ours": Quantity(c.ours_ns, "ns"),
                "legacy": Quantity(LEGACY_ENGINE_MS * 1e6, "ns"),
            },
        ),
    ]


# One refusal by acquire_nowait, caught: what the "reject" row times.
_NOWAIT = 'try:\n    q.acquire_nowait("user-42")\nexcept E:\n    pass'


def _quota_rows(out: Table, scale: Scale, loop: asyncio.AbstractEventLoop) -> None:  # noqa: C901  # three pairs of closures
    quota = LocalQuota(per_key=PER_USER)
    sems = {"user-42": asyncio.Semaphore(PER_USER)}

    async def acquire(n: int) -> None:
        for _ in range(n):
            lease = await quota.acquire("user-42")
            lease.release()

    async def sem_acquire(n: int) -> None:
        for _ in range(n):
            sem = sems["user-42"]
            await sem.acquire()
            sem.release()

    out.ratio(
        "acquire",
        "Uncontended acquire + release vs a dict of `asyncio.Semaphore`",
        ACQUIRE_TARGET,
        compare(
            LoopOp("await quota.acquire(key); lease.release()", acquire, loop),
            LoopOp("await sem.acquire(); sem.release()", sem_acquire, loop),
            scale,
        ),
    )

    full = LocalQuota(per_key=PER_USER)
    held = [full.acquire_nowait("user-42") for _ in range(PER_USER)]
    floor = DictQuota(PER_USER)
    for _ in range(PER_USER):
        floor.acquire_nowait("user-42")
    out.ratio(
        "reject",
        "Rejection by `acquire_nowait` vs a dict-of-int quota",
        REJECT_TARGET,
        compare(
            Op("quota.acquire_nowait(key) raising", _NOWAIT, {"q": full, "E": QuotaExceededError}),
            Op("dict-of-int acquire_nowait raising", _NOWAIT, {"q": floor, "E": RejectedError}),
            scale,
        ),
    )

    def raising(q: LocalQuota | DictQuota) -> Callable[[int], Coroutine[Any, Any, None]]:
        async def reject(n: int) -> None:
            for _ in range(n):
                try:  # noqa: SIM105  # contextlib.suppress would add its own cost
                    await q.acquire("user-42", timeout=0)
                except (QuotaExceededError, RejectedError):  # noqa: PERF203  # what is timed
                    pass

        return reject

    c: Comparison = compare(
        LoopOp("await quota.acquire(key, timeout=0) raising", raising(full), loop),
        LoopOp("dict-of-int acquire raising", raising(floor), loop),
        scale,
    )
    out.ratio(
        "reject_raise", "Rejection by `acquire(timeout=0)` raising vs floor", REJECT_TARGET, c
    )
    for lease in held:
        lease.release()


async def _reject_and_timeout() -> dict[str, Any]:
    """
    Flood a quota in reject mode and in timeout mode; count what happened.
    """
    factory: EngineFactory[object] = EngineFactory(
        lambda _ctx: object(), per_user=PER_USER, timeout=0
    )
    gate = asyncio.Event()
    in_flight: dict[int, int] = {}
    peak = 0
    rejected = 0

    async def request(user: int, i: int) -> None:
        nonlocal peak, rejected
        ctx = UserContext(user_id=f"user-{user}", thread_id="thread", run_id=f"run-{i}")
        try:
            async with factory.engine(ctx):
                in_flight[user] = in_flight.get(user, 0) + 1
                peak = max(peak, in_flight[user])
                await gate.wait()
                in_flight[user] -= 1
        except QuotaExceededError:
            rejected += 1

    tasks = [asyncio.create_task(request(u, i)) for u in range(USERS) for i in range(5)]
    for _ in range(3):
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    stats = factory.stats()

    quota = LocalQuota(per_key=PER_USER)
    held = [await quota.acquire("user-1") for _ in range(PER_USER)]
    waited: list[float] = []

    async def waiter() -> None:
        try:
            await quota.acquire("user-1", timeout=0.02)
        except QuotaTimeoutError as e:
            waited.append(e.waited)

    await asyncio.gather(*(waiter() for _ in range(5)))
    quota_stats = quota.stats()
    for lease in held:
        lease.release()
    return {
        "requests": USERS * 5,
        "rejected": rejected,
        "stats_rejected": stats.quota.rejected,
        "created": stats.created,
        "closed": stats.closed,
        "peak_per_user": peak,
        "in_use_after": factory.quota.stats().in_use,
        "timed_out": len(waited),
        "min_waited_s": min(waited),
        "in_use_while_timing_out": quota_stats.in_use,
        "waiting_after_timeouts": quota_stats.waiting,
        "in_use_after_timeouts": quota.stats().in_use,
    }


def _reject_rows(out: Table) -> None:
    r = in_empty_context(lambda: asyncio.run(_reject_and_timeout()))
    out.figures["reject_and_timeout"] = r
    expected = USERS * (5 - PER_USER)
    reject_ok = (
        r["rejected"] == r["stats_rejected"] == expected
        and r["created"] == r["closed"] == USERS * PER_USER
        and r["peak_per_user"] <= PER_USER
        and r["in_use_after"] == 0
    )
    timeout_ok = (
        r["timed_out"] == 5
        and r["min_waited_s"] >= 0.02
        and r["in_use_while_timing_out"] == PER_USER
        and r["waiting_after_timeouts"] == r["in_use_after_timeouts"] == 0
    )
    out.rows += [
        Row(
            id="engines.reject_mode",
            kind="correctness",
            metric="Reject mode (`timeout=0`): 100 users x 5 requests at once, 2 per user",
            target=f"{expected} rejected, 200 engines, 0 left in use",
            achieved=(
                f"{r['rejected']} rejected, {r['created']} created / {r['closed']} closed, peak "
                f"{r['peak_per_user']} per user, {r['in_use_after']} in use after"
            ),
            ok=reject_ok,
            value=Quantity(r["rejected"], "requests"),
            goal=Goal("==", expected, "requests"),
            details={
                "created": Quantity(r["created"], "engines"),
                "closed": Quantity(r["closed"], "engines"),
                "peak_per_user": Quantity(r["peak_per_user"], "engines"),
                "in_use_after": Quantity(r["in_use_after"], "slots"),
            },
        ),
        Row(
            id="engines.timeout_mode",
            kind="correctness",
            metric="Timeout mode (`timeout=0.02`): 5 waiters on a full user",
            target="5 timed out after ≥ 20 ms, no slot taken or left waiting",
            achieved=(
                f"{r['timed_out']} timed out, shortest wait {r['min_waited_s'] * 1e3:.1f} ms, "
                f"{r['waiting_after_timeouts']} waiting after"
            ),
            ok=timeout_ok,
            value=Quantity(r["timed_out"], "waiters"),
            goal=Goal("==", 5, "waiters"),
            details={
                "shortest_wait": Quantity(r["min_waited_s"] * 1e3, "ms"),
                "waiting_after": Quantity(r["waiting_after_timeouts"], "waiters"),
                "in_use_after": Quantity(r["in_use_after_timeouts"], "slots"),
            },
        ),
    ]


def _distinct_rows(out: Table, n: int) -> None:
    quota = LocalQuota(per_key=PER_USER)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(n):
            quota.acquire_nowait(f"user-{i}").release()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stats = quota.stats()
    retained = after - before
    out.figures["distinct_users"] = {
        "users": n,
        "granted": stats.granted,
        "keys_left": stats.keys,
        "retained_bytes": retained,
    }
    out.rows.append(
        Row(
            id="engines.distinct_users_left",
            kind="correctness",
            metric=f"{n:,} distinct users through a quota: per-user state left, memory retained",
            target="0 users, < 1 MiB",
            achieved=(
                f"**{stats.keys}** users, {retained / 1024:.1f} KiB ({stats.granted:,} granted)"
            ),
            ok=stats.keys == 0 and retained < RETAINED_LIMIT,
            value=Quantity(stats.keys, "users"),
            goal=Goal("==", 0, "users"),
            details={
                "retained": Quantity(retained, "B"),
                "granted": Quantity(stats.granted, "leases"),
            },
        )
    )


def engines_section(scale: Scale, progress: Progress) -> SectionResult:
    """
    Measure engines and quotas: the legacy scenario, hot paths, rejections,
    timeouts and memory.
    """
    out = progress.table("engines")
    progress("engines", STEPS[0])
    _legacy_rows(out, scale)
    progress("engines", STEPS[1])
    _memory_rows(out)
    loop = asyncio.new_event_loop()
    try:
        progress("engines", STEPS[2])
        in_empty_context(lambda: _engine_rows(out, scale, loop))
        progress("engines", STEPS[3])
        in_empty_context(lambda: _quota_rows(out, scale, loop))
    finally:
        loop.close()
    progress("engines", STEPS[4])
    _reject_rows(out)
    progress("engines", STEPS[5])
    _distinct_rows(out, scale.distinct_keys)
    notes = (
        (
            f"The legacy scenario: {USERS * REQUESTS_PER_USER:,} requests from {USERS} users, "
            f"{PER_USER} engines per user, {WORK_S * 1e3:g} ms of work each, all released at "
            f"once; each variant ran {scale.scenario_rounds} time(s), interleaved, and the best "
            "run is shown. Latency counts from release to the end of the request."
        ),
        (
            "Floors: one `asyncio.Semaphore` per user; for the engine lifecycle, the semaphore "
            "and a trivial engine created and closed by hand; for rejections, a dict-of-int "
            "quota with the same methods."
        ),
        (
            "Legacy figures (P50 45 ms, P95 125 ms, P99 250 ms, 8.5 s wall, ~8 ms per engine "
            "plus ~2 ms cleanup, 35 MB growth) are those of the legacy report, not measured here."
        ),
    )
    return SectionResult(tuple(out.rows), out.figures, notes)

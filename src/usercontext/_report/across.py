"""
The "Across processes" section of ``usercontext report``.

It runs `usercontext.redis.RedisQuota` and `usercontext.redis.RedisBus` the
way a service with several workers does, in real processes on a real Redis:
the Redis at ``USERCONTEXT_REPORT_REDIS_URL`` when it is set (under a key
prefix of the run's own, removed afterwards), else a ``redis-server`` it starts
on a free port of 127.0.0.1 and stops at the end. The fault scenarios always
use a server of their own, which they kill and restart.

redis-py comes with the ``redis`` extra. Without it, or without a Redis to
use, the section reports one info row that says so.
"""

# redis-py's API is typed with untyped **kwargs, which strict pyright reports
# at every call.
# pyright: reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import multiprocessing
import os
import statistics
import time

from typing import TYPE_CHECKING, Any

from .frame import SectionResult, Table, in_thread
from .redis_server import NoRedisServerError, RedisServer, redis_server_binary
from .rows import Goal, Quantity, Row


if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from .frame import Progress
    from .scale import Scale


__all__ = ["INSTALL_HINT", "REDIS_URL_VAR", "STEPS", "across_section"]

REDIS_URL_VAR = "USERCONTEXT_REPORT_REDIS_URL"
INSTALL_HINT = "install usercontext[redis] to measure quotas and events across processes"
STEPS = (
    "quota: 4 processes, one user",
    "quota: a holder killed",
    "quota: Redis killed and restarted",
    "events: across instances",
)
PROCESSES = 4
PER_KEY = 5
HOLD_S = 0.001
KILL_TTL_S = 1.0
KILL_SLACK_S = 0.5
UNAVAILABLE_TARGET_S = 0.5
RECOVERY_TARGET_S = 1.0
EVENT_USERS = 10
LEGACY_EVENTS_PER_S = 2_000.0  # the legacy report: "~2,000 events/s"
EVENTS_P99_TARGET_MS = 10.0


def _spawn() -> Any:
    # A fresh interpreter per worker, as a server's workers are: fork would copy
    # this process's event loop and connections.
    return multiprocessing.get_context("spawn")


def _info(key: str, metric: str, why: str) -> Row:
    return Row(
        id=f"across.{key}",
        kind="info",
        metric=metric,
        target="none (info)",
        achieved=f"not measured: {why}",
        note=f"not measured: {why}",
    )


def across_section(scale: Scale, progress: Progress) -> SectionResult:
    """
    Measure the Redis quota and event bus across processes: the limit under
    contention, a killed holder, a killed server, and events across instances.
    """
    if importlib.util.find_spec("redis") is None:
        for step in STEPS:
            progress("across", step)
        row = _info("not_measured", "Across processes", INSTALL_HINT)
        return SectionResult((row,), {"skipped": "not installed: redis"})
    url = os.environ.get(REDIS_URL_VAR)
    server: RedisServer | None = None
    if not url:
        try:
            server = RedisServer.start()
        except NoRedisServerError as e:
            for step in STEPS:
                progress("across", step)
            why = f"set {REDIS_URL_VAR}, or put redis-server on PATH ({e})"
            row = _info("not_measured", "Across processes", why)
            return SectionResult((row,), {"skipped": str(e)})
        url = server.url
    out = progress.table("across")
    prefix = f"usercontext-report-{os.urandom(4).hex()}"
    sizes = _Sizes.of(scale)
    try:
        progress("across", STEPS[0])
        _contention(out, url, prefix, sizes)
        progress("across", STEPS[1])
        _killed_holder(out, url, prefix)
        progress("across", STEPS[2])
        _killed_server(out)
        progress("across", STEPS[3])
        _events(out, url, prefix, sizes)
    finally:
        _forget(url, prefix)
        if server is not None:
            server.stop()
    notes = (
        (
            f"Contention: {PROCESSES} processes (spawned, as a server's workers are), each "
            f"with its own RedisQuota of {PER_KEY} per user, acquire and release "
            f"{sizes.acquires:,} slots of one user in {sizes.tasks} tasks each, holding each "
            f"for {HOLD_S * 1e3:g} ms; a Redis counter incremented inside every slot gives the "
            "concurrency observed across all of them."
        ),
        (
            f"A holder killed: a process holding the user's only slot (leases of "
            f"{KILL_TTL_S:g} s) is killed with SIGKILL; another process's waiter is timed "
            "until it gets the slot."
        ),
        (
            "Redis killed and restarted: on a server of the report's own, a quota that fails "
            "closed is timed until it raises BackendUnavailableError, and, once the server "
            "is started again, until it grants a slot."
        ),
        (
            f"Events: two hubs on two connections (two instances); one emits to "
            f"{EVENT_USERS} users, one emit awaited at a time; the other delivers to a sink "
            "per user. Both run in the report's process, on one event loop: the rate is that "
            "of one core doing both sides. Latency is from the emit's start to the sink, on "
            "one clock."
        ),
    )
    return SectionResult(tuple(out.rows), out.figures, notes)


class _Sizes:
    def __init__(self, acquires: int, tasks: int, events: int) -> None:
        self.acquires = acquires
        self.tasks = tasks
        self.events = events

    @classmethod
    def of(cls, scale: Scale) -> _Sizes:
        quick = scale.scenario_rounds == 1
        return cls(acquires=100 if quick else 500, tasks=4, events=500 if quick else 5_000)


def _forget(url: str, prefix: str) -> None:
    """
    Delete every key the run left under *prefix* (there should be none).
    """
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"*{prefix}*", count=1_000):
            client.delete(key)
    finally:
        client.close()


def _left(url: str, prefix: str) -> int:
    """
    Count the keys under *prefix*, once the run's own counter is deleted.
    """
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.delete(f"{prefix}:observed")
        return sum(1 for _ in client.scan_iter(match=f"*{prefix}*", count=1_000))
    finally:
        client.close()


def _run(main: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """
    Run ``main(*args)`` in a new event loop, on a thread of its own (`in_thread`).
    """
    return in_thread(lambda: asyncio.run(main(*args)))


# -- Contention -------------------------------------------------------------------


async def _acquire_many(url: str, prefix: str, acquires: int, tasks: int) -> dict[str, float]:
    import redis.asyncio

    from usercontext.redis import RedisQuota

    client = redis.asyncio.Redis.from_url(url)
    seen = 0
    counter = f"{prefix}:observed"

    async def worker(quota: Any, n: int) -> None:
        nonlocal seen
        for _ in range(n):
            lease = await quota.acquire("u-report")
            try:
                seen = max(seen, await client.incr(counter))
                await asyncio.sleep(HOLD_S)
                await client.decr(counter)
            finally:
                await quota.arelease(lease)

    start = time.perf_counter()
    async with RedisQuota(client, per_key=PER_KEY, prefix=prefix) as quota:
        await asyncio.gather(*(worker(quota, acquires // tasks) for _ in range(tasks)))
    elapsed = time.perf_counter() - start
    await client.aclose()
    return {"max_seen": seen, "acquired": acquires // tasks * tasks, "seconds": elapsed}


def _contention(out: Table, url: str, prefix: str, sizes: _Sizes) -> None:
    with concurrent.futures.ProcessPoolExecutor(PROCESSES, mp_context=_spawn()) as pool:
        results = list(
            pool.map(
                _run,
                [_acquire_many] * PROCESSES,
                [url] * PROCESSES,
                [prefix] * PROCESSES,
                [sizes.acquires] * PROCESSES,
                [sizes.tasks] * PROCESSES,
            )
        )
    observed = max(int(r["max_seen"]) for r in results)
    acquired = sum(int(r["acquired"]) for r in results)
    seconds = max(r["seconds"] for r in results)
    left = _left(url, prefix)
    out.figures["contention"] = {"results": results, "keys_left": left}
    out.rows += [
        Row(
            id="across.quota_limit",
            kind="correctness",
            metric=f"Slots of one user held at once, {PROCESSES} processes, limit {PER_KEY}",
            target=f"≤ {PER_KEY}",
            achieved=f"**{observed}** of {acquired:,} acquired",
            ok=0 < observed <= PER_KEY and acquired == PROCESSES * sizes.acquires,
            value=Quantity(observed, "slots"),
            goal=Goal("<=", PER_KEY, "slots"),
            details={"acquired": Quantity(acquired, "slots")},
        ),
        Row(
            id="across.quota_rate",
            kind="info",
            metric="Acquire + release across processes, one user",
            target="none (info)",
            achieved=f"{acquired / seconds:,.0f}/s",
            value=Quantity(acquired / seconds, "1/s"),
        ),
        Row(
            id="across.quota_keys_left",
            kind="correctness",
            metric="Keys left in Redis once every slot is released",
            target="0",
            achieved=f"**{left}**",
            ok=left == 0,
            value=Quantity(left, "keys"),
            goal=Goal("==", 0, "keys"),
        ),
    ]


# -- A holder killed --------------------------------------------------------------


async def _hold(url: str, prefix: str, ready: Any) -> None:  # pragma: no cover
    # It runs in the process the scenario kills, which writes no coverage data.
    from usercontext.redis import RedisQuota

    quota = RedisQuota(url, per_key=1, prefix=prefix, ttl=KILL_TTL_S)
    await quota.acquire("u-killed")
    ready.set()
    await asyncio.sleep(3_600)  # until killed


async def _wait_for_slot(url: str, prefix: str, killed_at: Callable[[], float]) -> float:
    from usercontext.redis import RedisQuota

    async with RedisQuota(url, per_key=1, prefix=prefix, ttl=KILL_TTL_S) as quota:
        lease = await quota.acquire("u-killed", timeout=KILL_TTL_S * 10)
        got = time.monotonic()
        await quota.arelease(lease)
    return got - killed_at()


def _killed_holder(out: Table, url: str, prefix: str) -> None:
    import signal

    context = _spawn()
    ready = context.Event()
    holder = context.Process(target=_run, args=(_hold, url, prefix, ready), daemon=True)
    holder.start()
    try:
        if not ready.wait(30):  # pragma: no cover  # a Redis that refuses: the section crashes
            msg = "the holding process did not acquire its slot within 30 s"
            raise RuntimeError(msg)
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        back = _run(_wait_for_slot, url, prefix, lambda: killed)
    finally:
        holder.kill()
        holder.join()
    target = KILL_TTL_S + KILL_SLACK_S
    out.figures["killed_holder_s"] = back
    out.rows.append(
        Row(
            id="across.killed_holder",
            kind="correctness",
            metric=f"Slot of a holder killed with SIGKILL back, leases of {KILL_TTL_S:g} s",
            target=f"≤ {target:g} s (TTL + {KILL_SLACK_S:g} s)",
            achieved=f"**{back:.2f} s**",
            ok=back <= target,
            value=Quantity(back, "s"),
            goal=Goal("<=", target, "s"),
        )
    )


# -- Redis killed -----------------------------------------------------------------


async def _through_a_restart(server: RedisServer) -> tuple[float, float]:
    from usercontext.exceptions import BackendUnavailableError
    from usercontext.redis import RedisQuota

    async with RedisQuota(server.url, per_key=1) as quota:
        await quota.arelease(await quota.acquire("u-restart"))
        server.kill()
        killed = time.monotonic()
        try:
            await quota.acquire("u-restart")
        except BackendUnavailableError:
            refused = time.monotonic() - killed
        else:  # pragma: no cover  # would be a bug, reported as a failed row
            refused = float("inf")
        await asyncio.to_thread(server.launch)
        restarted = time.monotonic()
        while True:
            try:
                lease = await quota.acquire("u-restart", timeout=0)
            except BackendUnavailableError:  # noqa: PERF203  # pragma: no cover  # polled until it answers; it answers the first try once launch() returns
                await asyncio.sleep(0.01)
            else:
                recovered = time.monotonic() - restarted
                await quota.arelease(lease)
                return refused, recovered


def _killed_server(out: Table) -> None:
    if redis_server_binary() is None:
        out.rows.append(
            _info(
                "killed_server",
                "Redis killed and restarted",
                "no redis-server binary on PATH to start a server of the report's own",
            )
        )
        return
    server = RedisServer.start()
    try:
        refused, recovered = _run(_through_a_restart, server)
    finally:
        server.stop()
    out.figures["killed_server"] = {"unavailable_s": refused, "recovered_s": recovered}
    out.rows += [
        Row(
            id="across.unavailable",
            kind="correctness",
            metric="Redis killed: BackendUnavailableError raised (fail_closed)",
            target=f"≤ {UNAVAILABLE_TARGET_S:g} s",
            achieved=f"**{refused * 1e3:.0f} ms**",
            ok=refused <= UNAVAILABLE_TARGET_S,
            value=Quantity(refused, "s"),
            goal=Goal("<=", UNAVAILABLE_TARGET_S, "s"),
        ),
        Row(
            id="across.recovered",
            kind="correctness",
            metric="Redis restarted: slots granted again",
            target=f"≤ {RECOVERY_TARGET_S:g} s",
            achieved=f"**{recovered * 1e3:.0f} ms**",
            ok=recovered <= RECOVERY_TARGET_S,
            value=Quantity(recovered, "s"),
            goal=Goal("<=", RECOVERY_TARGET_S, "s"),
        ),
    ]


# -- Events -----------------------------------------------------------------------


async def _deliver(url: str, prefix: str, n: int) -> dict[str, Any]:
    """
    Emit *n* events to `EVENT_USERS` users on one hub; deliver them on
    another; return what each sink got and the latencies.
    """
    from usercontext import EmitterHub, UserContext
    from usercontext.redis import RedisBus

    users = [f"u-{i}" for i in range(EVENT_USERS)]
    received: dict[str, list[int]] = {u: [] for u in users}
    latencies: list[float] = []
    done = asyncio.Event()
    total = n // EVENT_USERS * EVENT_USERS

    class Sink:
        def __init__(self, user: str) -> None:
            self.user = user

        async def send(self, events: Any) -> None:
            now = time.time()
            for e in events:
                received[self.user].append(e.seq)
                latencies.append(now - e.data["at"])
            if sum(map(len, received.values())) >= total:
                done.set()

    async with (
        EmitterHub(bus=RedisBus(url, prefix=prefix)) as delivering,
        EmitterHub(bus=RedisBus(url, prefix=prefix)) as emitting,
    ):
        for u in users:
            await delivering.aattach(u, Sink(u))
        emitters = [
            emitting.emitter(UserContext(user_id=u, thread_id="t", run_id="r")) for u in users
        ]
        start = time.perf_counter()
        # One emit at a time, so that a latency is the path's, not a queue's.
        for i in range(total // EVENT_USERS):
            for emitter in emitters:
                await emitter.emit("report_event", {"i": i, "at": time.time()})
        await asyncio.wait_for(done.wait(), 60)
        elapsed = time.perf_counter() - start
    return {"received": received, "latencies": latencies, "seconds": elapsed, "sent": total}


def _events(out: Table, url: str, prefix: str, sizes: _Sizes) -> None:
    result = _run(_deliver, url, prefix, sizes.events)
    per_user = result["sent"] // EVENT_USERS
    exact = list(range(1, per_user + 1))
    # The events of the users whose sink got exactly 1..n, in order, once.
    in_order = sum(len(seqs) for seqs in result["received"].values() if seqs == exact)
    latencies = sorted(result["latencies"])
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    rate = result["sent"] / result["seconds"]
    out.figures["events"] = {
        "sent": result["sent"],
        "received": sum(map(len, result["received"].values())),
        "p50_s": p50,
        "p99_s": p99,
        "events_per_s": rate,
    }
    out.rows += [
        Row(
            id="across.events_once_in_order",
            kind="correctness",
            metric=f"Events delivered on another instance, {EVENT_USERS} users",
            target="all, in order, once",
            achieved=f"**{in_order:,} of {result['sent']:,}**",
            ok=in_order == result["sent"],
            value=Quantity(in_order, "events"),
            goal=Goal("==", result["sent"], "events"),
        ),
        Row(
            id="across.events_latency",
            kind="performance",
            metric="Delivery latency across instances, P50 / P99",
            target=f"P99 ≤ {EVENTS_P99_TARGET_MS:g} ms",
            achieved=f"{p50 * 1e3:.2f} / **{p99 * 1e3:.2f} ms**",
            ok=p99 * 1e3 <= EVENTS_P99_TARGET_MS,
            value=Quantity(p99 * 1e3, "ms"),
            goal=Goal("<=", EVENTS_P99_TARGET_MS, "ms"),
            details={"p50": Quantity(p50 * 1e3, "ms")},
        ),
        Row(
            id="across.events_rate",
            kind="performance",
            metric="Events emitted and delivered across instances",
            target=f"≥ {LEGACY_EVENTS_PER_S:,.0f}/s (legacy ~2,000/s, in one process)",
            achieved=f"**{rate:,.0f}/s**",
            ok=rate >= LEGACY_EVENTS_PER_S,
            value=Quantity(rate, "1/s"),
            goal=Goal(">=", LEGACY_EVENTS_PER_S, "1/s"),
        ),
    ]

"""
Benchmarks of `LocalQuota` and `EngineFactory`, each paired with its floor.

Every timed function runs a batch of operations inside one asyncio event loop,
so the loop's own overhead is paid equally by a benchmark and its floor.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import usercontext as uc

from usercontext._report.floors import DictQuota, RejectedError


BATCH = 1_000


@pytest.fixture(name="loop", scope="module")
def _loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.benchmark(group="quota: uncontended acquire + release")
def test_semaphore_dict_floor(benchmark, loop):
    """
    Floor: a dict of `asyncio.Semaphore`, one per key, acquired and released
    on a hot key.
    """
    sems = {"u-42": asyncio.Semaphore(2)}

    async def batch():
        for _ in range(BATCH):
            sem = sems["u-42"]
            await sem.acquire()
            sem.release()

    benchmark(lambda: loop.run_until_complete(batch()))


@pytest.mark.benchmark(group="quota: uncontended acquire + release")
def test_local_quota(benchmark, loop):
    """
    `await quota.acquire(key)` and `lease.release()` on a hot key with room.
    Target: <= 1.3x the floor.
    """
    quota = uc.LocalQuota(per_key=2)

    async def batch():
        for _ in range(BATCH):
            lease = await quota.acquire("u-42")
            lease.release()

    benchmark(lambda: loop.run_until_complete(batch()))
    assert quota.stats().in_use == 0


@pytest.mark.benchmark(group="quota: uncontended acquire + release")
def test_local_quota_protocol(benchmark, loop):
    """
    `await quota.acquire(key)` and `await quota.arelease(lease)`, the `Quota`
    protocol's calls, as `EngineFactory` makes them. Target: <= 1.3x the floor.
    """
    quota = uc.LocalQuota(per_key=2)

    async def batch():
        for _ in range(BATCH):
            lease = await quota.acquire("u-42")
            await quota.arelease(lease)

    benchmark(lambda: loop.run_until_complete(batch()))
    assert quota.stats().in_use == 0


@pytest.mark.benchmark(group="quota: reject by acquire_nowait")
def test_reject_nowait_floor(benchmark):
    """
    Floor: `acquire_nowait` of a dict-of-int quota raising for a key at its
    limit, caught by the caller.
    """
    quota = DictQuota(2)
    quota.acquire_nowait("u-42")
    quota.acquire_nowait("u-42")

    def batch():
        for _ in range(BATCH):
            try:
                quota.acquire_nowait("u-42")
            except RejectedError:
                pass

    benchmark(batch)


@pytest.mark.benchmark(group="quota: reject by acquire_nowait")
def test_acquire_nowait_rejected(benchmark):
    """
    `quota.acquire_nowait(key)` raising `QuotaExceededError` because the key
    is at its limit, caught. Target: <= 1.5x the floor.
    """
    quota = uc.LocalQuota(per_key=2)
    held = [quota.acquire_nowait("u-42"), quota.acquire_nowait("u-42")]

    def batch():
        for _ in range(BATCH):
            try:
                quota.acquire_nowait("u-42")
            except uc.QuotaExceededError:
                pass

    benchmark(batch)
    assert quota.stats().rejected >= BATCH
    for lease in held:
        lease.release()


@pytest.mark.benchmark(group="quota: reject by raising")
def test_reject_raise_floor(benchmark, loop):
    """
    Floor: `await acquire(key, timeout=0)` of a dict-of-int quota raising for
    a key at its limit, caught by the caller.
    """
    quota = DictQuota(2)
    quota.acquire_nowait("u-42")
    quota.acquire_nowait("u-42")

    async def batch():
        for _ in range(BATCH):
            try:
                await quota.acquire("u-42", timeout=0)
            except RejectedError:
                pass

    benchmark(lambda: loop.run_until_complete(batch()))


@pytest.mark.benchmark(group="quota: reject by raising")
def test_acquire_timeout_zero(benchmark, loop):
    """
    `await quota.acquire(key, timeout=0)` raising `QuotaExceededError`, caught.
    Target: <= 1.5x the floor.
    """
    quota = uc.LocalQuota(per_key=2)
    held = [quota.acquire_nowait("u-42"), quota.acquire_nowait("u-42")]

    async def batch():
        for _ in range(BATCH):
            try:
                await quota.acquire("u-42", timeout=0)
            except uc.QuotaExceededError:
                pass

    benchmark(lambda: loop.run_until_complete(batch()))
    for lease in held:
        lease.release()


async def _legacy_scenario(acquire_for):
    """
    1,000 requests from 100 users (10 each), 10 ms of work each, all released
    at once; return the sorted latencies in ms.
    """
    latencies: list[float] = []
    start = asyncio.Event()

    async def request(i: int) -> None:
        await start.wait()
        t0 = time.perf_counter()
        async with acquire_for(f"user-{i % 100}"):
            await asyncio.sleep(0.01)
        latencies.append((time.perf_counter() - t0) * 1e3)

    tasks = [asyncio.create_task(request(i)) for i in range(1_000)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.gather(*tasks)
    return sorted(latencies)


def _record(benchmark, latencies):
    benchmark.extra_info["p50_ms"] = latencies[499]
    benchmark.extra_info["p95_ms"] = latencies[949]
    benchmark.extra_info["p99_ms"] = latencies[989]


@pytest.mark.benchmark(group="quota: legacy scenario (1,000 requests, 100 users, limit 2)")
def test_legacy_scenario_semaphore_floor(benchmark, loop):
    """
    Floor: the legacy scenario with one `asyncio.Semaphore(2)` per user.
    P50 and P99 request latency are in the benchmark's extra info.
    """
    result: list[list[float]] = []

    def run():
        sems: dict[str, asyncio.Semaphore] = {}

        def acquire_for(user: str) -> asyncio.Semaphore:
            sem = sems.get(user)
            if sem is None:
                sem = sems[user] = asyncio.Semaphore(2)
            return sem

        result.append(loop.run_until_complete(_legacy_scenario(acquire_for)))

    benchmark.pedantic(run, rounds=5, iterations=1)
    _record(benchmark, min(result, key=lambda lat: lat[499]))


@pytest.mark.benchmark(group="quota: legacy scenario (1,000 requests, 100 users, limit 2)")
def test_legacy_scenario_local_quota(benchmark, loop):
    """
    The legacy scenario under `LocalQuota(per_key=2)`. Targets: P50 <= 1.1x and
    P99 <= 1.15x the floor's (the legacy system reported P50 45 ms, P99 250 ms).
    """
    result: list[list[float]] = []
    quota = uc.LocalQuota(per_key=2)

    class _Slot:
        def __init__(self, user: str) -> None:
            self.user = user

        async def __aenter__(self) -> None:
            self.lease = await quota.acquire(self.user)

        async def __aexit__(self, *exc: object) -> None:
            self.lease.release()

    def run():
        result.append(loop.run_until_complete(_legacy_scenario(_Slot)))

    benchmark.pedantic(run, rounds=5, iterations=1)
    _record(benchmark, min(result, key=lambda lat: lat[499]))
    assert quota.stats().in_use == 0
    assert quota.stats().peak <= 200


def _engine_floor_batch():
    """
    The floor's batch: a per-user semaphore, a trivial engine created and
    closed by hand.
    """
    sems = {"u-42": asyncio.Semaphore(2)}
    closed: list[object] = []

    async def batch():
        for _ in range(BATCH):
            sem = sems["u-42"]
            async with sem:
                engine = object()
                closed.append(engine)
        closed.clear()

    return batch


def _engine_factory_batch():
    """
    Our batch, and the factory it uses: `async with factory.engine(ctx)` with
    a trivial sync create and close, *ctx* not bound before.
    """
    closed: list[object] = []
    factory = uc.EngineFactory(lambda _ctx: object(), close=closed.append, per_user=2)
    ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")

    async def batch():
        for _ in range(BATCH):
            async with factory.engine(ctx):
                pass
        closed.clear()

    return batch, factory


@pytest.mark.benchmark(group="factory: engine per request, uncontended")
def test_engine_floor(benchmark, loop):
    """
    Floor: a per-user semaphore, a trivial engine created and closed by hand.
    """
    batch = _engine_floor_batch()
    benchmark(lambda: loop.run_until_complete(batch()))


@pytest.mark.benchmark(group="factory: engine per request, uncontended")
def test_engine_factory(benchmark, loop):
    """
    `async with factory.engine(ctx)` with a trivial sync create and close:
    the quota, the bind and the close together. Target: <= 2.5x the floor.
    """
    batch, factory = _engine_factory_batch()
    benchmark(lambda: loop.run_until_complete(batch()))
    stats = factory.stats()
    assert stats.created == stats.closed
    assert stats.in_use == 0


@pytest.mark.benchmark(group="factory: engine per request, uncontended")
def test_engine_interleaved(benchmark, loop):
    """
    The floor and `test_engine_factory` timed in turn within every call: the
    ratio of their best times is in ``extra_info["ratio"]``, the one to read
    on a busy machine. Target: <= 2.5x.
    """
    floor = _engine_floor_batch()
    ours, factory = _engine_factory_batch()
    times: dict[str, list[float]] = {"floor": [], "factory": []}
    order = [("floor", floor), ("factory", ours)]

    def call():
        order.reverse()  # each goes first in turn
        for name, batch in order:
            started = time.perf_counter_ns()
            loop.run_until_complete(batch())
            times[name].append((time.perf_counter_ns() - started) / BATCH)

    benchmark(call)
    best = {name: min(ts) for name, ts in times.items()}
    benchmark.extra_info.update(
        {"floor_ns": best["floor"], "factory_ns": best["factory"]}
        | {"ratio": best["factory"] / best["floor"]}
    )
    assert factory.stats().created == factory.stats().closed == len(times["factory"]) * BATCH

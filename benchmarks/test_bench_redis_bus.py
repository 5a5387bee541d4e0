"""
Benchmarks of `usercontext.redis.RedisBus` across two instances, each paired
with its floor: a raw Redis Streams producer and consumer (``XADD`` on one
client, ``XREAD BLOCK`` on another) moving the same number of events.

The two instances are two hubs with a client each in one process and loop (one
emits, the other has the sink), as two processes would be, without the noise
of a second process on a shared machine. Each timed call moves ``EVENTS``
events of one user, one emit (one round trip) after the other, and records
each event's delivery latency (emit call to the sink's ``send``); the P99 is
printed after the run. They need a Redis at ``USERCONTEXT_TEST_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``; database 15 is used and emptied).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest


redis = pytest.importorskip("redis.asyncio")

import usercontext as uc  # noqa: E402  # after the skip

from usercontext.redis import RedisBus  # noqa: E402  # after the skip


EVENTS = 500
URL = (
    os.environ.get("USERCONTEXT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    + "/15"
)
LATENCIES: dict[str, list[float]] = {}


@pytest.fixture(name="loop", scope="module")
def _loop():
    loop = asyncio.new_event_loop()
    client = redis.from_url(URL)
    try:
        loop.run_until_complete(client.ping())
    except Exception as e:  # noqa: BLE001  # any failure means no server
        loop.close()
        pytest.skip(f"no Redis at {URL}: {e}")
    loop.run_until_complete(client.aclose())
    yield loop
    for name, values in LATENCIES.items():
        values.sort()
        p50, p99 = values[len(values) // 2], values[int(len(values) * 0.99)]
        print(f"\n{name}: P50 {p50 * 1e6:.0f} us, P99 {p99 * 1e6:.0f} us")  # noqa: T201  # the P99 has no column
    loop.close()


@pytest.mark.benchmark(group="redis bus: events across two instances")
def test_raw_streams_floor(benchmark, loop):
    """
    Floor: ``XADD`` (MAXLEN ~) on one client, ``XREAD BLOCK`` on another, the
    same JSON payload.
    """
    producer, consumer = redis.from_url(URL), redis.from_url(URL)
    latencies = LATENCIES.setdefault("raw XADD + XREAD BLOCK", [])
    payload = '["tick",1.0,"t","r",null]\n{"i":1}'

    async def batch():
        await producer.delete("floor")
        sent: list[float] = []
        last = b"0-0"
        received = 0

        async def consume():
            nonlocal last, received
            while received < EVENTS:
                reply = await consumer.xread({"floor": last}, block=1000, count=256)
                now = time.perf_counter()
                for _, entries in reply:
                    for entry_id, _fields in entries:
                        latencies.append(now - sent[received])
                        last = entry_id
                        received += 1

        task = asyncio.ensure_future(consume())
        for _ in range(EVENTS):
            sent.append(time.perf_counter())
            await producer.xadd("floor", {"p": payload}, maxlen=1000, approximate=True)
        await task

    benchmark(lambda: loop.run_until_complete(batch()))
    loop.run_until_complete(producer.aclose())
    loop.run_until_complete(consumer.aclose())


@pytest.mark.benchmark(group="redis bus: events across two instances")
def test_bus(benchmark, loop):
    """
    ``await emitter.emit(type, data)`` on hub A, delivered to a sink on hub B.
    """
    latencies = LATENCIES.setdefault("RedisBus, A to B", [])
    state: dict[str, object] = {}

    class Sink:
        count = 0
        base = 0
        waiter: asyncio.Future[None] | None = None
        target = 0

        async def send(self, events):
            now = time.perf_counter()
            sent = state["sent"]
            for _ in events:
                latencies.append(now - sent[self.count - self.base])  # type: ignore[index]
                self.count += 1
            if self.waiter is not None and self.count >= self.target and not self.waiter.done():
                self.waiter.set_result(None)

    sink = Sink()

    ready, stop = asyncio.Event(), asyncio.Event()

    async def run():
        async with uc.EmitterHub(bus=RedisBus(URL)) as a, uc.EmitterHub(bus=RedisBus(URL)) as b:
            await b.aattach("bench-user", sink)
            ctx = uc.UserContext(user_id="bench-user", thread_id="t", run_id="r")
            state["emitter"] = a.emitter(ctx)
            ready.set()
            await stop.wait()

    async def start():
        state["task"] = asyncio.ensure_future(run())
        await ready.wait()

    async def batch():
        emitter = state["emitter"]
        sent: list[float] = []
        state["sent"] = sent
        sink.base = sink.count
        sink.target = sink.count + EVENTS
        sink.waiter = asyncio.get_running_loop().create_future()
        for i in range(EVENTS):
            sent.append(time.perf_counter())
            await emitter.emit("tick", {"i": i})  # type: ignore[attr-defined]
        await sink.waiter

    async def finish():
        stop.set()
        await state["task"]  # type: ignore[misc]

    loop.run_until_complete(start())
    try:
        benchmark(lambda: loop.run_until_complete(batch()))
    finally:
        loop.run_until_complete(finish())

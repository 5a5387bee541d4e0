"""
Benchmarks of `usercontext.redis.RedisBus` across two processes, each paired
with its floor in the same run: a raw Redis Streams producer and consumer
(``XADD`` in this process, ``XREAD BLOCK`` in another) moving the same number
of events with the same payload.

The publishing hub is in this process; the subscribed hub (with the sink) is in
a child process, started once per test and kept for every round, as two
instances of a service would be. Each round moves ``EVENTS`` events of one
user, one emit (one round trip) after the other. Each event carries the
``time.perf_counter()`` of its emit, a clock shared by the processes of one
machine (``CLOCK_MONOTONIC``), so the child measures each event's delivery
latency (emit call to the sink's ``send``, or to ``XREAD``'s return) and the
round's throughput (events / first emit to last delivery).

Targets, read from ``test_interleaved`` (the floor's round then ours, in every
call, so that both meet the same load of a shared machine; the medians are in
``extra_info`` and printed):

- throughput >= 0.5x the raw pair's (median of the rounds' ratios): an emit
  is one round trip, as an ``XADD`` is, but its script also numbers the event,
  renews the user's keys and publishes it, and the hub builds and encodes the
  event first;
- delivery latency P99 <= 1.5x the raw pair's (median of the rounds'
  ratios of their P99s): the other hub is woken by Pub/Sub, the raw consumer by ``XREAD
  BLOCK``.

They need a Redis at ``USERCONTEXT_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``; database 15 is used and emptied).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
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
USER = "bench-user"

# The subscribed side, in a child process. It prints "ready" once it follows
# the stream; then, for each line N read from stdin, it takes N events,
# prints "armed" first, and when the N-th arrived a JSON line: each event's
# latency (s) and the perf_counter of the last delivery.
_CHILD = r"""
import asyncio, json, sys, time

async def raw(url, stream):
    import redis.asyncio
    client = redis.asyncio.from_url(url)
    last = b"0-0"
    async def take(n):
        nonlocal last
        latencies = []
        while len(latencies) < n:
            reply = await client.xread({stream: last}, block=1000, count=256)
            now = time.perf_counter()
            for _, entries in reply:
                for entry_id, fields in entries:
                    latencies.append(now - json.loads(fields[b"p"])["t"])
                    last = entry_id
        return latencies, now
    return take

async def bus(url, user):
    import usercontext as uc
    from usercontext.redis import RedisBus
    hub = uc.EmitterHub(bus=RedisBus(url))
    await hub.__aenter__()
    state = {"n": 0, "latencies": [], "done": None}
    class Sink:
        async def send(self, events):
            now = time.perf_counter()
            for event in events:
                state["latencies"].append(now - event.data["t"])
            if len(state["latencies"]) >= state["n"] and not state["done"].done():
                state["done"].set_result(now)
    await hub.aattach(user, Sink())
    async def take(n):
        state["n"], state["latencies"] = n, []
        state["done"] = asyncio.get_running_loop().create_future()
        print("armed", flush=True)
        last = await state["done"]
        return state["latencies"], last
    return take

async def main():
    mode, url, name = sys.argv[1:4]
    take = await (raw(url, name) if mode == "raw" else bus(url, name))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        if mode == "raw":
            print("armed", flush=True)
        latencies, last = await take(int(line))
        print(json.dumps({"latencies": latencies, "last": last}), flush=True)

asyncio.run(main())
"""


class _Child:
    """
    The subscribed side in a child process (*mode* ``"raw"`` or ``"bus"``).
    """

    def __init__(self, mode: str, name: str) -> None:
        self.process = subprocess.Popen(  # noqa: S603  # our own interpreter and code
            [sys.executable, "-c", _CHILD, mode, URL, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def arm(self, n: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        assert self._line() == "armed"

    def result(self) -> tuple[list[float], float]:
        reply = json.loads(self._line())
        return reply["latencies"], reply["last"]

    def close(self) -> None:
        self.process.communicate(timeout=10)  # closes stdin: the child ends


class _Results:
    """
    The rounds of one side: per-event latencies and per-round throughput.
    """

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.rates: list[float] = []
        self.p99s: list[float] = []

    def add(self, first: float, latencies: list[float], last: float) -> tuple[float, float]:
        """
        Add a round; return its throughput and its P99 latency.
        """
        rate = len(latencies) / (last - first)
        self.latencies.extend(latencies)
        self.rates.append(rate)
        ordered = sorted(latencies)
        self.p99s.append(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))])
        return rate, self.p99s[-1]

    def p(self, q: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(len(values) * q))]


@pytest.fixture(name="loop", scope="module")
def _loop():
    loop = asyncio.new_event_loop()
    client = redis.from_url(URL)
    try:
        loop.run_until_complete(client.ping())
    except Exception as e:  # noqa: BLE001  # any failure means no server
        loop.close()
        pytest.skip(f"no Redis at {URL}: {e}")
    loop.run_until_complete(client.flushdb())
    loop.run_until_complete(client.aclose())
    yield loop
    loop.close()


class _Raw:
    """
    The floor's publishing side: ``XADD`` (``MAXLEN ~``) of the JSON payload.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.client = redis.from_url(URL)
        loop.run_until_complete(self.client.delete("floor"))  # read from its start
        self.child = _Child("raw", "floor")
        self.results = _Results()

    def round(self) -> tuple[float, float]:
        self.child.arm(EVENTS)

        async def send() -> float:
            first = time.perf_counter()
            for i in range(EVENTS):
                payload = json.dumps({"i": i, "t": time.perf_counter()})
                await self.client.xadd("floor", {"p": payload}, maxlen=1000, approximate=True)
            return first

        first = self.loop.run_until_complete(send())
        return self.results.add(first, *self.child.result())

    def close(self) -> None:
        self.child.close()
        self.loop.run_until_complete(self.client.aclose())


class _Bus:
    """
    Ours' publishing side: ``await emitter.emit(type, data)`` on a hub with a
    `RedisBus`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        ready, self.stop = asyncio.Event(), asyncio.Event()
        emitters: list[uc.Emitter] = []

        async def serve() -> None:
            # The hub lives in one task: it is entered and left there.
            async with uc.EmitterHub(bus=RedisBus(URL)) as hub:
                ctx = uc.UserContext(user_id=USER, thread_id="t", run_id="r")
                emitters.append(hub.emitter(ctx))
                ready.set()
                await self.stop.wait()

        async def start() -> asyncio.Task[None]:
            task = asyncio.ensure_future(serve())
            await ready.wait()
            return task

        self.task = loop.run_until_complete(start())
        self.emitter = emitters[0]
        self.child = _Child("bus", USER)
        self.results = _Results()

    def round(self) -> tuple[float, float]:
        self.child.arm(EVENTS)
        emitter = self.emitter

        async def send() -> float:
            first = time.perf_counter()
            for i in range(EVENTS):
                await emitter.emit("tick", {"i": i, "t": time.perf_counter()})  # type: ignore[attr-defined]
            return first

        first = self.loop.run_until_complete(send())
        return self.results.add(first, *self.child.result())

    def close(self) -> None:
        self.child.close()
        self.stop.set()
        self.loop.run_until_complete(self.task)


def _report(benchmark, name: str, results: _Results) -> None:
    benchmark.extra_info["events_per_s"] = results.rates
    benchmark.extra_info["p50_us"] = results.p(0.5) * 1e6
    benchmark.extra_info["p99_us"] = results.p(0.99) * 1e6
    print(  # noqa: T201  # the latencies have no column
        f"\n{name}: {statistics.median(results.rates):,.0f} events/s (median), "
        f"P50 {results.p(0.5) * 1e6:.0f} us, P99 {results.p(0.99) * 1e6:.0f} us"
    )


@pytest.mark.benchmark(group="redis bus: events across two processes")
def test_raw_streams_floor(benchmark, loop):
    """
    Floor: ``XADD`` here, ``XREAD BLOCK`` in another process, one round of
    ``EVENTS`` events per call.
    """
    side = _Raw(loop)
    try:
        benchmark.pedantic(side.round, rounds=5, iterations=1, warmup_rounds=1)
        _report(benchmark, "raw XADD + XREAD BLOCK", side.results)
    finally:
        side.close()


@pytest.mark.benchmark(group="redis bus: events across two processes")
def test_bus(benchmark, loop):
    """
    ``await emitter.emit(type, data)`` on the hub here, delivered to a sink on
    the hub of another process.
    """
    side = _Bus(loop)
    try:
        benchmark.pedantic(side.round, rounds=5, iterations=1, warmup_rounds=1)
        _report(benchmark, "RedisBus, across processes", side.results)
    finally:
        side.close()


@pytest.mark.benchmark(group="redis bus: interleaved")
def test_interleaved(benchmark, loop):
    """
    A round of the floor then a round of ours in every call. Targets:
    median throughput ratio >= 0.5x, median P99 ratio <= 1.5x (in
    ``extra_info``).
    """
    raw, bus = _Raw(loop), _Bus(loop)
    ratios: list[float] = []
    p99_ratios: list[float] = []
    try:
        raw.round()  # warm-up: connections, scripts, subscriptions
        bus.round()
        raw.results, bus.results = _Results(), _Results()

        def both() -> None:
            floor_rate, floor_p99 = raw.round()
            rate, p99 = bus.round()
            ratios.append(rate / floor_rate)
            p99_ratios.append(p99 / floor_p99)

        benchmark.pedantic(both, rounds=11, iterations=1)
    finally:
        raw.close()
        bus.close()
    # Medians of the rounds' ratios: a round disturbed by the machine's other
    # work moves them less than it moves a P99 over every round.
    throughput = statistics.median(ratios)
    p99 = statistics.median(p99_ratios)
    benchmark.extra_info["throughput_ratios"] = ratios
    benchmark.extra_info["median_throughput_ratio"] = throughput
    benchmark.extra_info["p99_ratios"] = p99_ratios
    benchmark.extra_info["median_p99_ratio"] = p99
    _report(benchmark, "raw XADD + XREAD BLOCK", raw.results)
    _report(benchmark, "RedisBus, across processes", bus.results)
    print(  # noqa: T201  # the ratios have no column
        f"throughput ours / raw: median {throughput:.2f}x; P99 ours / raw: median {p99:.2f}x"
    )

"""
usercontext.otel.instrument: the stats of quotas, engine factories,
registries and hubs, read by the real OpenTelemetry SDK's in-memory metric
reader.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest


pytest.importorskip("opentelemetry.sdk", reason="usercontext.otel's tests need the SDK")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, Sum

import usercontext as uc

from usercontext._otel_metrics import _stats
from usercontext.otel import instrument

from helpers import make_ctx, until


@pytest.fixture(name="reader")
def _reader():
    """
    An in-memory reader, and the meter provider it reads.
    """
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def collect(reader):
    """
    Every point *reader* collects now, as ``{(metric, attributes): value}``,
    and each metric's ``(unit, kind)``, where kind is "counter" (a monotonic
    sum), "updowncounter" or "gauge".
    """
    points, kinds = {}, {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            assert scope.scope.name == "usercontext"
            for metric in scope.metrics:
                if isinstance(metric.data, Gauge):
                    kind = "gauge"
                else:
                    assert isinstance(metric.data, Sum)
                    kind = "counter" if metric.data.is_monotonic else "updowncounter"
                kinds[metric.name] = (metric.unit, kind)
                for point in metric.data.data_points:
                    points[metric.name, tuple(sorted(point.attributes.items()))] = point.value
    return points, kinds


def family(points, name, **attributes):
    """
    The values of the ``usercontext.<name>.*`` metrics of the object named
    by *attributes*, by their last name part.
    """
    key = tuple(sorted(attributes.items()))
    prefix = f"usercontext.{name}."
    return {
        metric[len(prefix) :]: value
        for (metric, attrs), value in points.items()
        if metric.startswith(prefix) and attrs == key
    }


class TestQuotas:
    async def test_local_quota(self, reader):
        """
        A LocalQuota (per key 1, total 3) holding 2 slots, with 1 waiter, after
        1 rejection and 1 timeout, reads as in_use 2, waiting 1, peak 2, limit
        3, granted 2, rejected 1, timed_out 1, cancelled 0, with OTel's kinds
        and units; a second quota is told apart by its name.
        """
        reader, provider = reader
        quota, other = uc.LocalQuota(per_key=1, total=3), uc.LocalQuota(per_key=5)
        instrument(meter_provider=provider, quotas={"engines": quota, "other": other})
        a, b = await quota.acquire("u-1"), await quota.acquire("u-2")
        with pytest.raises(uc.QuotaExceededError):
            await quota.acquire("u-1", timeout=0)
        with pytest.raises(uc.QuotaTimeoutError):
            await quota.acquire("u-1", timeout=0.01)
        async with anyio.create_task_group() as tg:

            async def waiter():
                lease = await quota.acquire("u-1")
                await quota.arelease(lease)

            tg.start_soon(waiter)
            await until(lambda: quota.stats().waiting == 1)
            points, kinds = collect(reader)
            await quota.arelease(a)
        await quota.arelease(b)

        assert family(points, "quota", **{"usercontext.quota.name": "engines"}) == {
            "in_use": 2,
            "waiting": 1,
            "peak": 2,
            "limit": 3,
            "granted": 2,
            "rejected": 1,
            "timed_out": 1,
            "cancelled": 0,
        }
        assert family(points, "quota", **{"usercontext.quota.name": "other"}) == {
            "in_use": 0,
            "waiting": 0,
            "peak": 0,
            "granted": 0,
            "rejected": 0,
            "timed_out": 0,
            "cancelled": 0,
        }
        assert kinds["usercontext.quota.in_use"] == ("{lease}", "updowncounter")
        assert kinds["usercontext.quota.waiting"] == ("{request}", "updowncounter")
        assert kinds["usercontext.quota.peak"] == ("{lease}", "gauge")
        assert kinds["usercontext.quota.rejected"] == ("{request}", "counter")

        points, _ = collect(reader)
        after = family(points, "quota", **{"usercontext.quota.name": "engines"})
        assert (after["in_use"], after["waiting"], after["granted"]) == (0, 0, 3)

    def test_thread_quota(self, reader):
        """
        A ThreadQuota's slots held by 4 threads at once read as in_use 4,
        and 0 once they are released.
        """
        reader, provider = reader
        quota = uc.ThreadQuota(per_key=1)
        instrument(meter_provider=provider, quotas={"threads": quota})
        held, done = threading.Barrier(5), threading.Event()

        def hold(i):
            lease = quota.acquire(f"u-{i}")
            held.wait()
            done.wait()
            quota.release(lease)

        threads = [threading.Thread(target=hold, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        held.wait()
        during, _ = collect(reader)
        done.set()
        for t in threads:
            t.join()
        after, _ = collect(reader)

        name = {"usercontext.quota.name": "threads"}
        assert family(during, "quota", **name)["in_use"] == 4
        assert family(after, "quota", **name)["in_use"] == 0
        assert family(after, "quota", **name)["granted"] == 4


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py runs on asyncio only
async def test_redis_quota(reader, redis_db, anyio_backend):
    """
    A RedisQuota shared by two objects: each reads its own requests (2 held
    by one, 1 by the other, 1 rejected by the other).
    """
    from usercontext.redis import RedisQuota

    reader, provider = reader
    async with (
        RedisQuota(redis_db, per_key=3, prefix="otel-metrics") as first,
        RedisQuota(redis_db, per_key=3, prefix="otel-metrics") as second,
    ):
        instrument(meter_provider=provider, quotas={"a": first, "b": second})
        leases = [await first.acquire("u-1"), await first.acquire("u-1")]
        leases.append(await second.acquire("u-1"))
        with pytest.raises(uc.QuotaExceededError):
            await second.acquire("u-1", timeout=0)
        points, _ = collect(reader)
        await first.arelease(leases[0])
        await first.arelease(leases[1])
        await second.arelease(leases[2])

    a = family(points, "quota", **{"usercontext.quota.name": "a"})
    b = family(points, "quota", **{"usercontext.quota.name": "b"})
    assert (a["in_use"], a["granted"], a["rejected"]) == (2, 2, 0)
    assert (b["in_use"], b["granted"], b["rejected"]) == (1, 1, 1)


class TestFactories:
    async def test_engines(self, reader):
        """
        A factory with 2 engines in use for 2 users, after 1 engine used and
        closed, 1 failed creation and 1 rejection by its quota, reads as
        in_use 2, peak 2, created 3, closed 1, create_errors 1, rejected 1.
        """
        reader, provider = reader
        made = iter(range(100))

        async def create(ctx):
            n = next(made)
            if n == 1:
                raise RuntimeError("engine failed to start")
            return n

        factory = uc.EngineFactory(create, per_user=1, timeout=0)
        instrument(meter_provider=provider, factories={"llm": factory})
        async with factory.engine(make_ctx(1)):
            pass
        with pytest.raises(RuntimeError, match="failed to start"):
            async with factory.engine(make_ctx(1)):
                pass
        held, done = anyio.Event(), anyio.Event()

        async def other_user():
            async with factory.engine(make_ctx(2)):
                held.set()
                await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_user)
            await held.wait()
            async with factory.engine(make_ctx(1)):
                with pytest.raises(uc.QuotaExceededError):
                    async with factory.engine(make_ctx(1)):
                        pass
                points, kinds = collect(reader)
            done.set()
        await factory.aclose()

        got = family(points, "factory", **{"usercontext.factory.name": "llm"})
        assert got == {
            "in_use": 2,
            "idle": 0,
            "peak": 2,
            "waiting": 0,
            "created": 3,
            "closed": 1,
            "reused": 0,
            "rejected": 1,
            "timed_out": 0,
            "create_errors": 1,
            "close_errors": 0,
            "deadline_errors": 0,
        }
        assert kinds["usercontext.factory.in_use"] == ("{engine}", "updowncounter")
        assert kinds["usercontext.factory.close_errors"] == ("{error}", "counter")

    def test_thread_quota_of_a_factory(self, reader):
        """
        A factory used with ``with`` counts its thread quota's rejections.
        """
        reader, provider = reader
        factory = uc.EngineFactory(lambda ctx: object(), per_user=1, timeout=0)
        instrument(meter_provider=provider, factories={"sync": factory})
        with factory.engine(make_ctx(1)):
            with pytest.raises(uc.QuotaExceededError), factory.engine(make_ctx(1)):
                pass
            points, _ = collect(reader)
        got = family(points, "factory", **{"usercontext.factory.name": "sync"})
        assert (got["in_use"], got["rejected"], got["waiting"]) == (1, 1, 0)

    async def test_admission(self, reader):
        """
        A factory's admission policy reads as its rate limit's admitted and
        limited requests, its shed requests by reason, and its breaker's
        state (1 for the current one), open breakers, openings, refusals,
        probes and failures: before and after the breaker's probe closed it.
        """
        reader, provider = reader
        clock = FakeClock()

        async def create(ctx):
            if ctx.user_id == "u-1":
                raise RuntimeError("engine failed to start")
            return ctx.user_id

        factory = uc.EngineFactory(
            create,
            per_user=1,
            admission=uc.Admission(
                rate=uc.LocalRateLimiter(1, burst=2, clock=clock),
                shed=uc.Shed(max_waiting_per_user=0, clock=clock),
                breaker=uc.CircuitBreaker(failures=1, cool_down=10, clock=clock),
            ),
        )
        instrument(meter_provider=provider, factories={"llm": factory})
        name = {"usercontext.factory.name": "llm"}
        with pytest.raises(RuntimeError, match="failed to start"):
            async with factory.engine(make_ctx(1)):
                pass  # pragma: no cover
        for error in (uc.CircuitOpenError, uc.RateLimitedError):
            with pytest.raises(error):
                async with factory.engine(make_ctx(1)):
                    pass  # pragma: no cover
        points, kinds = collect(reader)
        got = family(points, "factory", **name)
        assert {k: v for k, v in got.items() if k.startswith(("rate_", "breaker_"))} == {
            "rate_admitted": 2,
            "rate_limited": 1,
            "breaker_open": 1,
            "breaker_opened": 1,
            "breaker_refused": 1,
            "breaker_probes": 0,
            "breaker_failures": 1,
        }
        assert self.by(points, "breaker_state", name) == {"closed": 0, "open": 1, "half_open": 0}
        assert self.by(points, "shed", name) == {"user_queue": 0, "queue": 0, "deadline": 0}
        clock.now += 10  # the cool-down is over: the next creation is the probe
        assert self.by(collect(reader)[0], "breaker_state", name)["half_open"] == 1
        async with factory.engine(make_ctx(2)):
            with pytest.raises(uc.LoadShedError):
                async with factory.engine(make_ctx(2)):
                    pass  # pragma: no cover
            points, _ = collect(reader)
        got = family(points, "factory", **name)
        assert (got["rate_admitted"], got["rate_limited"], got["shed_peak_waiting"]) == (4, 1, 0)
        assert (got["breaker_open"], got["breaker_probes"], got["in_use"]) == (0, 1, 1)
        assert self.by(points, "breaker_state", name) == {"closed": 1, "open": 0, "half_open": 0}
        assert self.by(points, "shed", name) == {"user_queue": 1, "queue": 0, "deadline": 0}
        assert kinds["usercontext.factory.rate_limited"] == ("{request}", "counter")
        assert kinds["usercontext.factory.shed"] == ("{request}", "counter")
        assert kinds["usercontext.factory.breaker_state"] == ("1", "gauge")
        assert kinds["usercontext.factory.breaker_open"] == ("{breaker}", "updowncounter")
        assert kinds["usercontext.factory.shed_peak_waiting"] == ("{request}", "gauge")
        await factory.aclose()

    @staticmethod
    def by(points, field, name):
        """
        The values of ``usercontext.factory.<field>`` by its one attribute
        besides the factory's name.
        """
        metric = f"usercontext.factory.{field}"
        out = {}
        for (m, attrs), value in points.items():
            rest = dict(attrs)
            if (
                m == metric
                and rest.pop("usercontext.factory.name") == name["usercontext.factory.name"]
            ):
                ((_, label),) = rest.items()
                out[label] = value
        return out


class FakeClock:
    """
    A clock that moves only when told to.
    """

    def __init__(self, now=500.0):
        self.now = now

    def __call__(self):
        return self.now


class TestRegistries:
    async def test_scopes_and_cleanup_errors(self, reader):
        """
        A registry with a scope open holding 2 resources, after a scope whose
        cleanup failed, reads as scopes 1, in_use 2, opened 2, created 3,
        closed 1, close_errors 1.
        """
        reader, provider = reader

        def failing(resource):
            raise OSError("close failed")

        registry = uc.Registry()
        registry.register("db", lambda ctx: object(), close=failing)
        registry.register("cache", lambda ctx: object())
        instrument(meter_provider=provider, registries={"main": registry})
        with pytest.raises(Exception, match=r"1 cleanup\(s\) of a scope of user 'u-1' failed"):
            async with registry.scope(make_ctx(1)) as scope:
                await scope.aget("db")
        with pytest.raises(Exception, match=r"1 cleanup\(s\) of a scope of user 'u-2' failed"):
            async with registry.scope(make_ctx(2)) as scope:
                await scope.aget("db")
                await scope.aget("cache")
                points, kinds = collect(reader)

        got = family(points, "registry", **{"usercontext.registry.name": "main"})
        assert got == {
            "in_use": 2,
            "scopes": 1,
            "opened": 2,
            "created": 3,
            "closed": 1,
            "close_errors": 1,
        }
        assert kinds["usercontext.registry.close_errors"] == ("{error}", "counter")


class TestHubs:
    async def test_drops_by_reason(self, reader):
        """
        A hub under drop_newest, maxsize 4, with a stalled sink: of 6 events
        emitted, 2 are dropped as "newest", read with a
        ``usercontext.hub.drop_reason`` attribute; once the sink resumes, the
        4 others are delivered.
        """
        reader, provider = reader
        gate, started = anyio.Event(), anyio.Event()
        delivered = []

        class Stalled:
            async def send(self, events):
                started.set()
                await gate.wait()
                delivered.extend(events)

        async with uc.EmitterHub(maxsize=4, overflow="drop_newest", replay=0) as hub:
            instrument(meter_provider=provider, hubs={"events": hub})
            hub.attach("u-1", Stalled())
            emitter = hub.emitter(make_ctx(1))
            emitter.emit_nowait("x")
            await started.wait()
            for _ in range(5):
                emitter.emit_nowait("x")
            stalled, kinds = collect(reader)
            gate.set()
            await until(lambda: len(delivered) == 4)
            after, _ = collect(reader)

        name = ("usercontext.hub.name", "events")
        newest = ("usercontext.hub.drop_reason", "newest")
        assert stalled["usercontext.hub.dropped", (newest, name)] == 2
        got = family(stalled, "hub", **dict([name]))
        assert (got["emitted"], got["delivered"], got["attached"], got["users"]) == (6, 0, 1, 1)
        assert family(after, "hub", **dict([name]))["delivered"] == 4
        assert kinds["usercontext.hub.dropped"] == ("{event}", "counter")
        assert kinds["usercontext.hub.attached"] == ("{sink}", "updowncounter")


class TestArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({}, ValueError, "was given nothing to observe"),
            ({"quotas": [uc.LocalQuota()]}, TypeError, r"quotas=\{'engines': obj\}"),
            ({"factories": 1}, TypeError, "usercontext.factory.name"),
            ({"quotas": {"": uc.LocalQuota()}}, ValueError, "non-empty str, got ''"),
            ({"registries": {1: uc.Registry()}}, ValueError, "non-empty str, got 1"),
            ({"hubs": {"h": uc.Registry()}}, TypeError, "takes an EmitterHub under 'h'"),
        ],
    )
    def test_refused(self, reader, kwargs, error, match):
        """
        Bad arguments are refused with an error naming them, and register
        nothing.
        """
        reader, provider = reader
        with pytest.raises(error, match=match):
            instrument(meter_provider=provider, **kwargs)
        assert collect(reader) == ({}, {})

    def test_global_meter_provider(self, tmp_path):
        """
        Without meter_provider, the instruments go to the global meter
        provider (in a fresh interpreter, which sets it).
        """
        script = tmp_path / "global_provider.py"
        script.write_text(
            "import usercontext as uc\n"
            "from opentelemetry import metrics\n"
            "from opentelemetry.sdk.metrics import MeterProvider\n"
            "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
            "from usercontext.otel import instrument\n"
            "reader = InMemoryMetricReader()\n"
            "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
            "quota = uc.ThreadQuota()\n"
            "quota.acquire('u-1')\n"
            "instrument(quotas={'q': quota})\n"
            "for rm in reader.get_metrics_data().resource_metrics:\n"
            "    for sm in rm.scope_metrics:\n"
            "        for m in sm.metrics:\n"
            "            if m.name == 'usercontext.quota.in_use':\n"
            "                print(sm.scope.name, m.data.data_points[0].value)\n",
            encoding="utf-8",
        )
        result = subprocess.run(  # noqa: S603  # our own interpreter on our own script
            [sys.executable, "-W", "error", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "usercontext 1\n"


class TestReaderThread:
    async def test_collecting_from_another_thread(self, reader, caplog):
        """
        A reader collecting from its own thread (as the SDK's periodic reader
        does) while 200 users' requests churn the quota's, factory's,
        registry's and hub's tables gets every measurement of every
        collection, and no callback fails.
        """
        reader, provider = reader
        quota = uc.LocalQuota(per_key=1)
        factory = uc.EngineFactory(lambda ctx: object(), per_user=1)
        registry = uc.Registry()
        registry.register("db", lambda ctx: object())
        hub = uc.EmitterHub(maxsize=4)
        instrument(
            meter_provider=provider,
            quotas={"q": quota},
            factories={"f": factory},
            registries={"r": registry},
            hubs={"h": hub},
        )
        stop, collections, incomplete = threading.Event(), [0], []

        def collect_until_stopped():
            while not stop.is_set():
                points, _ = collect(reader)
                collections[0] += 1
                names = {attrs[-1][1] for _, attrs in points if attrs}
                incomplete.extend({"q", "f", "r", "h"} - names)

        async def request(i):
            ctx = make_ctx(i)
            for _ in range(20):
                lease = await quota.acquire(ctx.user_id)
                async with factory.engine(ctx), registry.scope(ctx) as scope:
                    await scope.aget("db")
                    hub.emitter(ctx).emit_nowait("x")
                    await anyio.lowlevel.checkpoint()
                await quota.arelease(lease)

        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible
        try:
            async with hub:
                thread = threading.Thread(target=collect_until_stopped)
                thread.start()
                try:
                    async with anyio.create_task_group() as tg:
                        for i in range(200):
                            tg.start_soon(request, i)
                finally:
                    stop.set()
                    await anyio.to_thread.run_sync(thread.join)
        finally:
            sys.setswitchinterval(switch)

        assert collections[0] > 0
        assert incomplete == []
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
        points, _ = collect(reader)
        assert family(points, "quota", **{"usercontext.quota.name": "q"})["granted"] == 4_000
        assert family(points, "registry", **{"usercontext.registry.name": "r"})["opened"] == 4_000

    def test_a_walk_that_meets_a_change_is_retried(self):
        """
        stats() raising RuntimeError (a table changed during the walk) is
        called again, up to 100 times in all; the 100th error propagates, and
        the SDK logs it as a failed callback.
        """

        class Changing:
            def __init__(self, failures):
                self.failures, self.calls = failures, 0

            def stats(self, *, top):
                self.calls += 1
                if self.calls <= self.failures:
                    raise RuntimeError("dictionary changed size during iteration")
                return top

        assert _stats(flaky := Changing(3)) == 0
        assert flaky.calls == 4
        with pytest.raises(RuntimeError, match="changed size"):
            _stats(broken := Changing(1_000))
        assert broken.calls == 100

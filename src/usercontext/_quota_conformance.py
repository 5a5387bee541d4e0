"""
The conformance suite of the `Quota` protocol: the tests every quota backend
passes, `LocalQuota` and any backend shared across processes alike.

It drives a quota through the protocol only (``acquire``, ``arelease``,
``stats`` and the `Lease` they hand out), so a backend runs it unchanged. It
does not import pytest: its tests are plain async methods that pytest collects
from a subclass, and anyio's pytest plugin runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

from .exceptions import LeaseReleasedError, QuotaExceededError, QuotaTimeoutError


if TYPE_CHECKING:
    from collections.abc import Callable

    from typing_extensions import Self

    from ._quota import Lease, Quota, QuotaStats


__all__ = ["QuotaConformance"]

_E = TypeVar("_E", bound=BaseException)

# How long one step of a test may take before it counts as hung: long enough
# for a network backend's round trips on a busy machine.
_STEP = 10.0
# The timeout a request gives when the test wants it to time out.
_SHORT = 0.05


async def _until(predicate: Callable[[], bool]) -> None:
    """
    Let other tasks run until *predicate* holds; fail after ``_STEP`` seconds.
    """
    with anyio.fail_after(_STEP):
        rounds = 0
        while not predicate():
            # Scheduling rounds first, then a poll per millisecond: a network
            # backend's state changes after round trips, not rounds.
            await anyio.sleep(0 if rounds < 50 else 0.001)
            rounds += 1


class QuotaConformance:
    """
    The tests a `usercontext.Quota` backend must pass, to subclass in a pytest
    module.

    Define `make_quota` (and `close_quota` if the backend holds connections);
    every ``test_*`` method is an async test. Run them on asyncio and trio
    through anyio's pytest plugin: set ``anyio_mode = "auto"`` in the pytest
    configuration (or ``pytestmark = pytest.mark.anyio`` in the module), and
    give the module an ``anyio_backend`` fixture with both backends:

    .. code-block:: python

        import pytest
        from usercontext.testing import QuotaConformance

        pytestmark = pytest.mark.anyio

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        class TestMyQuota(QuotaConformance):
            async def make_quota(self, *, per_key, total):
                return MyQuota(per_key=per_key, total=total)

    Each test makes its own quota and gives its keys, so a shared backend
    should start each quota empty (a fresh key prefix, for example). The
    waits the tests give are short (50 ms) and every step fails after 10 s
    instead of hanging.

    .. versionadded:: 0.1.0
    """

    async def make_quota(self, *, per_key: int, total: int | None) -> Quota:
        """
        Return a new, empty quota with at most *per_key* leases per key and
        *total* overall (`None`: no global limit).
        """
        msg = (
            f"{type(self).__name__} must define `async def make_quota(self, *, per_key, total)` "
            "returning the quota backend under test."
        )
        raise NotImplementedError(msg)

    async def close_quota(self, quota: Quota) -> None:
        """
        Free what *quota* holds (connections) once a test is done with it;
        nothing by default.
        """

    async def _quota(self, *, per_key: int = 2, total: int | None = None) -> _Made:
        return _Made(self, await self.make_quota(per_key=per_key, total=total))

    async def test_per_key_limit(self) -> None:
        """
        A key gets at most *per_key* leases; past them, ``timeout=0`` raises
        `QuotaExceededError` naming the key's limit, and other keys are served.
        """
        async with await self._quota(per_key=2) as q:
            held = [await q.acquire("a", timeout=0), await q.acquire("a", timeout=0)]
            with _raises(QuotaExceededError) as refused:
                await q.acquire("a", timeout=0)
            e = refused.error
            assert (e.key, e.limit, e.scope, e.in_use, e.waited) == ("a", 2, "key", 2, 0)
            other = await q.acquire("b", timeout=0)
            stats = q.stats()
            assert (stats.in_use, stats.granted, stats.rejected, stats.waiting) == (3, 3, 1, 0)
            for lease in [*held, other]:
                await q.arelease(lease)
            assert q.stats().in_use == 0

    async def test_total_limit(self) -> None:
        """
        At most *total* leases are held overall; past them, ``timeout=0``
        raises `QuotaExceededError` naming the total limit.
        """
        async with await self._quota(per_key=2, total=3) as q:
            held = [await q.acquire(key, timeout=0) for key in ("a", "a", "b")]
            with _raises(QuotaExceededError) as refused:
                await q.acquire("c", timeout=0)
            e = refused.error
            assert (e.key, e.limit, e.scope, e.in_use) == ("c", 3, "total", 3)
            assert q.stats().total == 3
            for lease in held:
                await q.arelease(lease)
            assert (await q.acquire("c", timeout=0)).key == "c"

    async def test_timeout_zero_takes_a_free_slot(self) -> None:
        """
        ``timeout=0`` never waits, but it takes a slot that is free.
        """
        async with await self._quota(per_key=1) as q:
            lease = await q.acquire("a", timeout=0)
            assert (lease.key, lease.released) == ("a", False)
            await q.arelease(lease)
            assert lease.released

    async def test_timeout_raises_after_waiting(self) -> None:
        """
        A positive *timeout* waits that long, then raises `QuotaTimeoutError`
        and leaves nothing waiting or held.
        """
        async with await self._quota(per_key=1) as q:
            held = await q.acquire("a")
            start = anyio.current_time()
            with _raises(QuotaTimeoutError) as refused:
                await q.acquire("a", timeout=_SHORT)
            e = refused.error
            assert (e.key, e.limit, e.scope, e.timeout) == ("a", 1, "key", _SHORT)
            assert e.waited >= _SHORT * 0.9
            assert anyio.current_time() - start >= _SHORT * 0.9
            stats = q.stats()
            assert (stats.in_use, stats.waiting, stats.timed_out, stats.granted) == (1, 0, 1, 1)
            await q.arelease(held)

    async def test_waiter_granted_on_release(self) -> None:
        """
        A request with *timeout* `None` waits until a release hands it the slot.
        """
        async with await self._quota(per_key=1) as q:
            held = await q.acquire("a")
            got: list[Lease] = []

            async def wait() -> None:
                got.append(await q.acquire("a"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await _until(lambda: q.stats().waiting == 1)
                assert not got
                await q.arelease(held)
            assert [lease.key for lease in got] == ["a"]
            assert (q.stats().in_use, q.stats().waiting) == (1, 0)
            await q.arelease(got[0])

    async def test_fifo_per_key(self) -> None:
        """
        Waiters of one key are granted in the order they started waiting, and
        a new request does not take a freed slot ahead of them.
        """
        async with await self._quota(per_key=1) as q:
            held = await q.acquire("a")
            log: list[int] = []

            async def wait(i: int) -> None:
                lease = await q.acquire("a")
                log.append(i)
                await q.arelease(lease)

            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(wait, i)
                    await _until(lambda i=i: q.stats().waiting == i + 1)  # type: ignore[misc]
                await q.arelease(held)
                # The freed slot is the first waiter's, not a newcomer's.
                with _raises(QuotaExceededError):
                    await q.acquire("a", timeout=0)
            assert log == [0, 1, 2, 3, 4]
            assert q.stats().in_use == 0

    async def test_fair_across_keys(self) -> None:
        """
        Slots freed under the total limit go round-robin to the keys with
        waiters: the one waiter of "b" is served before the second waiter of
        "a", however many "a" queued first.
        """
        async with await self._quota(per_key=5, total=1) as q:
            held = await q.acquire("x")
            log: list[str] = []

            async def wait(name: str) -> None:
                lease = await q.acquire(name[0])
                log.append(name)
                await q.arelease(lease)

            async with anyio.create_task_group() as tg:
                for n, name in enumerate(["a1", "a2", "a3", "a4", "b1"]):
                    tg.start_soon(wait, name)
                    await _until(lambda n=n: q.stats().waiting == n + 1)  # type: ignore[misc]
                await q.arelease(held)
            assert log.index("b1") <= 1, log
            assert [name for name in log if name[0] == "a"] == ["a1", "a2", "a3", "a4"]

    async def test_cancelled_waiter_leaves_nothing(self) -> None:
        """
        A waiter cancelled while it waits holds nothing and waits for nothing
        afterwards: the slot it waited for goes to the next request.
        """
        async with await self._quota(per_key=1) as q:
            held = await q.acquire("a")
            async with anyio.create_task_group() as tg:
                tg.start_soon(q.acquire, "a")
                await _until(lambda: q.stats().waiting == 1)
                tg.cancel_scope.cancel()
            stats = q.stats()
            assert (stats.in_use, stats.waiting, stats.cancelled) == (1, 0, 1)
            await q.arelease(held)
            lease = await q.acquire("a", timeout=0)
            await q.arelease(lease)
            assert (q.stats().in_use, q.stats().keys) == (0, 0)

    async def test_cancelled_as_it_is_granted(self) -> None:
        """
        A waiter cancelled in the same step as the release that grants it
        either returns its lease (then it holds it) or raises and holds
        nothing: no slot is lost either way.
        """
        async with await self._quota(per_key=1, total=1) as q:
            held = await q.acquire("a")
            got: list[Lease] = []

            async def wait() -> None:
                got.append(await q.acquire("a"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await _until(lambda: q.stats().waiting == 1)
                await q.arelease(held)
                tg.cancel_scope.cancel()
            assert q.stats().in_use == len(got)
            for lease in got:
                await q.arelease(lease)
            stats = q.stats()
            assert (stats.in_use, stats.waiting, stats.keys) == (0, 0, 0)
            assert stats.granted + stats.cancelled == 2
            lease = await q.acquire("b", timeout=0)
            await q.arelease(lease)

    async def test_release_survives_cancellation(self) -> None:
        """
        ``arelease`` called by a cancelled task still hands the slot back, and
        the waiter behind it is granted.
        """
        async with await self._quota(per_key=1) as q:
            held = await q.acquire("a")
            got: list[Lease] = []

            async def wait() -> None:
                got.append(await q.acquire("a"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await _until(lambda: q.stats().waiting == 1)
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await q.arelease(held)
            assert held.released
            assert [lease.key for lease in got] == ["a"]
            with anyio.CancelScope() as scope:
                scope.cancel()
                await got[0].arelease()
            assert got[0].released
            assert q.stats().in_use == 0

    async def test_released_exactly_once(self) -> None:
        """
        ``arelease`` of a lease already handed back raises `LeaseReleasedError`
        and frees nothing; `Lease.arelease` and leaving ``async with`` are
        idempotent.
        """
        async with await self._quota(per_key=2) as q:
            other = await q.acquire("a")
            lease = await q.acquire("a")
            await q.arelease(lease)
            with _raises(LeaseReleasedError):
                await q.arelease(lease)
            await lease.arelease()
            async with lease:
                pass
            assert q.stats().in_use == 1
            async with other as same:
                assert same is other
                assert not same.released
            assert other.released
            assert q.stats().in_use == 0

    async def test_stats_count_each_request_once(self) -> None:
        """
        Each request is counted once, as granted, rejected, timed out or
        cancelled; the gauges show what is held and waited for now.
        """
        async with await self._quota(per_key=2, total=3) as q:
            held = [await q.acquire(key) for key in ("a", "a", "b")]
            with _raises(QuotaExceededError):
                await q.acquire("c", timeout=0)
            with _raises(QuotaTimeoutError):
                await q.acquire("c", timeout=_SHORT)
            # Bound before the task group, which may swallow what ends its block
            # early: then the check below fails on these figures instead.
            now = q.stats()
            async with anyio.create_task_group() as tg:
                tg.start_soon(q.acquire, "c")
                tg.start_soon(q.acquire, "a")
                await _until(lambda: q.stats().waiting == 2)
                now = q.stats()
                tg.cancel_scope.cancel()
            assert _gauges(now) == (3, 2, 3, 3, 3, (("a", 2), ("b", 1)))
            assert q.stats(top=1).top == (("a", 2),)
            assert q.stats(top=0).top == ()
            done = q.stats()
            assert _counters(done) == (3, 1, 1, 2)
            assert (done.in_use, done.waiting, done.keys) == (3, 0, 2)
            for lease in held:
                await q.arelease(lease)
            assert _gauges(q.stats()) == (0, 0, 0, 3, 3, ())

    async def test_idle_keys_leave_no_state(self) -> None:
        """
        A key that holds nothing and waits for nothing is forgotten, after
        grants, rejections, timeouts and cancellations alike.
        """
        async with await self._quota(per_key=1) as q:
            for i in range(100):
                async with await q.acquire(f"user-{i}") as lease:
                    assert lease.key == f"user-{i}"
                    with _raises(QuotaExceededError):
                        await q.acquire(f"user-{i}", timeout=0)
                    if i % 10 == 0:
                        with _raises(QuotaTimeoutError):
                            await q.acquire(f"user-{i}", timeout=0.001)
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(q.acquire, f"user-{i}")
                            await _until(lambda: q.stats().waiting == 1)
                            tg.cancel_scope.cancel()
            stats = q.stats()
            assert (stats.in_use, stats.waiting, stats.keys, stats.top) == (0, 0, 0, ())
            assert _counters(stats) == (100, 100, 10, 10)


def _gauges(stats: QuotaStats) -> tuple[object, ...]:
    return (stats.in_use, stats.waiting, stats.keys, stats.peak, stats.total, stats.top)


def _counters(stats: QuotaStats) -> tuple[int, int, int, int]:
    return (stats.granted, stats.rejected, stats.timed_out, stats.cancelled)


class _raises(Generic[_E]):  # noqa: N801  # reads as pytest.raises, without importing pytest
    """
    Check that the block raises *expected* and keep it as ``error``; a tiny
    ``pytest.raises``. Any other exception goes through.
    """

    error: _E

    def __init__(self, expected: type[_E]) -> None:
        self._expected = expected

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if exc is None:
            msg = f"{self._expected.__name__} was not raised: the backend broke the contract."
            raise AssertionError(msg)
        if not isinstance(exc, self._expected):
            return False
        self.error = exc
        return True


class _Made:
    """
    A quota under test: the protocol's calls, and `close_quota` on exit.
    """

    def __init__(self, suite: QuotaConformance, quota: Quota) -> None:
        self._suite = suite
        self._quota = quota

    async def __aenter__(self) -> Quota:
        return self._quota

    async def __aexit__(self, *exc: object) -> None:
        await self._suite.close_quota(self._quota)

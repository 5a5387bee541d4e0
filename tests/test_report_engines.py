"""
Tests of the pieces of the "Engines and quotas" report section that a normal
run does not exercise: failing requests and the floor quota's grant path.
"""

from __future__ import annotations

import asyncio

from usercontext import _report_engines as engines


class TestScenario:
    def test_failed_requests_are_counted(self):
        """
        A request whose handler raises is counted as failed, not timed, so the
        success rate reports it.
        """

        async def handle(run, i):
            if i % 10 == 0:
                msg = "boom"
                raise RuntimeError(msg)
            await run.work(i % engines.USERS)

        run = asyncio.run(engines._scenario(handle))

        assert run.failed == 100
        assert len(run.latencies_ms) == 900
        assert run.peak_per_user >= 1


class TestDictQuota:
    def test_grants_then_refuses(self):
        """
        The floor quota grants up to its limit, then refuses by returning None
        and by raising.
        """
        quota = engines._DictQuota(1)

        async def main():
            assert await quota.acquire("u-1") == "u-1"
            assert quota.try_acquire("u-1") is None
            try:
                await quota.acquire("u-1", timeout=0)
            except engines._RejectedError as e:
                return e.args
            return None

        assert asyncio.run(main()) == ("u-1",)

"""
Tests of the pieces of the "Engines and quotas" report section
(`usercontext._report.engines`) that a normal run does not exercise: failing
requests.
"""

from __future__ import annotations

import asyncio

from usercontext._report import engines


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

"""
Tests of the report's "Memory and leak cycles" section
(`usercontext._report.memory`), run for real on the example service, and of
its leak check, given a service that does leak.
"""

from __future__ import annotations

import io

import attrs
import pytest

from report_helpers import TINY

from usercontext._report import memory
from usercontext._report.frame import Progress, Table
from usercontext._report.service import Service


SMALL = attrs.evolve(TINY, leak_cycles=8, cycle_requests=100)


class LeakyService(Service):
    """
    The example service, keeping what each request's session saw: a leak of a
    few objects per request.
    """

    def __init__(self, work_s: float = 0.01) -> None:
        super().__init__(work_s)
        self.kept: list[object] = []

    def _session(self, ctx):
        for session in super()._session(ctx):
            self.kept.append({"ctx": ctx, "session": session, "n": len(self.kept) + 1000})
            yield session


class TestGrowthPerCycle:
    @pytest.mark.parametrize(
        ("values", "slope"),
        [
            ([], 0.0),
            ([5], 0.0),
            ([5, 8], 3.0),
            ([10, 12, 14, 16], 2.0),
            ([7, 7, 7], 0.0),
            ([0, 10, 0, 10], 2.0),
        ],
    )
    def test_least_squares(self, values, slope):
        """
        The growth per cycle is the least-squares slope of the values.
        """
        assert memory.growth_per_cycle(values) == pytest.approx(slope)


class TestServeOne:
    async def test_request_then_disconnect(self):
        """
        The client of one request sends the request, then a disconnect, and
        returns the status of the response.
        """
        received = []

        async def app(scope, receive, send):
            received.extend([await receive(), await receive(), await receive()])
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        status = await memory._serve_one(app, b"Bearer tok-001", "r-1")

        assert status == 204
        assert [m["type"] for m in received] == [
            "http.request",
            "http.disconnect",
            "http.disconnect",
        ]


class TestMemorySection:
    def test_section(self):
        """
        The section measures the memory per active user with every user's
        request in flight, and the blocks held after every leak cycle: no
        growth, the collector gives back what the cycles held, every request
        succeeds and nothing is left.
        """
        err = io.StringIO()

        result = memory.memory_section(SMALL, Progress(2, err))

        rows = {r.id: r for r in result.rows}
        assert list(rows) == [
            "memory.per_active_user_10",
            "memory.per_active_user_100",
            "memory.leak_growth_per_cycle",
            "memory.leak_recovered",
            "memory.leak_state_left",
        ]
        for users in (10, 100):
            row = rows[f"memory.per_active_user_{users}"]
            assert row.details["in_flight"].value == users
            assert 0 < row.value.value < 200  # KB per active user: measured, and sane
        for key in ("leak_growth_per_cycle", "leak_recovered", "leak_state_left"):
            assert rows[f"memory.{key}"].status == "PASS", rows[f"memory.{key}"]
        cycles = result.figures["leak_cycles"]
        assert len(cycles["after_blocks"]) == len(cycles["before_gc_blocks"]) == 8
        assert cycles["requests_per_cycle"] == 100
        assert all(
            b > a for a, b in zip(cycles["after_blocks"], cycles["before_gc_blocks"], strict=True)
        )
        assert cycles["left"] == dict.fromkeys(cycles["left"], 0)
        assert [r["users"] for r in result.figures["active_users"]["results"]] == [10, 100]
        assert err.getvalue().startswith("[1/2] memory: memory held per active user")

    def test_a_leak_fails(self, monkeypatch):
        """
        A service that keeps an object or two per request fails the growth
        check: the check can fail, and does on a real leak.
        """
        monkeypatch.setattr(memory, "Service", LeakyService)
        out = Table("memory")

        memory._cycle_rows(out, SMALL)

        row = out.rows[0]
        assert row.id == "memory.leak_growth_per_cycle"
        assert row.status == "FAIL"
        assert row.value.value > 2  # blocks per request
        assert "blocks per cycle" in row.achieved

    def test_failed_requests_fail(self, monkeypatch):
        """
        A request that fails is counted, and fails the state row.
        """

        class Failing(Service):
            async def _app(self, scope, receive, send):
                if (
                    scope["type"] == "http" and self.tally.requests == 150
                ):  # in the first cycle, past the warm-up
                    self.tally.requests += 1
                    await send({"type": "http.response.start", "status": 500, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return
                await super()._app(scope, receive, send)

        monkeypatch.setattr(memory, "Service", Failing)
        out = Table("memory")

        memory._cycle_rows(out, attrs.evolve(SMALL, leak_cycles=2))

        row = out.rows[2]
        assert row.id == "memory.leak_state_left"
        assert row.status == "FAIL"
        assert row.details["failed"].value == 1

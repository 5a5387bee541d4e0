"""
Tests of the report's "Throughput and stability" section
(`usercontext._report.stability`), run for real on the example service, and
of its memory-trend check, given a service that does leak.
"""

from __future__ import annotations

import io

from pathlib import Path

import attrs
import pytest

from report_helpers import TINY
from test_report_memory import LeakyService

from usercontext._report import stability
from usercontext._report.frame import Progress, Table


SMALL = attrs.evolve(
    TINY, load_levels=(1, 20, 300), load_level_s=0.15, stability_s=1.0, stability_windows=4
)


class _LeakierService(LeakyService):
    """
    A leak of some 500 blocks per request: past the noise on any Python, however
    few requests a short run serves on a loaded machine, and however many are
    in flight when a window is measured (on Python 3.10, a leak of the two
    blocks `LeakyService` keeps per request can stay within the noise, and one
    of 50 did once under load).
    """

    def _session(self, ctx):  # type: ignore[no-untyped-def]
        for session in super()._session(ctx):
            self.kept.append([object() for _ in range(500)])
            yield session


class TestStabilitySection:
    def test_section(self):
        """
        The section measures throughput at each load and a sustained run cut
        into windows: no failure, no memory trend, the latency drift and the
        rate sustained.
        """
        err = io.StringIO()

        result = stability.stability_section(SMALL, Progress(2, err))

        rows = {r.id: r for r in result.rows}
        assert list(rows) == [
            "stability.peak_throughput",
            "stability.load_errors",
            "stability.memory_trend",
            "stability.errors",
            "stability.latency_drift",
            "stability.throughput",
        ]
        for key in ("load_errors", "memory_trend", "errors"):
            assert rows[f"stability.{key}"].status == "PASS", rows[f"stability.{key}"]
        throughput = result.figures["throughput"]
        assert [lv["in_flight"] for lv in throughput["levels"]] == [1, 20, 300]
        assert all(lv["p99_ms"] >= 10 for lv in throughput["levels"] if lv["requests"])
        assert throughput["saturation"] in throughput["levels"]
        # One request at a time, each taking 10 ms of work: under 100/s.
        assert throughput["levels"][0]["per_s"] < 100 < throughput["peak"]["per_s"]
        windows = result.figures["stability"]["windows"]
        assert len(windows) == 4
        assert sum(w["requests"] for w in windows) > 0
        assert windows[-1]["end_s"] >= 1.0
        assert rows["stability.latency_drift"].value.value > 0
        assert err.getvalue().startswith("[1/2] stability: throughput against load")

    def test_a_leak_fails(self, monkeypatch):
        """
        A service that keeps objects per request fails the memory trend: the
        check can fail, and does on a real leak.
        """
        monkeypatch.setattr(stability, "Service", _LeakierService)
        out = Table("stability")

        stability._stability_rows(out, SMALL)

        row = out.rows[0]
        assert row.id == "stability.memory_trend"
        assert row.status == "FAIL"
        assert row.value.value > 1_000  # blocks per 1,000 requests

    def test_failed_requests_are_counted(self, monkeypatch):
        """
        A request answered with an error is counted as failed, at every load.
        """

        class Failing(stability.Service):
            async def _app(self, scope, receive, send):
                if scope["type"] == "http" and self.tally.requests % 50 == 0:
                    self.tally.requests += 1
                    await send({"type": "http.response.start", "status": 503, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return
                await super()._app(scope, receive, send)

        monkeypatch.setattr(stability, "Service", Failing)
        out = Table("stability")

        stability._load_rows(out, SMALL)

        errors = out.rows[1]
        assert errors.id == "stability.load_errors"
        assert errors.status == "FAIL"
        assert errors.value.value > 0


class TestHelpers:
    def test_saturation(self):
        """
        Saturation is the least load that reaches 95% of the peak throughput.
        """
        levels = [
            {"in_flight": 1, "per_s": 100.0},
            {"in_flight": 10, "per_s": 960.0},
            {"in_flight": 100, "per_s": 1000.0},
            {"in_flight": 500, "per_s": 400.0},
        ]

        assert stability._saturation(levels)["in_flight"] == 10

    def test_drift(self):
        """
        The drift is the median P50 of the last third of the windows over that
        of the first third; windows that answered nothing are left out, and
        with none that answered there is no drift.
        """
        windows = [{"p50_ms": v} for v in (10.0, 12.0, None, 11.0, 15.0, 13.0, 16.0)]

        assert stability._drift(windows) == (11.0, 14.5, pytest.approx(14.5 / 11))
        assert stability._drift([{"p50_ms": None}]) == (0.0, 0.0, 1.0)

    def test_rss(self, monkeypatch):
        """
        The resident memory comes from /proc where there is one, and is
        `None` where there is none.
        """
        rss = stability._rss_bytes()
        assert rss is not None
        assert rss > 10 * 2**20

        def missing(*_args, **_kwargs):
            raise FileNotFoundError

        monkeypatch.setattr(Path, "read_text", missing)
        assert stability._rss_bytes() is None

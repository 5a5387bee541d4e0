"""
Tests of the "Load" report section (`usercontext._report.load`): a short run
of every scenario, and the pieces a normal run may not reach (a backlog cut
off, recovery that never comes).

Its timed targets are the report's to judge, not these tests': they check
the section's shape, its correctness row, and what holds whatever the
machine's speed (refusals counted by reason, a backlog without the policy).
"""

from __future__ import annotations

import asyncio
import io

import attrs

from report_helpers import TINY

from usercontext._report import load
from usercontext._report.frame import Progress


class TestSection:
    def test_short_run(self):
        """
        A short run gives one row per figure, with stable ids, the policy off
        and on side by side; the breaker's correctness row holds; without the
        policy the spike builds a queue, with it the queue stays within its
        bound and every refusal has a reason.
        """
        err = io.StringIO()
        result = load.load_section(attrs.evolve(TINY, load_seconds=0.1), Progress(5, err))
        assert [row.id for row in result.rows] == [
            "load.unloaded_p99",
            "load.sustained",
            "load.spike_p99",
            "load.spike_recovery",
            "load.spike_queue",
            "load.stress",
            "load.breaker",
        ]
        assert err.getvalue().count("load: ") == 5
        breaker = result.rows[-1]
        assert breaker.kind == "correctness"
        assert breaker.ok, breaker.achieved
        for row in result.rows[1:5]:
            assert "off" in row.achieved
            assert "on" in row.achieved
        spike = result.figures["spike"]
        assert spike["off"]["peak_waiting"] > load.MAX_WAITING
        assert spike["on"]["peak_waiting"] <= load.MAX_WAITING + 1
        refused = {o for o in spike["on"]["by_outcome"] if o not in ("served", "unfinished")}
        assert refused <= {
            "rate_limited",
            "shed_queue",
            "shed_deadline",
            "shed_user_queue",
            "timed_out",
        }
        assert refused
        assert result.figures["failing_backend"]["failures_before_open"] == load.BREAKER_FAILURES
        assert [s["load"] for s in result.figures["stress"]["on"]] == list(load.STRESS_STEPS)
        assert "|" not in "".join(row.metric + row.achieved + row.target for row in result.rows)
        assert any("capacity of 400 requests/s" in note for note in result.notes)


class TestPieces:
    def test_backlog_is_cut_and_counted(self):
        """
        Without the policy, requests still waiting after the grace period are
        cancelled and counted as unfinished, and nothing is left running.
        """
        run = load._run([(0.05, 20 * load.CAPACITY)], policy=False, grace_s=0.01)
        assert run.unfinished > 0
        assert run.count("unfinished") == run.unfinished
        assert run.p99(10, 11) == float("inf")
        figures = run.figures()
        assert figures["unfinished"] == run.unfinished
        assert figures["requests"] == len(run.arrivals)
        # A run with no arrivals at all ends at once.
        empty = load._run([(0.001, 1.0)], policy=True, grace_s=0.01)
        assert empty.arrivals == []
        assert empty.unfinished == 0

    def test_recovery(self):
        """
        Recovery is the start of the first window after which every window is
        healthy; a run whose last window is unhealthy never recovered.
        """
        run = load._Run(
            arrivals=[0.05, 0.15, 0.25, 0.35],
            outcomes=["served", "timed_out", "served", "served"],
            latencies=[0.05, -1.0, 0.05, 0.05],
        )
        assert load._recovery(run, 0.0, 0.4, 50.0) == 0.2
        assert load._recovery(run, 0.2, 0.4, 50.0) == 0.0  # healthy from the start
        run.latencies[-1] = 1.0
        assert load._recovery(run, 0.0, 0.4, 50.0) == float("inf")
        assert load._ms(float("inf")) == "none served"
        assert load._s(float("inf"), 2.0) == "> 2.0 s"
        empty = load._Run()
        assert empty.figures()["p99_ms"] is None

    def test_failing_backend(self):
        """
        The failing backend opens the breaker after its failures, and no
        create is called while it is open.
        """
        r = asyncio.run(load._failing_backend())
        assert r["failures_before_open"] == load.BREAKER_FAILURES
        assert r["recovered_after_s"] is not None
        assert r["calls"] == r["requests"] - r["refused"]

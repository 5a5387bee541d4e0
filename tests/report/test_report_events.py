"""
Tests for the "Event dispatch" section of ``usercontext report``
(`usercontext._report.events`), in-process at a tiny scale.

The figures depend on the machine, so these tests check the section's shape,
that its checks check something, and that every row can fail.
"""

from __future__ import annotations

import io
import json
import re

import pytest

from usercontext._report import events, floors
from usercontext._report.frame import Progress, Table
from usercontext._report.scale import Scale
from usercontext._report.timing import Comparison


TINY = Scale(
    name="tiny",
    repeats=2,
    batch_ns=20_000,
    memory_contexts=50,
    users=2,
    tasks_per_user=1,
    rounds=1,
    scenario_rounds=1,
    distinct_keys=2_000,
)

METRICS = (
    "`emit_nowait` into a user's buffer vs `Queue.put_nowait` + `get_nowait`, same events",
    "End to end to an in-memory sink vs producer/consumer over `asyncio.Queue(64)`",
    "Events/s in process, end to end to an in-memory sink",
    "JSON events over a local socket (1,000 events, one write per flush)",
    "Delivery latency, emit to sink, one event at a time: P50 / P99",
    "Stalled sink, 2,000 events, `drop_oldest`: buffer peak vs bound",
    "Drops by reason under the stalled sink",
    "Critical events (`agent_completed`) under `drop_oldest` with a full buffer",
    "Stalled sink under `block`: producer of 5,000 events",
    "2,000 distinct users emitting once: state left after the idle TTL, memory retained",
)


@pytest.fixture(name="result", scope="module")
def _result():
    """
    The section, run once at the tiny scale, with its progress lines.
    """
    err = io.StringIO()
    result = events.events_section(TINY, Progress(6, err))
    return result, err.getvalue()


class TestEventsSection:
    def test_rows_and_progress(self, result):
        """
        The section announces its steps and returns one row per metric, each
        with a status that agrees with its figures.
        """
        section, err = result

        assert re.findall(r"events: (.+) \.\.\.", err) == list(events.STEPS)
        assert [r.metric for r in section.rows] == list(METRICS)
        assert {r.status for r in section.rows} <= {"PASS", "FAIL", "MISS", "INFO"}
        by_metric = {r.metric: r for r in section.rows}
        assert by_metric[METRICS[2]].status == by_metric[METRICS[6]].status == "INFO"
        assert [r.kind for r in section.rows] == [
            "performance",
            "performance",
            "info",
            "performance",
            "performance",
            "correctness",
            "info",
            "correctness",
            "correctness",
            "correctness",
        ]
        assert [r.id for r in section.rows] == [
            "events.emit_nowait_vs_floor",
            "events.end_to_end_vs_floor",
            "events.in_process_rate",
            "events.socket_rate",
            "events.delivery_latency_p99",
            "events.stalled_sink_bound",
            "events.drops_by_reason",
            "events.critical_lost",
            "events.block_policy",
            "events.idle_users_left",
        ]
        json.dumps(section.figures)  # the figures are JSON for --json
        assert len(section.notes) == 5

    def test_correctness_rows_pass(self, result):
        """
        The rows about correctness pass at any speed: the bound holds, every
        drop is counted, critical events survive, block resumes, and idle users
        leave nothing.
        """
        section, _ = result
        figures = section.figures

        for metric in METRICS[5:]:
            row = next(r for r in section.rows if r.metric == metric)
            assert row.status in ("PASS", "INFO"), row
        stalled = figures["stalled_sink"]
        assert stalled["depth_peak"] == stalled["peak_seen"] == floors.BOUND
        assert sum(stalled["dropped"].values()) == stalled["emitted"] - stalled["delivered"]
        assert stalled["dropped"] == {"oldest": 1_000}
        assert stalled["critical_emitted"] == stalled["critical_delivered"] == 2
        assert stalled["block_waited_at"] == floors.BOUND
        assert stalled["block_in_order"]
        idle = figures["idle_users"]
        assert (idle["users"], idle["held_before_ttl"], idle["left"]) == (2_000, 2_000, 0)

    def test_timed_figures(self, result):
        """
        The timed figures are positive and consistent with their rows.
        """
        section, _ = result
        figures = section.figures

        for key, target in (("emit_nowait", 1.2), ("end_to_end", 1.5)):
            assert figures[key]["target_ratio"] == target
            assert figures[key]["ratio"] > 0
            assert len(figures[key]["pair_ratios"]) == 2
        assert figures["in_process_events_per_s"] > 0
        socket = figures["socket"]
        assert socket["events"] == 1_000
        assert min(socket["ours_events_per_s"] + socket["floor_events_per_s"]) > 0
        latency = figures["latency"]
        assert latency["events"] == 100
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]


class TestRowsCanFail:
    def test_socket_below_target(self, monkeypatch):
        """
        The socket row, a performance row, misses below its target.
        """
        monkeypatch.setattr(events, "SOCKET_TARGET_EPS", 1e15)
        out = Table("events")
        in_process = Comparison(None, None, [5_000.0], [4_000.0], 1, 1)  # type: ignore[arg-type]

        events._socket_rows(out, TINY, in_process)

        info, socket = out.rows
        assert socket.status == "MISS"
        assert socket.to_json()["target"] == {
            "comparison": ">=",
            "value": 1e15,
            "unit": "events/s",
        }
        assert info.achieved.startswith("**200,000/s** (100x legacy; floor 250,000/s)")

    def test_latency_above_target(self, monkeypatch):
        """
        The latency row, a performance row, misses above its target.
        """
        monkeypatch.setattr(events, "LATENCY_P99_TARGET_MS", 0.0)
        out = Table("events")

        events._latency_rows(out, TINY)

        assert out.rows[0].status == "MISS"

    def test_broken_bound_and_lost_criticals_fail(self, monkeypatch):
        """
        A buffer over its bound, a miscount, a lost critical event, or a block
        run that did not wait make their rows fail.
        """

        async def broken(n):
            return {
                "events": n,
                "bound": 1000,
                "peak_seen": 1001,
                "depth_peak": 1001,
                "emitted": n,
                "delivered": 10,
                "dropped": {},
                "critical_emitted": 2,
                "critical_delivered": 1,
                "critical_lost": 1,
                "block_events": 5000,
                "block_waited_at": 5000,
                "block_delivered": 5000,
                "block_in_order": False,
                "block_depth_peak": 1000,
            }

        monkeypatch.setattr(events, "_stalled", broken)
        out = Table("events")

        events._stalled_rows(out, TINY)

        bound, reasons, critical, block = out.rows
        assert (bound.status, critical.status, block.status) == ("FAIL", "FAIL", "FAIL")
        assert critical.to_json()["value"] == {"value": 1, "unit": "events"}
        assert reasons.achieved == "none"
        assert "OUT OF ORDER" in block.achieved

    def test_state_left_behind_fails(self, monkeypatch):
        """
        Users left after the TTL make the idle row fail.
        """

        async def sticky(contexts, _ttl):
            n = len(contexts)
            return {"users": n, "held_before_ttl": n, "left": 3}

        monkeypatch.setattr(events, "_distinct", sticky)
        out = Table("events")

        events._idle_rows(out, TINY)

        assert out.rows[0].status == "FAIL"
        assert out.rows[0].achieved.startswith("**3** users")

"""
Tests of the "Contexts" section of ``usercontext report``
(`usercontext._report.contexts`).
"""

from __future__ import annotations

import gc
import io
import re

from report_helpers import METRICS, TINY

from usercontext import UserContext
from usercontext._report import contexts
from usercontext._report.frame import Progress, Table
from usercontext._report.sections import SECTIONS


class TestContextsSection:
    def test_tiny(self):
        """
        The section runs at a tiny scale, with sane figures, in a fraction of a
        second.
        """
        result = contexts.contexts_section(TINY, Progress(7, io.StringIO()))

        figures = result.figures
        assert figures["memory"]["contexts"] == 50
        assert figures["isolation"]["users"] == 2
        assert figures["isolation"]["child_tasks"] == 4
        assert len(figures["creation"]["pair_ratios"]) == 2
        assert figures["loop_overhead_ns_per_op"] > 0
        assert "the best of 2 batches" in result.notes[0]

    def test_isolation_failure_is_detected(self, monkeypatch):
        """
        If code saw another user's context, or none, the isolation rows fail:
        the check checks something.
        """
        other = UserContext(user_id="someone-else", thread_id="t", run_id="r")
        monkeypatch.setattr(contexts, "current_or_none", lambda: other)
        out = Table("contexts")

        contexts._isolation_rows(out, TINY)

        cross, missing = out.rows
        assert cross.status == missing.status == "FAIL"
        tally = out.figures["isolation"]
        assert tally["cross_user"] == tally["checks"] - tally["after_checks"] > 0
        assert tally["stale"] == tally["after_checks"] > 0

    def test_tally(self):
        """
        The tally tells cross-user, missing and stale observations apart.
        """
        tally = contexts._Tally()

        assert tally.add(["a", "b", None, "a"], "a") == 4
        assert tally.add([None, "a"], None) == 2

        assert (tally.checks, tally.cross_user, tally.missing, tally.stale) == (6, 1, 1, 1)

    def test_memory_keeps_collector_state(self):
        """
        The memory measurement leaves the garbage collector as it found it.
        """
        assert gc.isenabled()
        gc.disable()
        try:
            contexts._memory(10)
            assert not gc.isenabled()
        finally:
            gc.enable()
        contexts._memory(10)
        assert gc.isenabled()

    def test_sections(self):
        """
        The steps announced by the sections are the steps they run.
        """
        err = io.StringIO()
        section = next(s for s in SECTIONS if s.key == "contexts")
        progress = Progress(len(section.steps), err)

        result = section.run(TINY, progress)

        steps = re.findall(r"contexts: (.+) \.\.\.", err.getvalue())
        assert tuple(steps) == section.steps
        assert progress.done == progress.total == len(section.steps)
        assert len(result.rows) == len(METRICS)
        for row, metric in zip(result.rows, METRICS, strict=True):
            assert row.metric.startswith(metric)

    def test_every_row_is_classified(self):
        """
        The contexts section's rows have the kinds the report promises: ratios
        of timings are performance, isolation counts are correctness.
        """
        result = contexts.contexts_section(TINY, Progress(7, io.StringIO()))

        assert [(r.id, r.kind) for r in result.rows] == [
            ("contexts.creation_vs_floor", "performance"),
            ("contexts.creation_speedup_vs_legacy", "performance"),
            ("contexts.creation_rate_vs_legacy", "performance"),
            ("contexts.creation_unique_ids_vs_floor", "info"),
            ("contexts.child_vs_floor", "performance"),
            ("contexts.memory_per_context", "info"),
            ("contexts.shallow_size_vs_floor", "performance"),
            ("contexts.bind_vs_floor", "performance"),
            ("contexts.current_vs_floor", "performance"),
            ("contexts.isolation_cross_user", "correctness"),
            ("contexts.isolation_missing_or_left", "correctness"),
        ]

"""
Tests for ``usercontext report`` (`usercontext.__main__` and `usercontext._report`).

The report's figures depend on the machine, so these tests check its shape and
that every figure is sane, not the figures themselves.
"""

from __future__ import annotations

import gc
import io
import json
import re
import runpy
import subprocess
import sys

import pytest

import usercontext

from usercontext import UserContext, _report
from usercontext.__main__ import main


TINY = _report.Scale(
    name="tiny",
    repeats=2,
    batch_ns=20_000,
    memory_contexts=50,
    users=2,
    tasks_per_user=1,
    rounds=1,
)

METRICS = (
    "Creation, generated request id, vs floor",
    "Time per context vs legacy (0.15 ms)",
    "Creation rate vs legacy (4,000 contexts/s)",
    "Creation, every id new",
    "`ctx.child()` vs creation",
    "Memory per context, ids included",
    "Shallow size (`sys.getsizeof`) vs same-shape attrs slots instance",
    "`with bind(ctx)` vs class-based `ContextVar` set/reset",
    "`current()` vs `ContextVar.get()`",
    "Isolation: cross-user observations",
    "Isolation: context missing inside, or left behind after",
)
TIMED = ("creation", "creation_unique_ids", "child", "bind", "current")


def _table_rows(markdown: str) -> list[list[str]]:
    """
    Return the cells of every table row of *markdown*, header rows excluded.
    """
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| ") and not line.startswith("| Metric ")
    ]


def _check_report(out: str, err: str, code: int, data: dict) -> None:
    """
    Check a report's output, progress, exit code and JSON against each other.
    """
    assert out.startswith("# usercontext validation report\n")
    assert f"usercontext {usercontext.__version__} on " in out
    assert "## Contexts\n\n| Metric | Target | Achieved | Status |\n|---|---|---|---|\n" in out
    rows = _table_rows(out)
    for metric in METRICS:
        assert any(r[0].startswith(metric) for r in rows), metric
    statuses = [r[-1] for r in rows]
    assert set(statuses) <= {"PASS", "FAIL", "INFO"}
    assert code == (1 if "FAIL" in statuses else 0)
    assert re.search(r"^\*\*Summary: \d+ PASS, \d+ FAIL, \d+ INFO; .+\.\*\*$", out, re.MULTILINE)

    progress = [line for line in err.splitlines() if line.startswith("[")]
    total = sum(len(s.steps) for s in _report.SECTIONS)
    assert len(progress) == total
    assert progress[0] == f"[1/{total}] contexts: creation ..."
    contexts = next(s for s in _report.SECTIONS if s.key == "contexts")
    assert [line.split("] ", 1)[1] for line in progress if "] contexts: " in line] == [
        f"contexts: {step} ..." for step in contexts.steps
    ]
    assert "[" not in out.split("## Contexts", maxsplit=1)[0]  # no progress on standard output

    assert data["summary"]["exit_code"] == code
    assert data["summary"]["fail"] == statuses.count("FAIL")
    assert data["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert data["environment"]["cpu_count"] >= 1
    assert [r["status"] for s in data["sections"].values() for r in s["rows"]] == statuses
    contexts = data["sections"]["contexts"]
    figures = contexts["figures"]
    for key in TIMED:
        fig = figures[key]
        for side in ("ours", "floor"):
            assert fig[side]["per_op_ns"] > 0
            assert fig[side]["median_ns"] >= fig[side]["per_op_ns"]
            assert fig[side]["batch_ops"] > 0
        assert fig["ratio"] == pytest.approx(fig["ours"]["per_op_ns"] / fig["floor"]["per_op_ns"])
        assert fig["ratio"] > 0
    assert figures["creation"]["target_ratio"] == 2.5
    assert figures["creation_unique_ids"]["target_ratio"] is None
    assert figures["legacy"]["speedup"] > 0
    memory = figures["memory"]
    assert memory["bytes_per_context"] > memory["shallow_bytes"] > 0
    assert memory["id_bytes_per_context"] > 0
    assert memory["shallow_ratio"] <= 1.1
    isolation = figures["isolation"]
    assert isolation["checks"] > 0
    assert isolation["thread_checks"] > 0
    assert isolation["executor_checks"] > 0
    assert isolation["after_checks"] > 0
    assert isolation["cross_user"] == isolation["missing"] == isolation["stale"] == 0


class TestCommand:
    def test_report_in_a_subprocess(self, tmp_path):
        """
        `python -m usercontext report --quick --json PATH` prints a Markdown
        report on standard output, progress on standard error, writes the
        figures as JSON, and exits with 1 exactly when a row failed.
        """
        path = tmp_path / "report.json"
        proc = subprocess.run(  # noqa: S603  # our own interpreter and command
            [sys.executable, "-m", "usercontext", "report", "--quick", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert proc.returncode in (0, 1), proc.stderr
        _check_report(proc.stdout, proc.stderr, proc.returncode, json.loads(path.read_text()))

    def test_report_in_process(self, tmp_path, capsys):
        """
        main() runs the same report in-process and returns its exit code.
        """
        path = tmp_path / "report.json"

        code = main(["report", "--quick", "--json", str(path)])

        out, err = capsys.readouterr()
        _check_report(out, err, code, json.loads(path.read_text()))
        assert "- Run: quick (rough figures), " in out

    def test_no_command(self, capsys):
        """
        Without a command, the help goes to standard error and the exit code is 2.
        """
        assert main([]) == 2

        out, err = capsys.readouterr()
        assert out == ""
        assert "usage: usercontext" in err
        assert "report" in err

    def test_version(self, capsys):
        """
        --version prints the installed version.
        """
        with pytest.raises(SystemExit) as ei:
            main(["--version"])

        assert ei.value.code == 0
        assert capsys.readouterr().out == f"usercontext {usercontext.__version__}\n"

    def test_run_as_module(self, monkeypatch, capsys):
        """
        Running the package as a script (`python -m usercontext`) calls main().
        """
        monkeypatch.setattr(sys, "argv", ["usercontext"])
        # runpy warns when the module it runs is imported already.
        monkeypatch.delitem(sys.modules, "usercontext.__main__", raising=False)

        with pytest.raises(SystemExit) as ei:
            runpy.run_module("usercontext", run_name="__main__")

        assert ei.value.code == 2
        assert "usage: usercontext" in capsys.readouterr().err

    def test_import_does_not_load_report(self):
        """
        Neither `import usercontext` nor importing the command loads the report.
        """
        code = (
            "import sys, usercontext, usercontext.__main__; "
            "print('usercontext._report' in sys.modules, 'tracemalloc' in sys.modules)"
        )
        proc = subprocess.run(  # noqa: S603  # our own interpreter and code
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )

        assert proc.stdout == "False False\n"


def _section(status: str, notes: tuple[str, ...] = ()) -> _report.Section:
    def run(scale, progress):
        progress("fake", "only step")
        return _report.SectionResult(
            (_report.Row("Fake metric", "≤ 1x", "2x", status),), {"scale": scale.name}, notes
        )

    return _report.Section("fake", "Fake", ("only step",), run)


class TestRunReport:
    def test_failing_row(self, tmp_path):
        """
        A row that fails its target makes the exit code 1 and is named in the
        summary; a section without notes prints none.
        """
        out, err = io.StringIO(), io.StringIO()
        path = tmp_path / "r.json"

        code = _report.run_report(
            sections=[_section("FAIL")], scale=TINY, json_path=str(path), out=out, err=err
        )

        assert code == 1
        text = out.getvalue()
        assert "## Fake\n\n| Metric | Target | Achieved | Status |\n" in text
        assert "| Fake metric | ≤ 1x | 2x | FAIL |\n\n**Summary" in text
        assert text.endswith("**Summary: 0 PASS, 1 FAIL, 0 INFO; missed: Fake metric.**\n")
        assert "[1/1] fake: only step ...\n" in err.getvalue()
        data = json.loads(path.read_text())
        assert data["summary"] == {"pass": 0, "fail": 1, "info": 0, "exit_code": 1}
        assert data["sections"]["fake"]["figures"] == {"scale": "tiny"}
        assert data["scale"]["name"] == "tiny"

    def test_defaults(self, capsys):
        """
        By default the report runs at the full scale, prints to standard output
        and writes no JSON.
        """
        code = _report.run_report(sections=[_section("INFO", ("A note.",))])

        out, err = capsys.readouterr()
        assert code == 0
        assert "- Run: full, " in out
        assert "| Fake metric | ≤ 1x | 2x | INFO |\n\n- A note.\n" in out
        assert out.endswith("**Summary: 0 PASS, 0 FAIL, 1 INFO; all targets met.**\n")
        assert err.startswith("[1/1] fake: only step ...\n")

    def test_sections(self):
        """
        The steps announced by the sections are the steps they run.
        """
        err = io.StringIO()
        section = next(s for s in _report.SECTIONS if s.key == "contexts")
        progress = _report.Progress(len(section.steps), err)

        result = section.run(TINY, progress)

        steps = re.findall(r"contexts: (.+) \.\.\.", err.getvalue())
        assert tuple(steps) == section.steps
        assert progress.done == progress.total == len(section.steps)
        assert len(result.rows) == len(METRICS)
        for row, metric in zip(result.rows, METRICS, strict=True):
            assert row.metric.startswith(metric)


class TestContextsSection:
    def test_tiny(self):
        """
        The section runs at a tiny scale, with sane figures, in a fraction of a
        second.
        """
        result = _report.contexts_section(TINY, _report.Progress(7, io.StringIO()))

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
        monkeypatch.setattr(_report, "current_or_none", lambda: other)
        out = _report.Table()

        _report._isolation_rows(out, TINY)

        cross, missing = out.rows
        assert cross.status == missing.status == "FAIL"
        tally = out.figures["isolation"]
        assert tally["cross_user"] == tally["checks"] - tally["after_checks"] > 0
        assert tally["stale"] == tally["after_checks"] > 0

    def test_tally(self):
        """
        The tally tells cross-user, missing and stale observations apart.
        """
        tally = _report._Tally()

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
            _report._memory(10)
            assert not gc.isenabled()
        finally:
            gc.enable()
        _report._memory(10)
        assert gc.isenabled()


class TestFormatting:
    @pytest.mark.parametrize(
        ("ns", "text"),
        [(12.345, "12.3 ns"), (512.4, "512 ns"), (1_234.0, "1.23 µs"), (2_500_000.0, "2.50 ms")],
    )
    def test_fmt_ns(self, ns, text):
        """
        Times are shown in ns, µs or ms, with sensible precision.
        """
        assert _report.fmt_ns(ns) == text

    @pytest.mark.parametrize(
        ("ours", "floor", "target", "status", "note"),
        [
            ([2.0, 2.0], [1.0, 1.0], 2.5, "PASS", False),
            ([3.0, 3.0], [1.0, 1.0], 2.5, "FAIL", False),
            # Best 2.6x, median of pairs 2.3x: the estimates disagree.
            ([2.6, 3.0], [1.0, 1.5], 2.5, "PASS", True),
            # Best 2.0x, median of pairs 4.0x.
            ([2.0, 4.0, 4.0], [1.0, 1.0, 1.0], 2.5, "PASS", True),
            ([2.6, 2.6], [1.0, 1.0], None, "PASS", False),
        ],
    )
    def test_ratio(self, ours, floor, target, status, note):
        """
        A ratio fails only when both estimates are above the target, and the
        row says when they disagree.
        """
        op = _report.Op("x", "pass", {})
        c = _report.Comparison(op, op, ours, floor, 10, 10)

        text = _report.fmt_ratio(c, target)

        assert text.startswith(f"{_report.fmt_ns(min(ours))} vs ")
        assert ("within noise" in text) is note
        if target is not None:
            assert _report.ratio_status(c.ratio, c.median_ratio, target) == status

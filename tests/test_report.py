"""
Tests for ``usercontext report`` (`usercontext.__main__` and `usercontext._report`).

The report's figures depend on the machine, so these tests check its shape and
that every figure is sane, not the figures themselves.
"""

from __future__ import annotations

import gc
import io
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import threading

from pathlib import Path

import attrs
import pytest

import usercontext

from usercontext import UserContext, _report
from usercontext import _report_verdict as _verdict
from usercontext.__main__ import SECTION_KEYS, main


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


def _check_report(out: str, err: str, code: int, data: dict) -> None:  # noqa: PLR0915  # one check per promise
    """
    Check a report's output, progress, exit code and JSON against each other.
    """
    assert out.startswith("# usercontext validation report\n")
    assert f"usercontext {usercontext.__version__} on " in out
    assert (
        "- Legacy: the system this library replaces, the per-request UserExecutionContext "
        "architecture of Netra Core Generation 1."
    ) in out
    assert "'Phase 1 Performance Validation Report: UserExecutionContext Migration'" in out
    header = (
        "## Contexts\n\n| Metric | Kind | Target | Achieved | Status |\n|---|---|---|---|---|\n"
    )
    assert header in out
    rows = _table_rows(out)
    for metric in METRICS:
        assert any(r[0].startswith(metric) for r in rows), metric
    for row in rows:
        assert row[-1] in _verdict.STATUSES[row[1]], row
    statuses = [r[-1] for r in rows]
    assert code == (1 if "FAIL" in statuses else 0)
    verdict = re.search(
        r"^\*\*Correctness: (\d+) PASS, (\d+) FAIL\*\*.*\*\*Performance: (\d+) PASS, (\d+) "
        r"MISS\*\*.*\*\*Info: (\d+)\.\*\* \*\*Exit code (\d)\.\*\*$",
        out,
        re.MULTILINE,
    )
    assert verdict, out
    kinds = [r[1] for r in rows]
    assert [int(n) for n in verdict.groups()] == [
        sum(k == "correctness" and s == "PASS" for k, s in zip(kinds, statuses, strict=True)),
        statuses.count("FAIL"),
        sum(k == "performance" and s == "PASS" for k, s in zip(kinds, statuses, strict=True)),
        statuses.count("MISS"),
        statuses.count("INFO"),
        code,
    ]

    progress = [line for line in err.splitlines() if line.startswith("[")]
    total = sum(len(s.steps) for s in _report.SECTIONS)
    assert len(progress) == total
    assert progress[0] == f"[1/{total}] contexts: creation ..."
    contexts = next(s for s in _report.SECTIONS if s.key == "contexts")
    assert [line.split("] ", 1)[1] for line in progress if "] contexts: " in line] == [
        f"contexts: {step} ..." for step in contexts.steps
    ]
    assert "[" not in out.split("## Contexts", maxsplit=1)[0]  # no progress on standard output

    summary = data["summary"]
    assert summary["exit_code"] == code
    assert summary["complete"] is True
    assert summary["interrupted"] is False
    assert summary["crashed"] is None
    assert summary["counts"]["correctness"]["fail"] == statuses.count("FAIL")
    assert summary["counts"]["performance"]["miss"] == statuses.count("MISS")
    assert summary["counts"]["info"]["info"] == statuses.count("INFO")
    assert data["legacy"] == _verdict.LEGACY
    assert data["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert data["environment"]["cpu_count"] >= 1
    json_rows = [(key, r) for key, s in data["sections"].items() for r in s["rows"]]
    assert [r["status"] for _, r in json_rows] == statuses
    assert [r["kind"] for _, r in json_rows] == kinds
    ids = [r["id"] for _, r in json_rows]
    assert len(set(ids)) == len(ids)
    for key, r in json_rows:
        _check_json_row(key, r)
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


def _check_json_row(section: str, row: dict) -> None:
    """
    Check that a JSON row has a stable id of its section, a kind and a status
    that agree, and plain numbers with units.
    """
    assert re.fullmatch(rf"{section}\.[a-z0-9_]+", row["id"]), row["id"]
    assert row["status"] in _verdict.STATUSES[row["kind"]]
    assert "**" not in row["metric"]
    assert "`" not in row["metric"]
    quantities = [row["value"], *row["details"].values()]
    if row["target"] is not None:
        assert row["target"]["comparison"] in ("<=", "<", ">=", ">", "==")
        quantities.append(row["target"])
    for q in quantities:
        if q is not None:
            assert isinstance(q["value"], (int, float)), row
            assert isinstance(q["unit"], str), row
            assert q["unit"], row
    if row["kind"] != "info" and row["value"] is not None:
        assert row["target"] is not None, row
        assert row["target"]["unit"] == row["value"]["unit"], row
    if row["value"] is None:
        assert row["note"], row


class TestCommand:
    def test_report_in_a_subprocess(self, tmp_path):
        """
        `python -m usercontext report --quick --json PATH` prints a Markdown
        report on standard output, progress on standard error, writes the
        rows and figures as JSON, and exits with 1 exactly when a correctness
        row failed.
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

    def test_help_documents_exit_codes(self, capsys):
        """
        `usercontext report --help` lists the exit codes.
        """
        with pytest.raises(SystemExit) as ei:
            main(["report", "--help"])

        assert ei.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes:\n  0    every correctness row holds" in out
        for line in ("  1    a correctness row failed", "  2    usage error", "  130  interrupted"):
            assert line in out
        assert "--strict" in out
        assert "--section KEY" in out

    def test_options_reach_the_report(self, monkeypatch):
        """
        --section runs only the sections named, in the report's order, and
        --strict judges performance rows.
        """
        calls = []
        monkeypatch.setattr(_report, "run_report", lambda **kw: calls.append(kw) or 0)

        assert main(["report", "--section", "http", "--section", "contexts", "--strict"]) == 0

        (call,) = calls
        assert [s.key for s in call["sections"]] == ["contexts", "http"]
        assert call["strict"] is True

    def test_bad_json_path_in_process(self, tmp_path, capsys, monkeypatch):
        """
        A --json path that cannot be written is a usage error, before the run.
        """
        monkeypatch.setattr(_report, "run_report", lambda **_kw: pytest.fail("it ran"))

        with pytest.raises(SystemExit) as ei:
            main(["report", "--json", str(tmp_path)])

        assert ei.value.code == 2
        assert f"usercontext report: error: --json {tmp_path} is a directory." in (
            capsys.readouterr().err
        )

    def test_crash_outside_a_section(self, monkeypatch, capsys):
        """
        A crash outside any section (here, writing the report) exits with 2,
        with a message and the traceback on standard error.
        """

        def crash(**_kw):
            msg = "disk full"
            raise OSError(msg)

        monkeypatch.setattr(_report, "run_report", crash)

        assert main(["report"]) == 2

        err = capsys.readouterr().err
        assert err.startswith(
            "usercontext report: crashed (OSError: disk full); the traceback follows.\n"
            "Traceback (most recent call last):\n"
        )

    def test_interrupted_outside_a_section(self, monkeypatch, capsys):
        """
        Ctrl-C outside any section exits with 130, without a traceback.
        """

        def interrupt(**_kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(_report, "run_report", interrupt)

        assert main(["report"]) == 130

        assert capsys.readouterr().err == "\nusercontext report: interrupted.\n"

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


def _row(key: str, kind: str, ok: bool | None, name: str = "metric") -> _report.Row:
    return _report.Row(
        id=f"{key}.{name}",
        kind=kind,
        metric=f"`{key}` {name}",
        target="≤ 1x",
        achieved="**2x**",
        ok=ok,
        value=_report.Quantity(2.0, "x"),
        goal=None if kind == "info" else _report.Goal("<=", 1.0, "x"),
    )


def _section(
    key: str = "fake",
    rows: tuple[tuple[str, bool | None], ...] = (("info", None),),
    notes: tuple[str, ...] = (),
    raises: BaseException | None = None,
) -> _report.Section:
    """
    A section *key* with a row of each (kind, ok) in *rows*; with *raises*,
    it adds its rows and then raises that.
    """

    def run(scale, progress):
        out = progress.table(key)
        progress(key, "only step")
        for i, (kind, ok) in enumerate(rows):
            out.rows.append(_row(key, kind, ok, f"metric_{i}"))
        out.figures["scale"] = scale.name
        if raises is not None:
            raise raises
        return _report.SectionResult(tuple(out.rows), out.figures, notes)

    return _report.Section(key, key.title(), ("only step",), run)


def _run(sections, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    code = _report.run_report(sections=sections, scale=TINY, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


class TestRows:
    @pytest.mark.parametrize(
        ("kind", "ok", "status"),
        [
            ("correctness", True, "PASS"),
            ("correctness", False, "FAIL"),
            ("performance", True, "PASS"),
            ("performance", False, "MISS"),
            ("info", None, "INFO"),
        ],
    )
    def test_status_follows_kind(self, kind, ok, status):
        """
        A correctness row is PASS or FAIL, a performance row PASS or MISS, an
        info row INFO.
        """
        assert _row("s", kind, ok).status == status

    @pytest.mark.parametrize(("kind", "ok"), [("info", True), ("correctness", None)])
    def test_ok_must_match_kind(self, kind, ok):
        """
        Only an info row goes without a verdict, and an info row has none.
        """
        with pytest.raises(ValueError, match=rf"Row 's.metric' of kind '{kind}' has ok={ok}"):
            _row("s", kind, ok)

    def test_json_is_plain(self):
        """
        A row's JSON has its id, kind and status, its metric without Markdown,
        and numbers with units.
        """
        row = attrs.evolve(
            _row("s", "performance", False), details={"floor": _report.Quantity(3, "ns")}
        )

        assert row.to_json() == {
            "id": "s.metric",
            "kind": "performance",
            "status": "MISS",
            "metric": "s metric",
            "value": {"value": 2.0, "unit": "x"},
            "target": {"comparison": "<=", "value": 1.0, "unit": "x"},
            "details": {"floor": {"value": 3, "unit": "ns"}},
            "note": "",
        }


class TestVerdict:
    @pytest.mark.parametrize(
        ("rows", "code", "strict_code"),
        [
            ([], 0, 0),
            ([("info", None)], 0, 0),
            ([("correctness", True), ("performance", True)], 0, 0),
            # A timing that misses its target does not fail the run...
            ([("correctness", True), ("performance", False)], 0, 1),
            # ... a correctness row that fails does, whatever the timings say.
            ([("correctness", False), ("performance", True)], 1, 1),
            ([("correctness", False), ("performance", False), ("info", None)], 1, 1),
        ],
    )
    def test_exit_code(self, rows, code, strict_code):
        """
        The exit code is 1 exactly when a correctness row failed, or, when
        strict, a performance row missed.
        """
        made = [_row("s", kind, ok, f"m{i}") for i, (kind, ok) in enumerate(rows)]

        assert _verdict.exit_code(made) == code
        assert _verdict.exit_code(made, strict=True) == strict_code

    def test_counts(self):
        """
        Rows are counted per kind and status.
        """
        rows = [
            _row("s", "correctness", True, "a"),
            _row("s", "correctness", False, "b"),
            _row("s", "performance", False, "c"),
            _row("s", "performance", False, "d"),
            _row("s", "info", None, "e"),
        ]

        assert _verdict.counts(rows) == {
            "correctness": {"pass": 1, "fail": 1},
            "performance": {"pass": 0, "miss": 2},
            "info": {"info": 1},
        }

    def test_text_names_failures_and_misses(self):
        """
        The verdict names the rows that failed and missed by id, and says
        whether performance was judged.
        """
        rows = [
            _row("s", "correctness", False, "leaks"),
            _row("s", "performance", False, "ratio"),
        ]

        assert _verdict.verdict(rows, 1) == (
            "**Correctness: 0 PASS, 1 FAIL** (`s.leaks`). **Performance: 0 PASS, 1 MISS** "
            "(`s.ratio`); reported, not judged (without --strict). **Info: 0.** "
            "**Exit code 1.**"
        )
        assert _verdict.verdict(rows[1:], 1, strict=True) == (
            "**Correctness: 0 PASS, 0 FAIL**; every check holds. **Performance: 0 PASS, 1 "
            "MISS** (`s.ratio`); judged (--strict). **Info: 0.** **Exit code 1.**"
        )


class TestRunReport:
    def test_failing_correctness_row(self, tmp_path):
        """
        A correctness row that fails makes the exit code 1 and is named in the
        verdict; a section without notes prints none.
        """
        path = tmp_path / "r.json"

        code, out, err = _run(
            [_section(rows=(("correctness", False), ("performance", True)))],
            json_path=str(path),
        )

        assert code == 1
        assert "## Fake\n\n| Metric | Kind | Target | Achieved | Status |\n" in out
        assert "| `fake` metric_0 | correctness | ≤ 1x | **2x** | FAIL |\n" in out
        assert "| `fake` metric_1 | performance | ≤ 1x | **2x** | PASS |\n\n## Verdict\n" in out
        assert out.endswith(
            "**Correctness: 0 PASS, 1 FAIL** (`fake.metric_0`). **Performance: 1 PASS, 0 "
            "MISS**; reported, not judged (without --strict). **Info: 0.** **Exit code 1.**\n"
        )
        assert "[1/1] fake: only step ...\n" in err
        assert err.endswith("done in 0.0 s, exit code 1\n")
        data = json.loads(path.read_text())
        assert data["summary"] == {
            "counts": {
                "correctness": {"pass": 0, "fail": 1},
                "performance": {"pass": 1, "miss": 0},
                "info": {"info": 0},
            },
            "failed": ["fake.metric_0"],
            "missed": [],
            "strict": False,
            "complete": True,
            "interrupted": False,
            "crashed": None,
            "exit_code": 1,
        }
        assert data["sections"]["fake"]["figures"] == {"scale": "tiny"}
        assert data["sections"]["fake"]["complete"] is True
        assert data["scale"]["name"] == "tiny"

    def test_missed_performance_row(self, tmp_path):
        """
        A performance row that misses its target is a MISS: the exit code stays
        0, unless the run is strict.
        """
        sections = [_section(rows=(("correctness", True), ("performance", False)))]
        path = tmp_path / "r.json"

        code, out, _ = _run(sections)
        strict_code, strict_out, _ = _run(sections, strict=True, json_path=str(path))

        assert (code, strict_code) == (0, 1)
        assert "| `fake` metric_1 | performance | ≤ 1x | **2x** | MISS |\n" in out
        assert "(`fake.metric_1`); reported, not judged (without --strict)" in out
        assert "(`fake.metric_1`); judged (--strict). **Info: 0.** **Exit code 1.**" in strict_out
        summary = json.loads(path.read_text())["summary"]
        assert (summary["missed"], summary["strict"], summary["exit_code"]) == (
            ["fake.metric_1"],
            True,
            1,
        )

    def test_defaults(self, capsys):
        """
        By default the report runs at the full scale, prints to standard output
        and writes no JSON.
        """
        code = _report.run_report(sections=[_section(notes=("A note.",))])

        out, err = capsys.readouterr()
        assert code == 0
        assert "- Run: full, " in out
        assert "| `fake` metric_0 | info | ≤ 1x | **2x** | INFO |\n\n- A note.\n" in out
        assert out.endswith("**Info: 1.** **Exit code 0.**\n")
        assert err.startswith("[1/1] fake: only step ...\n")

    def test_crash(self, tmp_path):
        """
        A section that crashes stops the run with exit code 2: standard error
        names the section and shows the traceback, and the rows measured so
        far are printed and written, the crashed section's included.
        """
        path = tmp_path / "r.json"
        sections = [
            _section("first", (("correctness", True),)),
            _section("second", (("performance", True),), raises=RuntimeError("it broke")),
            _section("third"),
        ]

        code, out, err = _run(sections, json_path=str(path))

        assert code == 2
        assert err.startswith(
            "[1/3] first: only step ...\n[2/3] second: only step ...\n"
            "usercontext report: the Second section crashed (RuntimeError: it broke); the "
            "traceback follows.\nTraceback (most recent call last):\n"
        )
        assert "RuntimeError: it broke\n" in err
        assert "[3/3]" not in err
        assert "| `first` metric_0 | correctness |" in out
        assert "## Second (crashed)\n\n| Metric | Kind | Target | Achieved | Status |\n" in out
        assert "| `second` metric_0 | performance |" in out
        assert "## Third" not in out
        assert out.endswith(
            "**Crashed (RuntimeError: it broke) in the Second section: no verdict.** The rows "
            "above are those measured before it stopped (correctness so far: 1 PASS, 0 FAIL). "
            "**Exit code 2.**\n"
        )
        data = json.loads(path.read_text())
        assert data["summary"]["crashed"] == {
            "section": "second",
            "error": "RuntimeError: it broke",
        }
        assert (data["summary"]["complete"], data["summary"]["exit_code"]) == (False, 2)
        assert data["sections"]["first"]["complete"] is True
        assert data["sections"]["second"]["complete"] is False
        assert [r["id"] for r in data["sections"]["second"]["rows"]] == ["second.metric_0"]
        assert data["sections"]["second"]["figures"] == {"scale": "tiny"}

    def test_interrupted(self, tmp_path):
        """
        Ctrl-C in a section stops the run with exit code 130 and no traceback;
        the rows measured so far are printed and written.
        """
        path = tmp_path / "r.json"
        sections = [
            _section("first", (("correctness", True),)),
            _section("second", (("info", None),), raises=KeyboardInterrupt()),
        ]

        code, out, err = _run(sections, json_path=str(path))

        assert code == 130
        assert "\nusercontext report: interrupted in the Second section.\n" in err
        assert "Traceback" not in err
        assert "## Second (interrupted)\n" in out
        assert "| `second` metric_0 | info |" in out
        assert out.endswith(
            "**Interrupted (Ctrl-C) in the Second section: no verdict.** The rows above are "
            "those measured before it stopped (correctness so far: 1 PASS, 0 FAIL). "
            "**Exit code 130.**\n"
        )
        summary = json.loads(path.read_text())["summary"]
        assert (summary["interrupted"], summary["crashed"], summary["exit_code"]) == (
            True,
            None,
            130,
        )

    def test_stopped_before_any_row(self):
        """
        A section that stops before it made its table shows that no row was
        measured, not the rows of the section before.
        """

        def broken(_scale, _progress):
            msg = "no table"
            raise OSError(msg)

        sections = [_section("first"), _report.Section("second", "Second", (), broken)]

        code, out, _ = _run(sections)

        assert code == 2
        assert "## Second (crashed)\n\nNo row was measured.\n" in out

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

    def test_every_row_is_classified(self):
        """
        The contexts section's rows have the kinds the report promises: ratios
        of timings are performance, isolation counts are correctness.
        """
        result = _report.contexts_section(TINY, _report.Progress(7, io.StringIO()))

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

    def test_section_keys(self):
        """
        The command's --section choices are the report's sections, in order.
        """
        assert tuple(s.key for s in _report.SECTIONS) == SECTION_KEYS


class TestJsonPath:
    def test_writable(self, tmp_path):
        """
        A new file in an existing directory is accepted and not left behind; an
        existing file is accepted and left as it was.
        """
        new, old = tmp_path / "new.json", tmp_path / "old.json"
        old.write_text("kept")

        assert _report.check_json_path(str(new)) is None
        assert _report.check_json_path(str(old)) is None

        assert not new.exists()
        assert old.read_text() == "kept"

    def test_refused(self, tmp_path):
        """
        A directory, a missing directory, or a file where a directory should
        be is refused with a sentence that says what to do.
        """
        (tmp_path / "file").write_text("")

        assert _report.check_json_path(str(tmp_path)) == (
            f"--json {tmp_path} is a directory. Give the path of a file, such as "
            f"{tmp_path / 'report.json'}."
        )
        assert _report.check_json_path(str(tmp_path / "missing" / "r.json")) == (
            f"--json {tmp_path / 'missing' / 'r.json'}: the directory {tmp_path / 'missing'} "
            "does not exist. Create it first, or give a path in an existing directory."
        )
        assert _report.check_json_path(str(tmp_path / "file" / "r.json")) == (
            f"--json {tmp_path / 'file' / 'r.json'}: {tmp_path / 'file'} is not a directory. "
            "Give a path in a directory."
        )

    def test_not_writable(self, tmp_path):
        """
        A path in a directory the user cannot write to is refused.
        """
        path = _unwritable(tmp_path)

        assert _report.check_json_path(path) == (
            f"--json {path} is not writable (Permission denied). Give a path you can write to."
        )


def _unwritable(tmp_path) -> str:
    """
    Return a path in a directory this process cannot write to: a read-only
    directory, or for root (who may write to any directory) one in /sys.
    """
    if os.geteuid() != 0:
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        return str(readonly / "r.json")
    if not Path("/sys/kernel").is_dir():  # pragma: no cover  # Linux has /sys
        pytest.skip("root may write anywhere, and there is no /sys to try")
    return "/sys/usercontext-report.json"


class TestInThread:
    def test_result_and_context(self):
        """
        The function runs in another thread, in an empty context, and its
        result comes back.
        """
        ctx = UserContext(user_id="u-1", thread_id="t", run_id="r")

        with usercontext.bind(ctx):
            seen = _report.in_thread(
                lambda: (threading.current_thread().name, usercontext.current_or_none())
            )

        assert seen == ("usercontext-report", None)

    def test_error(self):
        """
        An exception raised in the thread is raised in the caller's.
        """

        def boom():
            msg = "in the thread"
            raise LookupError(msg)

        with pytest.raises(LookupError, match="in the thread"):
            _report.in_thread(boom)


# A script that runs `usercontext report` on fake sections chosen by its first
# argument, with the rest of its arguments; the command's exit code is the
# process's.
FAKE_REPORT = """
import sys, time
from usercontext import _report
from usercontext.__main__ import main


def section(key, kind, ok, hang=False, crash=False):
    def run(scale, progress):
        out = progress.table(key)
        progress(key, "measure")
        out.rows.append(_report.Row(
            id=f"{key}.metric", kind=kind, metric=f"{key} metric", target="t",
            achieved="a", ok=ok,
        ))
        if crash:
            raise RuntimeError("the fake section broke")
        if hang:
            progress(key, "hang")
            time.sleep(60)
        return _report.SectionResult(tuple(out.rows), {})

    return _report.Section(key, key.title(), ("measure", "hang") if hang else ("measure",), run)


SECTIONS = {
    "fail": (section("first", "correctness", True), section("second", "correctness", False)),
    "miss": (section("first", "correctness", True), section("second", "performance", False)),
    "crash": (section("first", "correctness", True), section("second", "info", None, crash=True)),
    "hang": (section("first", "correctness", True), section("second", "info", None, hang=True)),
}
_report._sections = lambda: SECTIONS[sys.argv[1]]
sys.exit(main(["report", *sys.argv[2:]]))
"""


def _fake_report(tmp_path, *args: str, **kwargs) -> subprocess.Popen:
    script = tmp_path / "fake_report.py"
    script.write_text(FAKE_REPORT)
    return subprocess.Popen(  # noqa: S603  # our own interpreter and script
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


class TestExitCodes:
    """
    The exit codes of the command, in real processes.
    """

    def test_0_when_correctness_holds(self, tmp_path):
        """
        A run whose correctness rows hold exits with 0 (the contexts section at
        the quick scale: its isolation rows hold on any machine).
        """
        path = tmp_path / "r.json"
        proc = subprocess.run(  # noqa: S603  # our own interpreter and command
            [
                *(sys.executable, "-m", "usercontext", "report", "--quick"),
                *("--section", "contexts", "--json", str(path)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(path.read_text())
        assert list(data["sections"]) == ["contexts"]
        assert data["summary"]["counts"]["correctness"] == {"pass": 2, "fail": 0}
        assert data["summary"]["exit_code"] == 0

    @pytest.mark.parametrize(
        ("sections", "args", "code"),
        [("fail", (), 1), ("miss", (), 0), ("miss", ("--strict",), 1)],
    )
    def test_1_when_a_correctness_row_fails(self, tmp_path, sections, args, code):
        """
        A failing correctness row exits with 1; a missed performance row exits
        with 0, or with 1 under --strict.
        """
        proc = _fake_report(tmp_path, sections, *args)
        out, err = proc.communicate(timeout=60)

        assert proc.returncode == code, err
        assert f"**Exit code {code}.**" in out

    def test_2_on_a_crash(self, tmp_path):
        """
        A crash exits with 2; standard error names the section and shows the
        traceback, and the rows measured before are printed.
        """
        proc = _fake_report(tmp_path, "crash")
        out, err = proc.communicate(timeout=60)

        assert proc.returncode == 2
        assert (
            "usercontext report: the Second section crashed (RuntimeError: the fake section "
            "broke); the traceback follows.\nTraceback (most recent call last):\n"
        ) in err
        assert err.endswith("done in 0.0 s, exit code 2\n")
        assert "| first metric | correctness | t | a | PASS |" in out

    @pytest.mark.parametrize(
        "args",
        [
            ("--bogus",),
            ("--section", "nowhere"),
            ("--json",),
        ],
    )
    def test_2_on_a_usage_error(self, args):
        """
        A usage error exits with 2, before anything runs.
        """
        proc = subprocess.run(  # noqa: S603  # our own interpreter and command
            [sys.executable, "-m", "usercontext", "report", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert proc.returncode == 2
        assert proc.stderr.startswith("usage: usercontext")
        assert "error: " in proc.stderr
        assert "[1/" not in proc.stderr
        assert proc.stdout == ""

    @pytest.mark.parametrize("where", ["directory", "missing", "unwritable"])
    def test_2_on_a_bad_json_path(self, tmp_path, where):
        """
        A --json path that cannot be written is refused before the run, with
        exit code 2 and a message that says what to do.
        """
        path = {
            "directory": str(tmp_path),
            "missing": str(tmp_path / "missing" / "r.json"),
            "unwritable": _unwritable(tmp_path) if where == "unwritable" else "",
        }[where]
        proc = subprocess.run(  # noqa: S603  # our own interpreter and command
            [sys.executable, "-m", "usercontext", "report", "--quick", "--json", path],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert proc.returncode == 2
        assert f"usercontext report: error: --json {path}" in proc.stderr
        assert "[1/" not in proc.stderr  # refused before the run
        assert proc.stdout == ""

    def test_130_on_ctrl_c(self, tmp_path):
        """
        SIGINT (Ctrl-C) in the middle of a section stops the run with 130 and
        no traceback; the rows measured so far are printed, and written to
        the JSON file.
        """
        path = tmp_path / "r.json"
        proc = _fake_report(tmp_path, "hang", "--json", str(path))
        try:
            err = _until(proc, "] second: hang ...")
            proc.send_signal(signal.SIGINT)
            out, rest = proc.communicate(timeout=30)
        finally:
            proc.kill()

        assert proc.returncode == 130, err + rest
        assert "Traceback" not in err + rest, rest
        assert "usercontext report: interrupted in the Second section." in rest
        assert "| first metric | correctness | t | a | PASS |" in out
        assert "## Second (interrupted)\n" in out
        assert "| second metric | info | t | a | INFO |" in out
        summary = json.loads(path.read_text())["summary"]
        assert (summary["interrupted"], summary["exit_code"]) == (True, 130)

    def test_130_on_ctrl_c_in_the_real_report(self):
        """
        SIGINT during the real report (in the engines section, after the
        contexts section) exits with 130, prints the contexts rows, and shows
        no traceback.
        """
        proc = subprocess.Popen(
            [sys.executable, "-m", "usercontext", "report", "--quick"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            err = _until(proc, "] engines: ")
            proc.send_signal(signal.SIGINT)
            out, rest = proc.communicate(timeout=60)
        finally:
            proc.kill()

        assert proc.returncode == 130, err + rest
        assert "Traceback" not in err + rest, rest
        assert "## Contexts\n" in out
        assert "| Isolation: cross-user observations" in out
        assert "## Engines and quotas (interrupted)\n" in out
        assert "**Exit code 130.**" in out


def _until(proc: subprocess.Popen, text: str) -> str:
    """
    Read *proc*'s standard error up to the line that contains *text*; return
    what was read.
    """
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    pytest.fail(f"{text!r} never appeared on standard error: {''.join(seen)}")


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
        out = _report.Table("contexts")

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
            ([3.0, 3.0], [1.0, 1.0], 2.5, "MISS", False),
            # Best 2.6x, median of pairs 2.3x: the estimates disagree.
            ([2.6, 3.0], [1.0, 1.5], 2.5, "PASS", True),
            # Best 2.0x, median of pairs 4.0x.
            ([2.0, 4.0, 4.0], [1.0, 1.0, 1.0], 2.5, "PASS", True),
            ([2.6, 2.6], [1.0, 1.0], None, "PASS", False),
        ],
    )
    def test_ratio(self, ours, floor, target, status, note):
        """
        A ratio misses only when both estimates are above the target, and the
        row says when they disagree.
        """
        op = _report.Op("x", "pass", {})
        c = _report.Comparison(op, op, ours, floor, 10, 10)

        text = _report.fmt_ratio(c, target)

        assert text.startswith(f"{_report.fmt_ns(min(ours))} vs ")
        assert ("within noise" in text) is note
        if target is not None:
            ok = _report.ratio_ok(c.ratio, c.median_ratio, target)
            assert ("PASS" if ok else "MISS") == status

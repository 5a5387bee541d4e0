"""
Tests of the instruction-count harness (``instructions.py``): parsing of
callgrind's output, the per-operation arithmetic, the ratio and the guard's
margin, every operation's worker, and one real callgrind run (skipped
without valgrind).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest

import instructions as ins


needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")


def _result(ours=150.0, floor=100.0, target=1.3, margin=0.1):
    return ins.Result("op", "title", "unit", ours, floor, target, margin, 0.0)


class TestParse:
    def test_summary_or_totals(self):
        """
        The count is the file's ``summary:`` line, or its ``totals:`` line.
        """
        text = b"version: 1\ncmd: python\nevents: Ir\nfl=x\nfn=y\n1 2\nsummary: 12345\n"
        assert ins.parse_callgrind(text) == 12345
        assert ins.parse_callgrind(b"events: Ir\ntotals: 77\n") == 77

    def test_no_count(self):
        """
        A file without a count is an error, not a zero.
        """
        with pytest.raises(ValueError, match="no 'summary:'"):
            ins.parse_callgrind(b"events: Ir\n")


class TestArithmetic:
    def test_per_op(self):
        """
        Each side's count per operation is the difference of its two parts
        over the difference in operations; set-up and exit drop out.
        """
        op = dataclasses.replace(ins.BY_NAME["engine"], batch=10, n1=1, n2=3)
        parts = [10**9, 5_000, 9_000, 2_000, 3_000, 10**6]

        assert ins.per_op(op, parts) == (200.0, 50.0)

    def test_per_op_needs_every_part(self):
        """
        A run with another number of parts (a stray mark) is refused.
        """
        with pytest.raises(ValueError, match="expected 6 parts, got 5"):
            ins.per_op(ins.BY_NAME["engine"], [1, 2, 3, 4, 5])

    def test_ratio_status_and_guard(self):
        """
        PASS at or under the target; MISS above it; the guard fails only past
        the target by more than the margin; no target is information.
        """
        at = _result(ours=130.0)
        within = _result(ours=140.0)
        past = _result(ours=145.0)

        assert at.ratio == pytest.approx(1.3)
        assert (at.status, at.fails_guard) == ("PASS", False)
        assert (within.status, within.fails_guard) == ("MISS", False)
        assert (past.status, past.fails_guard) == ("MISS", True)
        info = _result(ours=900.0, target=None)
        assert (info.status, info.fails_guard) == ("INFO", False)
        assert info.as_dict()["ratio"] == 9.0

    def test_a_missed_target_is_guarded_at_its_measured_figure(self):
        """
        A row with a guard still shows MISS against its target, but the guard
        fails only past its own figure by more than the margin, and the table
        says so.
        """
        held = dataclasses.replace(_result(ours=60.0, target=0.45), guard=0.6)
        regressed = dataclasses.replace(_result(ours=67.0, target=0.45), guard=0.6)

        assert (held.status, held.fails_guard) == ("MISS", False)
        assert (regressed.status, regressed.fails_guard) == ("MISS", True)
        assert "| MISS | ok (held to today's 0.6x) |" in ins.table([held])
        assert ins.BY_NAME["registry-sync"].guard == 0.55

    def test_measure_with_a_counter(self):
        """
        `measure` asks the counter for one marked run of the worker, or for
        two whole fresh interpreters.
        """
        calls = []

        def counter(argv, marks):
            calls.append((argv[-1], marks))
            return (
                [0, 0, 400, 0, 100, 0] if marks else [3_000 if "usercontext" in argv[-1] else 1_000]
            )

        engine = ins.measure(dataclasses.replace(ins.BY_NAME["engine"], batch=2), counter=counter)
        imports = ins.measure(ins.BY_NAME["import"], counter=counter)

        assert (engine.ours, engine.floor, engine.ratio) == (100.0, 25.0, 4.0)
        assert (imports.ours, imports.floor, imports.status) == (3_000.0, 1_000.0, "MISS")
        assert calls == [
            ("3", True),
            ("import usercontext", False),
            ("import attrs, anyio", False),
        ]

    def test_table(self):
        """
        The table has a row per operation with both counts, the ratio, the
        target and both verdicts.
        """
        text = ins.table([_result(ours=2.5e6, floor=1e6), _result(target=None)])

        assert "| op | unit | 2,500.0 k | 1,000.0 k | 2.50x | <= 1.3x | MISS | FAIL |" in text
        assert "| op | unit | 0.1 k | 0.1 k | 1.50x | none | INFO | ok |" in text


class TestMain:
    def test_without_valgrind(self, monkeypatch, capsys):
        """
        Without valgrind the harness says so and passes, unless CI=true.
        """
        monkeypatch.setattr(shutil, "which", lambda _name: None)
        monkeypatch.delenv("CI", raising=False)
        assert ins.main(["--check"]) == 0
        assert "valgrind is missing: instruction counts skipped" in capsys.readouterr().out

        monkeypatch.setenv("CI", "true")
        assert ins.main(["--check"]) == 1
        assert "CI=true requires" in capsys.readouterr().out

    def test_check_fails_past_the_margin(self, monkeypatch, tmp_path, capsys):
        """
        With --check, a ratio past its target by more than the margin exits
        with 1; the JSON has every row.
        """
        monkeypatch.setattr(shutil, "which", lambda _name: "/usr/bin/valgrind")
        ratios = {"engine": 2.6, "emit": 2.5}
        monkeypatch.setattr(
            ins,
            "measure",
            lambda op, _margin, _counter: dataclasses.replace(
                _result(ours=100 * ratios[op.name], target=op.target), name=op.name
            ),
        )
        out = tmp_path / "rows.json"

        args = ["--only", "engine", "--only", "emit", "--json", str(out)]
        assert ins.main(args) == 0
        assert ins.main([*args, "--check"]) == 1

        assert "Past their target by more than 10%: emit" in capsys.readouterr().out
        rows = json.loads(out.read_text())
        assert [(r["status"], r["fails_guard"]) for r in rows] == [
            ("MISS", False),
            ("MISS", True),
        ]

    def test_unknown_and_unavailable(self, monkeypatch, capsys):
        """
        An unknown name is a usage error; a row whose rival is not installed is
        skipped with a message.
        """
        with pytest.raises(SystemExit, match="unknown operation"):
            ins.main(["--only", "nope"])
        monkeypatch.setattr(shutil, "which", lambda _name: "/usr/bin/valgrind")
        monkeypatch.setitem(
            ins.BY_NAME, "emit", dataclasses.replace(ins.BY_NAME["emit"], needs="no_such_module")
        )
        assert ins.main(["--only", "emit"]) == 0
        assert "emit: skipped, no_such_module is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("name", [op.name for op in ins.OPERATIONS if not op.fresh])
def test_worker(monkeypatch, name):
    """
    Each operation's worker runs both sides, outside callgrind too (its
    marks are then plain calls).
    """
    op = ins.BY_NAME[name]
    if op.needs:
        pytest.importorskip(op.needs)
    small = 100 if name.startswith("http") else 10
    marks = []
    monkeypatch.setattr(ins.os, "getppid", lambda: marks.append(1))

    ins.worker(dataclasses.replace(op, batch=small))

    assert len(marks) == 5


@needs_valgrind
class TestCallgrind:
    def test_parts(self):
        """
        A real run under callgrind: one count per part between the marks, each
        in proportion to the work done in it.
        """
        code = (
            "import os; os.getppid(); sum(range(1000)); os.getppid(); "
            "sum(range(100000)); os.getppid()"
        )
        parts = ins.count([sys.executable, "-S", "-c", code], True)

        assert len(parts) == 4
        small, large = parts[1], parts[2]
        assert 50 < large / small < 150

    def test_a_real_operation(self):
        """
        The smallest real row: ours and the floor of the async registry scope
        each cost thousands of instructions per scope.
        """
        op = dataclasses.replace(ins.BY_NAME["registry-async"], batch=20)

        result = ins.measure(op)

        assert 1_000 < result.floor < result.ours < 200_000

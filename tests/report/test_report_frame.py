"""
Tests of the report's frame (`usercontext._report.frame`): running sections,
their Markdown and JSON output, crashes and interruptions, the JSON path check,
and the thread each scenario runs on.
"""

from __future__ import annotations

import io
import json
import threading

import attrs
import pytest

from report_helpers import TINY, fake_row, unwritable

import usercontext

from usercontext import UserContext
from usercontext._report.frame import (
    Progress,
    Section,
    SectionResult,
    check_json_path,
    in_thread,
    run_report,
)


def _section(
    key: str = "fake",
    rows: tuple[tuple[str, bool | None], ...] = (("info", None),),
    notes: tuple[str, ...] = (),
    raises: BaseException | None = None,
) -> Section:
    """
    A section *key* with a row of each (kind, ok) in *rows*; with *raises*,
    it adds its rows and then raises that.
    """

    def run(scale, progress):
        out = progress.table(key)
        progress(key, "only step")
        for i, (kind, ok) in enumerate(rows):
            out.rows.append(fake_row(key, kind, ok, f"metric_{i}"))
        out.figures["scale"] = scale.name
        if raises is not None:
            raise raises
        return SectionResult(tuple(out.rows), out.figures, notes)

    return Section(key, key.title(), ("only step",), run)


def _run(sections, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    code = run_report(sections=sections, scale=TINY, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


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
        assert "[1/1] fake: only step ... (about 5 s left)\n" in err
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
        By default the report runs at the default scale, prints to standard output
        and writes no JSON.
        """
        code = run_report(sections=[_section(notes=("A note.",))])

        out, err = capsys.readouterr()
        assert code == 0
        assert "- Run: default, " in out
        assert "| `fake` metric_0 | info | ≤ 1x | **2x** | INFO |\n\n- A note.\n" in out
        assert out.endswith("**Info: 1.** **Exit code 0.**\n")
        assert err.startswith("[1/1] fake: only step ... (about 5 s left)\n")

    def test_long_runs_count_in_minutes(self):
        """
        A run expected to last a minute or more tells the time left in
        minutes, and a step that ran as estimated keeps the estimate.
        """
        section = Section("long", "Long", ("one", "two"), lambda scale, progress: None)
        section = attrs.evolve(section, estimate_s=150)
        stream = io.StringIO()
        progress = Progress(2, stream, [section])

        progress("long", "one")

        assert stream.getvalue() == "[1/2] long: one ... (about 2.5 min left)\n"

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
            "[1/3] first: only step ... (about 15 s left)\n"
            "[2/3] second: only step ... (about 3 s left)\n"
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

        sections = [_section("first"), Section("second", "Second", (), broken)]

        code, out, _ = _run(sections)

        assert code == 2
        assert "## Second (crashed)\n\nNo row was measured.\n" in out


class TestJsonPath:
    def test_writable(self, tmp_path):
        """
        A new file in an existing directory is accepted and not left behind; an
        existing file is accepted and left as it was.
        """
        new, old = tmp_path / "new.json", tmp_path / "old.json"
        old.write_text("kept")

        assert check_json_path(str(new)) is None
        assert check_json_path(str(old)) is None

        assert not new.exists()
        assert old.read_text() == "kept"

    def test_refused(self, tmp_path):
        """
        A directory, a missing directory, or a file where a directory should
        be is refused with a sentence that says what to do.
        """
        (tmp_path / "file").write_text("")

        assert check_json_path(str(tmp_path)) == (
            f"--json {tmp_path} is a directory. Give the path of a file, such as "
            f"{tmp_path / 'report.json'}."
        )
        assert check_json_path(str(tmp_path / "missing" / "r.json")) == (
            f"--json {tmp_path / 'missing' / 'r.json'}: the directory {tmp_path / 'missing'} "
            "does not exist. Create it first, or give a path in an existing directory."
        )
        assert check_json_path(str(tmp_path / "file" / "r.json")) == (
            f"--json {tmp_path / 'file' / 'r.json'}: {tmp_path / 'file'} is not a directory. "
            "Give a path in a directory."
        )

    def test_not_writable(self, tmp_path):
        """
        A path in a directory the user cannot write to is refused.
        """
        path = unwritable(tmp_path)

        assert check_json_path(path) == (
            f"--json {path} is not writable (Permission denied). Give a path you can write to."
        )


class TestInThread:
    def test_result_and_context(self):
        """
        The function runs in another thread, in an empty context, and its
        result comes back.
        """
        ctx = UserContext(user_id="u-1", thread_id="t", run_id="r")

        with usercontext.bind(ctx):
            seen = in_thread(
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
            in_thread(boom)

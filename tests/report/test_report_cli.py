"""
Tests of the ``usercontext report`` command (`usercontext.__main__`): its
options, its output and its exit codes, in-process and in real processes.

The report's figures depend on the machine, so these tests check its shape and
that every figure is sane, not the figures themselves.
"""

from __future__ import annotations

import asyncio
import json
import re
import runpy
import signal
import subprocess
import sys
import threading

import pytest

from report_helpers import METRICS, unwritable

import usercontext
import usercontext.__main__

from usercontext.__main__ import SECTION_KEYS, main
from usercontext._report import frame
from usercontext._report.rows import LEGACY, STATUSES
from usercontext._report.sections import SECTIONS


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
    for section in SECTIONS:
        if f"## {section.title}\n" in out:
            # What the legacy report claimed, then what was measured here.
            assert f"## {section.title}\n\nLegacy claim: {section.legacy}\n\n| Metric " in out
    header = "| Metric | Kind | Target | Achieved | Status |\n|---|---|---|---|---|\n"
    assert f"## Contexts\n\nLegacy claim: {SECTIONS[0].legacy}\n\n{header}" in out
    rows = _table_rows(out)
    for metric in METRICS:
        assert any(r[0].startswith(metric) for r in rows), metric
    for row in rows:
        assert row[-1] in STATUSES[row[1]], row
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
    total = sum(len(s.steps) for s in SECTIONS)
    assert len(progress) == total
    assert re.fullmatch(
        rf"\[1/{total}\] contexts: creation \.\.\. \(about \d+ s left\)", progress[0]
    )
    contexts = next(s for s in SECTIONS if s.key == "contexts")
    assert [
        re.sub(r" \(about [\d.]+ (s|min) left\)$", "", line.split("] ", 1)[1])
        for line in progress
        if "] contexts: " in line
    ] == [f"contexts: {step} ..." for step in contexts.steps]
    assert "[" not in out.split("## Contexts", maxsplit=1)[0]  # no progress on standard output

    summary = data["summary"]
    assert summary["exit_code"] == code
    assert summary["complete"] is True
    assert summary["interrupted"] is False
    assert summary["crashed"] is None
    assert summary["counts"]["correctness"]["fail"] == statuses.count("FAIL")
    assert summary["counts"]["performance"]["miss"] == statuses.count("MISS")
    assert summary["counts"]["info"]["info"] == statuses.count("INFO")
    assert data["legacy"] == LEGACY
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
    assert row["status"] in STATUSES[row["kind"]]
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
            timeout=300,  # about 15 s; far more on a machine that other jobs load
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
        assert "--out DIR" in out
        assert "--full" in out

    def test_options_reach_the_report(self, monkeypatch):
        """
        --section runs only the sections named, in the report's order, and
        --strict judges performance rows.
        """
        calls = []
        monkeypatch.setattr(frame, "run_report", lambda **kw: calls.append(kw) or 0)

        assert main(["report", "--section", "http", "--section", "contexts", "--strict"]) == 0

        (call,) = calls
        assert [s.key for s in call["sections"]] == ["contexts", "http"]
        assert call["strict"] is True

    @pytest.mark.parametrize(
        ("args", "name"),
        [((), "default"), (("--quick",), "quick"), (("--full",), "full")],
    )
    def test_scale_options(self, monkeypatch, args, name):
        """
        --quick and --full choose the scale: the full one keeps the default
        run's repeats and sustains its stability run for five minutes.
        """
        calls = []
        monkeypatch.setattr(frame, "run_report", lambda **kw: calls.append(kw) or 0)

        assert main(["report", *args]) == 0

        (call,) = calls
        scale = call["scale"]
        assert scale.name.startswith(name)
        assert (scale.stability_s, scale.repeats) == {
            "default": (4.0, 60),
            "quick": (1.5, 15),
            "full": (300.0, 60),
        }[name]
        assert call["out_dir"] is None

    def test_quick_and_full_exclude_each_other(self, capsys, monkeypatch):
        """
        --quick and --full together are a usage error.
        """
        monkeypatch.setattr(frame, "run_report", lambda **_kw: pytest.fail("it ran"))

        with pytest.raises(SystemExit) as ei:
            main(["report", "--quick", "--full"])

        assert ei.value.code == 2
        assert "argument --full: not allowed with argument --quick" in capsys.readouterr().err

    def test_out_reaches_the_report(self, tmp_path, monkeypatch):
        """
        --out makes the directory, parents too, before the run, and passes it on.
        """
        calls = []
        monkeypatch.setattr(frame, "run_report", lambda **kw: calls.append(kw) or 0)
        out = tmp_path / "a" / "report"

        assert main(["report", "--out", str(out)]) == 0

        assert out.is_dir()
        assert calls[0]["out_dir"] == str(out)

    def test_bad_out_dir_in_process(self, tmp_path, capsys, monkeypatch):
        """
        An --out that is a file is a usage error, before the run.
        """
        monkeypatch.setattr(frame, "run_report", lambda **_kw: pytest.fail("it ran"))
        file = tmp_path / "report"
        file.write_text("")

        with pytest.raises(SystemExit) as ei:
            main(["report", "--out", str(file)])

        assert ei.value.code == 2
        assert f"usercontext report: error: --out {file} is a file. Give a directory" in (
            capsys.readouterr().err
        )

    def test_bad_json_path_in_process(self, tmp_path, capsys, monkeypatch):
        """
        A --json path that cannot be written is a usage error, before the run.
        """
        monkeypatch.setattr(frame, "run_report", lambda **_kw: pytest.fail("it ran"))

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

        monkeypatch.setattr(frame, "run_report", crash)

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

        monkeypatch.setattr(frame, "run_report", interrupt)

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
        # The package ships a pytest plugin, so pytest rewrites its modules'
        # asserts through an import hook that runpy cannot load from (it has
        # no get_code): run the command the way `python -m` does, without it.
        plain = [f for f in sys.meta_path if type(f).__name__ != "AssertionRewritingHook"]
        monkeypatch.setattr(sys, "meta_path", plain)

        with pytest.raises(SystemExit) as ei:
            runpy.run_module("usercontext", run_name="__main__")

        assert ei.value.code == 2
        assert "usage: usercontext" in capsys.readouterr().err

    @pytest.mark.parametrize("imports", ["usercontext", "usercontext, usercontext.__main__"])
    def test_import_does_not_load_report(self, imports):
        """
        In a fresh interpreter, neither `import usercontext` nor importing the
        command loads any module of the report, nor what only the report needs.
        """
        code = (
            f"import sys, {imports}; "
            "print(sorted(m for m in sys.modules if m.startswith('usercontext._report')), "
            "'tracemalloc' in sys.modules)"
        )
        proc = subprocess.run(  # noqa: S603  # our own interpreter and code
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )

        assert proc.stdout == "[] False\n"

    def test_report_modules_load(self):
        """
        The report's modules are there to load, so the check above is not
        vacuous: the command loads the frame, the sections and every section.
        """
        code = (
            "import json, sys, usercontext._report.sections; "
            "print(json.dumps([m for m in sys.modules if m.startswith('usercontext._report.')]))"
        )
        proc = subprocess.run(  # noqa: S603  # our own interpreter and code
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )

        loaded = {m.rsplit(".", 1)[1] for m in json.loads(proc.stdout)}
        assert set(SECTION_KEYS) <= loaded
        assert {"frame", "floors", "rows", "scale", "service", "timing"} <= loaded

    def test_section_keys(self):
        """
        The command's --section choices are the report's sections, in order.
        """
        assert tuple(s.key for s in SECTIONS) == SECTION_KEYS


# A script that runs `usercontext report` on fake sections chosen by its first
# argument, with the rest of its arguments; the command's exit code is the
# process's.
FAKE_REPORT = """
import sys, time
from usercontext._report import frame, rows, sections
from usercontext.__main__ import main


def section(key, kind, ok, hang=False, crash=False):
    def run(scale, progress):
        out = progress.table(key)
        progress(key, "measure")
        out.rows.append(rows.Row(
            id=f"{key}.metric", kind=kind, metric=f"{key} metric", target="t",
            achieved="a", ok=ok,
        ))
        if crash:
            raise RuntimeError("the fake section broke")
        if hang:
            progress(key, "hang")
            time.sleep(60)
        return frame.SectionResult(tuple(out.rows), {})

    return frame.Section(key, key.title(), ("measure", "hang") if hang else ("measure",), run)


FAKE = {
    "fail": (section("first", "correctness", True), section("second", "correctness", False)),
    "miss": (section("first", "correctness", True), section("second", "performance", False)),
    "crash": (section("first", "correctness", True), section("second", "info", None, crash=True)),
    "hang": (section("first", "correctness", True), section("second", "info", None, hang=True)),
}
sections.SECTIONS = FAKE[sys.argv[1]]
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
            "unwritable": unwritable(tmp_path) if where == "unwritable" else "",
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


class TestCtrlC:
    """
    While the report runs, Ctrl-C raises `KeyboardInterrupt` wherever it
    lands, even while ``asyncio.run`` starts, which would otherwise lose it.
    """

    def test_asyncio_run_keeps_the_handler(self):
        """
        Inside the block, ``asyncio.run`` keeps the report's handler, and a
        SIGINT in a coroutine leaves ``asyncio.run`` as `KeyboardInterrupt`;
        after the block, the default handler is back.
        """
        seen = []

        async def interrupted():
            seen.append(signal.getsignal(signal.SIGINT))
            signal.raise_signal(signal.SIGINT)
            await asyncio.sleep(10)

        with pytest.raises(KeyboardInterrupt), usercontext.__main__._ctrl_c_raises():
            asyncio.run(interrupted())

        assert seen == [usercontext.__main__._raise_interrupt]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def test_another_handler_is_left_alone(self):
        """
        A handler the caller installed stays in place, and is still there after.
        """
        calls = []
        previous = signal.signal(signal.SIGINT, lambda *_: calls.append(1))
        try:
            with usercontext.__main__._ctrl_c_raises():
                signal.raise_signal(signal.SIGINT)
                mine = signal.getsignal(signal.SIGINT)
            assert calls == [1]
            assert signal.getsignal(signal.SIGINT) is mine
        finally:
            signal.signal(signal.SIGINT, previous)

    def test_not_in_the_main_thread(self):
        """
        Off the main thread (where handlers cannot be set), nothing changes.
        """
        seen = []

        def run():
            with usercontext.__main__._ctrl_c_raises():
                seen.append(signal.getsignal(signal.SIGINT))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

        assert seen == [signal.default_int_handler]

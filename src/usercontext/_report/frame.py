"""
The frame of ``usercontext report``: sections, their rows, progress, and the
report as Markdown and JSON.

The report runs scenarios on the machine at hand and prints what it measured,
section by section, as Markdown tables, beside the targets of the design and
the figures of the legacy system this library replaces. Nothing in it is
estimated. Each row has a kind (see `usercontext._report.rows`): a
correctness row that fails is a FAIL and makes the exit code 1; a performance
row that misses its target is a MISS, which changes the exit code only with
``--strict``; an info row has no target.

A `Section` is a title, a list of steps (for the progress line) and a function
that returns a `SectionResult`: table rows plus the raw figures that ``--json``
writes. To add one, write a module ``usercontext._report.<name>`` with a
function ``(scale, progress) -> SectionResult`` that takes its `Table` from
``progress.table(key)`` (so that an interrupted run still prints the rows
measured so far), calls ``progress(key, step)`` before each step, times each
operation against its floor with `usercontext._report.timing.compare` and adds
the row with `Table.ratio`, gives every other row an id and a kind, and sizes
its work from its `Scale`; then add its `Section` to
`usercontext._report.sections.SECTIONS`, with what the legacy report claimed
for it (``legacy``) and about how long it runs at the default scale
(``estimate_s``). To chart its figures in the HTML report, add a function to
`usercontext._report.charts.CHARTS`.

It uses the standard library and the public API of usercontext only (attrs for
the floors it compares against, anyio for the asynchronous scenarios), and
``import usercontext`` never imports it.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import platform
import sys
import threading
import time
import traceback
import warnings

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

import usercontext

from .output import Part, write_out
from .rows import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    LEGACY,
    Goal,
    Quantity,
    Row,
    counts,
    exit_code,
    verdict,
)
from .scale import DEFAULT, Scale
from .timing import fmt_ratio, in_empty_context, ratio_ok


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TextIO

    from .timing import Comparison


__all__ = [
    "Progress",
    "Section",
    "SectionResult",
    "Table",
    "check_json_path",
    "forget_interrupt",
    "in_thread",
    "run_report",
]

T = TypeVar("T")


@attrs.frozen
class SectionResult:
    """
    What a section produced: its table *rows*, the raw *figures* for the JSON
    output, and *notes* printed under the table (how it was measured).
    """

    rows: tuple[Row, ...]
    figures: dict[str, Any]
    notes: tuple[str, ...] = ()


class Progress:
    """
    Write one line per step to *stream*, such as ``[1/7] contexts: creation ...``.

    With *sections* and *scale*, each line also tells about how long the run
    has left: each section's `Section.estimate_s`, spread over its steps and
    scaled by ``scale.time_factor``, corrected by how fast the steps so far
    went against their estimates.

    Args:
        total: The number of steps announced in all sections.
        stream: Where the lines go; the report sends them to standard error.
        sections: The sections that will run, for the time-left estimate.
        scale: The scale they run at.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO,
        sections: Sequence[Section] = (),
        scale: Scale = DEFAULT,
    ) -> None:
        self.total = total
        self.done = 0
        self.current: Table | None = None
        self._stream = stream
        self._estimates = [
            s.estimate_s * scale.time_factor / len(s.steps) for s in sections for _ in s.steps
        ]
        self._started = time.perf_counter()
        #: How long each section that ended took, in seconds, by key.
        self.section_s: dict[str, float] = {}

    def table(self, section: str) -> Table:
        """
        Return a new `Table` for the rows of *section*, the key of the section
        that runs now; the report prints its rows even if the section stops
        before it returns.
        """
        self.current = Table(section)
        return self.current

    def partial(self, section: str) -> SectionResult:
        """
        Return the rows and figures *section* measured before it stopped.
        """
        table = self.current
        if table is None or table.section != section:
            return SectionResult((), {})
        return SectionResult(tuple(table.rows), table.figures)

    def __call__(self, section: str, step: str) -> None:
        """
        Announce that *step* of *section* starts.
        """
        left = self._left()
        self.done += 1
        self._stream.write(f"[{self.done}/{self.total}] {section}: {step} ...{left}\n")
        self._stream.flush()

    def _left(self) -> str:
        """
        Return, for a progress line, about how long the steps not yet done will take.
        """
        if len(self._estimates) != self.total:
            return ""
        expected = sum(self._estimates[self.done :])
        done = sum(self._estimates[: self.done])
        if done:
            # The machine runs faster or slower than the estimates: as fast as
            # so far, the more so the more is done, within a factor of 3.
            pace = min(3.0, max(1 / 3, (time.perf_counter() - self._started) / done))
            weight = min(1.0, done / (0.3 * sum(self._estimates)))
            expected *= 1 + weight * (pace - 1)
        if expected < 60:
            return f" (about {max(1, round(expected))} s left)"
        return f" (about {expected / 60:.1f} min left)"


@attrs.frozen
class Section:
    """
    A part of the report.

    Args:
        key: The section's name in the JSON output and in progress lines.
        title: The heading above its table.
        steps: The steps *run* announces, in order, so that progress shows a total.
        run: Runs the scenarios with a `Scale` and a `Progress` and returns
            their `SectionResult`.
        legacy: What the legacy report claimed for this part, printed under
            its heading, beside what was measured here.
        estimate_s: About how long it runs at the default scale, in seconds,
            for the time left that the progress lines tell.
    """

    key: str
    title: str
    steps: tuple[str, ...]
    run: Callable[[Scale, Progress], SectionResult]
    legacy: str = ""
    estimate_s: float = 5.0


def _environment() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "usercontext": usercontext.__version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "python_build": sys.version.replace("\n", " "),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": None if affinity is None else len(affinity(0)),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _table(rows: Sequence[Row]) -> list[str]:
    lines = ["| Metric | Kind | Target | Achieved | Status |", "|---|---|---|---|---|"]
    lines.extend(
        f"| {r.metric} | {r.kind} | {r.target} | {r.achieved} | {r.status} |" for r in rows
    )
    return lines


@attrs.frozen
class _Stop:
    """
    Why a run stopped before its last section: Ctrl-C, or a section that crashed.
    """

    section: Section
    code: int
    error: str | None = None


@attrs.frozen
class _Outcome:
    """
    What a run measured, and how it ended.
    """

    env: dict[str, Any]
    scale: Scale
    wall_s: float
    results: list[tuple[Section, SectionResult]]
    section_s: dict[str, float]
    code: int
    stop: _Stop | None
    strict: bool

    @property
    def rows(self) -> list[Row]:
        """
        Every row measured, in the order of the report.
        """
        return [row for _, result in self.results for row in result.rows]

    def markdown(self) -> str:
        """
        Return the report as Markdown.
        """
        env, stop = self.env, self.stop
        lines = [
            "# usercontext validation report",
            "",
            f"- usercontext {env['usercontext']} on {env['implementation']} {env['python']}",
            (
                f"- Platform: {env['platform']}, {env['cpu_count']} CPUs "
                f"({env['cpus_usable']} usable by this process)"
            ),
            f"- Date: {env['date']}",
            (
                f"- Run: {self.scale.name}, {self.wall_s:.1f} s; every figure below was "
                "measured in this run"
            ),
            (
                f"- Legacy: {LEGACY['system']}. Its figures are quoted from "
                f"{LEGACY['source']}; they were not measured here."
            ),
            (
                "- Kinds: a **correctness** row (isolation, leaks, bounds, success rates) holds "
                "(PASS) or fails (FAIL), and a FAIL makes the exit code 1. A **performance** row "
                "(a timing, or a ratio of timings) meets its target (PASS) or misses it (MISS); a "
                "MISS changes the exit code only with `--strict`. An **info** row has no target."
            ),
        ]
        for section, result in self.results:
            title = section.title
            if stop is not None and section is stop.section:
                title += " (interrupted)" if stop.error is None else " (crashed)"
            lines += ["", f"## {title}", ""]
            if section.legacy:
                lines += [f"Legacy claim: {section.legacy}", ""]
            lines += _table(result.rows) if result.rows else ["No row was measured."]
            if result.notes:
                lines += ["", *(f"- {note}" for note in result.notes)]
        lines += ["", "## Verdict", "", self.verdict()]
        return "\n".join(lines) + "\n"

    def verdict(self) -> str:
        """
        Return the verdict, one Markdown paragraph.
        """
        stop = self.stop
        if stop is None:
            return verdict(self.rows, self.code, strict=self.strict)
        why = "Interrupted (Ctrl-C)" if stop.error is None else f"Crashed ({stop.error})"
        n = counts(self.rows)["correctness"]
        return (
            f"**{why} in the {stop.section.title} section: no verdict.** The rows above are "
            f"those measured before it stopped (correctness so far: {n['pass']} PASS, "
            f"{n['fail']} FAIL). **Exit code {self.code}.**"
        )

    def parts(self) -> list[Part]:
        """
        Return the sections as the HTML report shows them.
        """
        stop = self.stop
        return [
            Part(
                key=section.key,
                title=section.title,
                legacy=section.legacy,
                rows=result.rows,
                notes=result.notes,
                stopped=(
                    ""
                    if stop is None or section is not stop.section
                    else "interrupted"
                    if stop.error is None
                    else "crashed"
                ),
            )
            for section, result in self.results
        ]

    def json(self) -> dict[str, Any]:
        """
        Return the report as JSON values: every row, every raw figure, the summary.
        """
        rows, stop = self.rows, self.stop
        return {
            "environment": self.env,
            "scale": attrs.asdict(self.scale),
            "wall_s": self.wall_s,
            "legacy": LEGACY,
            "sections": {
                s.key: {
                    "title": s.title,
                    "wall_s": self.section_s.get(s.key),
                    "legacy": s.legacy,
                    "complete": stop is None or s is not stop.section,
                    "rows": [r.to_json() for r in result.rows],
                    "figures": result.figures,
                    "notes": list(result.notes),
                }
                for s, result in self.results
            },
            "summary": {
                "counts": counts(rows),
                "failed": [r.id for r in rows if r.status == "FAIL"],
                "missed": [r.id for r in rows if r.status == "MISS"],
                "strict": self.strict,
                "complete": stop is None,
                "interrupted": stop is not None and stop.error is None,
                "crashed": None
                if stop is None or stop.error is None
                else {"section": stop.section.key, "error": stop.error},
                "exit_code": self.code,
            },
        }


def check_json_path(path: str) -> str | None:
    """
    Tell why the report could not write its JSON to *path*, or return `None`
    if it can.

    It checks before the run, so that a long run does not end on a path it
    cannot write: *path* must not be a directory, its directory must exist,
    and the file must be writable (it is opened for appending, and removed
    again if it did not exist).
    """
    file = Path(path)
    if file.is_dir():
        return (
            f"--json {path} is a directory. Give the path of a file, such as "
            f"{file / 'report.json'}."
        )
    if not file.parent.exists():
        return (
            f"--json {path}: the directory {file.parent} does not exist. Create it first, or "
            "give a path in an existing directory."
        )
    if not file.parent.is_dir():
        return f"--json {path}: {file.parent} is not a directory. Give a path in a directory."
    existed = file.exists()
    try:
        with file.open("a", encoding="utf-8"):
            pass
    except OSError as e:
        return f"--json {path} is not writable ({e.strerror}). Give a path you can write to."
    if not existed:
        file.unlink()
    return None


def run_report(  # noqa: PLR0913  # keyword-only options of one command
    *,
    sections: Sequence[Section],
    scale: Scale = DEFAULT,
    json_path: str | None = None,
    out_dir: str | None = None,
    strict: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """
    Run *sections* at *scale* and print the report as Markdown to *out*.

    Progress lines go to *err*. With *json_path*, every figure measured is also
    written there as JSON. If a section crashes, or the run is interrupted
    (Ctrl-C), the rows measured so far are printed and written all the same,
    and the crash is described on *err* with its traceback.

    Args:
        sections: The sections to run, such as
            `usercontext._report.sections.SECTIONS`.
        scale: How much work to do: `DEFAULT`, or `QUICK` for a rough run.
        json_path: Where to write the raw figures, if anywhere.
        out_dir: A directory to write ``report.md``, ``report.json`` and
            ``report.html`` into, if any (`usercontext._report.output`).
        strict: Whether a performance row that misses its target fails the run.
        out: The stream for the report; standard output by default.
        err: The stream for progress lines; standard error by default.

    Returns:
        0 if every correctness row held (and, if *strict*, every performance
        row met its target), 1 if not, 2 if a section crashed, 130 if the run
        was interrupted.
    """
    # New names, declared TextIO: reassigned, the parameters would keep their None.
    report: TextIO = out or sys.stdout
    progress_to: TextIO = err or sys.stderr
    env = _environment()
    progress = Progress(sum(len(s.steps) for s in sections), progress_to, sections, scale)

    started = time.perf_counter()
    results: list[tuple[Section, SectionResult]] = []
    stop: _Stop | None = None
    interrupt: KeyboardInterrupt | None = None
    for section in sections:
        try:
            began = time.perf_counter()
            results.append((section, section.run(scale, progress)))
            progress.section_s[section.key] = time.perf_counter() - began
        except (Exception, KeyboardInterrupt) as e:  # noqa: PERF203  # reported below, with its traceback
            if isinstance(e, KeyboardInterrupt):
                interrupt = e  # forgotten once its handling ended (see below)
                stop = _Stop(section, EXIT_INTERRUPTED)
                progress_to.write(
                    f"\nusercontext report: interrupted in the {section.title} section.\n"
                )
            else:
                stop = _Stop(section, EXIT_ERROR, f"{type(e).__name__}: {e}")
                progress_to.write(
                    f"usercontext report: the {section.title} section crashed "
                    f"({type(e).__name__}: {e}); the traceback follows.\n"
                    + "".join(traceback.format_exception(type(e), e, e.__traceback__))
                )
            results.append((section, progress.partial(section.key)))
            break
    if interrupt is not None:
        # Outside the handler: on Python 3.10 the thread's handled-exception
        # state holds the traceback apart from the exception until then.
        forget_interrupt(interrupt)
        interrupt = None
    wall_s = time.perf_counter() - started

    rows = [row for _, result in results for row in result.rows]
    code = exit_code(rows, strict=strict) if stop is None else stop.code
    outcome = _Outcome(env, scale, wall_s, results, progress.section_s, code, stop, strict)
    markdown = outcome.markdown()
    report.write(markdown)
    report.flush()
    if json_path is not None:
        Path(json_path).write_text(json.dumps(outcome.json(), indent=2) + "\n", encoding="utf-8")
    if out_dir is not None:
        written, missing = write_out(
            out_dir, markdown, outcome.json(), outcome.parts(), outcome.verdict()
        )
        progress_to.write(f"wrote {', '.join(str(p) for p in written)}\n")
        if missing is not None:
            progress_to.write(f"report.html not written: {missing}\n")
    progress_to.write(f"done in {wall_s:.1f} s, exit code {code}\n")
    return code


def forget_interrupt(interrupt: KeyboardInterrupt) -> None:
    """
    Free, quietly, what Ctrl-C left half-made where *interrupt* was raised.

    An event loop interrupted in its constructor, or a coroutine never
    awaited, reports itself with a traceback when it is collected; the
    traceback of *interrupt* holds them. The run says all it has to say (the
    rows so far, exit code 130), so they are freed here with such reports
    silenced, and the hooks put back.
    """
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            interrupt.__traceback__ = None
            interrupt.__context__ = None
            gc.collect()
    finally:
        sys.unraisablehook = hook


def in_thread(fn: Callable[[], T]) -> T:
    """
    Call *fn* in an empty Context, in a daemon thread of its own, and return
    its result or raise its exception.

    Each scenario gets a fresh thread, and so a fresh event loop: nothing it
    leaves behind (loops, tracing state of debuggers and coverage tools)
    reaches the next one or the caller. The garbage it leaves is collected on
    that thread before this returns. On Python 3.11 a coroutine resumed by a
    cancellation sends no "call" event, which leaves a tracer (coverage's) out
    of step with the frames below the event loop
    (https://github.com/python/cpython/issues/106749): the thread keeps those
    trace events to itself. The thread is a daemon, and the wait for it can be
    interrupted, so that Ctrl-C stops the report at once.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = in_empty_context(fn)
        except BaseException as e:  # raised again in the caller's thread
            outcome["error"] = e
        finally:
            gc.collect()  # finalise what the scenario left, on its own thread

    thread = threading.Thread(target=call, name="usercontext-report", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


class Table:
    """
    The rows and figures of a section, as its steps add them.

    A section's steps append `Row` objects to *rows* and raw values to
    *figures*, then return ``SectionResult(tuple(t.rows), t.figures, notes)``.
    *section* is the key of the section, which starts the id of each row.
    """

    def __init__(self, section: str) -> None:
        self.section = section
        self.rows: list[Row] = []
        self.figures: dict[str, Any] = {}

    def ratio(self, key: str, metric: str, target: float, c: Comparison) -> None:
        """
        Add the performance row of a ratio of ours to its floor that must not
        exceed *target*, with the id ``<section>.<key>_vs_floor``.
        """
        ok = ratio_ok(c.ratio, c.median_ratio, target)
        self.rows.append(
            Row(
                id=f"{self.section}.{key}_vs_floor",
                kind="performance",
                metric=metric,
                target=f"≤ {target:g}x",
                achieved=fmt_ratio(c, target),
                ok=ok,
                value=Quantity(c.ratio, "x"),
                goal=Goal("<=", target, "x"),
                details={
                    "median_pair_ratio": Quantity(c.median_ratio, "x"),
                    "ours": Quantity(c.ours_ns, "ns"),
                    "floor": Quantity(c.floor_ns, "ns"),
                },
            )
        )
        self.figures[key] = c.figures(target, "PASS" if ok else "MISS")

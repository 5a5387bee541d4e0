"""
The validation report behind ``usercontext report``.

The report runs scenarios on the machine at hand and prints what it measured,
section by section, as Markdown tables, beside the targets of the design and
the figures of the legacy system this library replaces. Nothing in it is
estimated. Each row has a kind (see `usercontext._report_verdict`): a
correctness row that fails is a FAIL and makes the exit code 1; a performance
row that misses its target is a MISS, which changes the exit code only with
``--strict``; an info row has no target.

A `Section` is a title, a list of steps (for the progress line) and a function
that returns a `SectionResult`: table rows plus the raw figures that ``--json``
writes. To add one (engines and quotas, database sessions, event dispatch,
HTTP), write a function ``(scale, progress) -> SectionResult`` that takes its
`Table` from ``progress.table(key)`` (so that an interrupted run still prints
the rows measured so far), calls ``progress(key, step)`` before each step,
times each operation against its floor with `compare` and adds the row with
`Table.ratio`, gives every other row an id and a kind, sizes its work from its
`Scale`, and append its `Section` to `SECTIONS`. A large section can live in a
``_report_<name>.py`` module of its own.

It uses the standard library and the public API of usercontext only (attrs for
the floors it compares against, anyio for the asynchronous scenarios), and
``import usercontext`` never imports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime as dt
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
import timeit
import traceback
import tracemalloc
import warnings

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.lowlevel
import attrs

import usercontext

from usercontext import ContextExecutor, UserContext, bind, current, current_or_none

from ._report_verdict import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    LEGACY,
    LEGACY_SUCCESS,
    Goal,
    Quantity,
    Row,
    counts,
    exit_code,
    success_rate_row,
    verdict,
)


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TextIO


__all__ = [
    "DEFAULT",
    "LEGACY_SUCCESS",
    "QUICK",
    "SECTIONS",  # noqa: F822  # built on first use, by __getattr__
    "Comparison",
    "Floor5",
    "Floor9",
    "FloorBind",
    "Goal",
    "Op",
    "Progress",
    "Quantity",
    "Row",
    "Scale",
    "Section",
    "SectionResult",
    "Table",
    "Timed",
    "check_json_path",
    "compare",
    "contexts_section",
    "fmt_ns",
    "fmt_ratio",
    "forget_interrupt",
    "in_empty_context",
    "in_thread",
    "paired_ratios",
    "percentile",
    "ratio_ok",
    "run_report",
    "success_rate_row",
    "time_op",
]

T = TypeVar("T")


# -- The frame ---------------------------------------------------------------


@attrs.frozen
class SectionResult:
    """
    What a section produced: its table *rows*, the raw *figures* for the JSON
    output, and *notes* printed under the table (how it was measured).
    """

    rows: tuple[Row, ...]
    figures: dict[str, Any]
    notes: tuple[str, ...] = ()


@attrs.frozen
class Scale:
    """
    How much work the scenarios do.

    Args:
        name: How the run is labelled in the report, such as ``"quick"``.
        repeats: Interleaved batches timed for each operation and its floor.
        batch_ns: The least duration of one timed batch, in nanoseconds.
        memory_contexts: Contexts kept alive for the memory measurement.
        users: Distinct users in the isolation scenario.
        tasks_per_user: Concurrent tasks per user in the isolation scenario.
        rounds: Rounds of checks each task runs in the isolation scenario.
        scenario_rounds: Runs of each variant of the legacy request scenario.
        distinct_keys: Distinct users sent through a quota to show none is kept.
    """

    name: str
    repeats: int
    batch_ns: int
    memory_contexts: int
    users: int
    tasks_per_user: int
    rounds: int
    scenario_rounds: int = 5
    distinct_keys: int = 100_000


DEFAULT = Scale(
    name="full",
    repeats=60,
    batch_ns=1_000_000,
    memory_contexts=100_000,
    users=24,
    tasks_per_user=4,
    rounds=8,
)
QUICK = Scale(
    name="quick (rough figures)",
    repeats=15,
    batch_ns=100_000,
    memory_contexts=2_000,
    users=3,
    tasks_per_user=2,
    rounds=2,
    scenario_rounds=1,
    distinct_keys=2_000,
)


class Progress:
    """
    Write one line per step to *stream*, such as ``[1/7] contexts: creation ...``.

    Args:
        total: The number of steps announced in all sections.
        stream: Where the lines go; the report sends them to standard error.
    """

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.done = 0
        self.current: Table | None = None
        self._stream = stream

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
        self.done += 1
        self._stream.write(f"[{self.done}/{self.total}] {section}: {step} ...\n")
        self._stream.flush()


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
    """

    key: str
    title: str
    steps: tuple[str, ...]
    run: Callable[[Scale, Progress], SectionResult]


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
            lines += _table(result.rows) if result.rows else ["No row was measured."]
            if result.notes:
                lines += ["", *(f"- {note}" for note in result.notes)]
        lines += ["", "## Verdict", ""]
        if stop is None:
            lines.append(verdict(self.rows, self.code, strict=self.strict))
        else:
            why = "Interrupted (Ctrl-C)" if stop.error is None else f"Crashed ({stop.error})"
            n = counts(self.rows)["correctness"]
            lines.append(
                f"**{why} in the {stop.section.title} section: no verdict.** The rows above are "
                f"those measured before it stopped (correctness so far: {n['pass']} PASS, "
                f"{n['fail']} FAIL). **Exit code {self.code}.**"
            )
        return "\n".join(lines) + "\n"

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
    scale: Scale = DEFAULT,
    json_path: str | None = None,
    sections: Sequence[Section] | None = None,
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
        scale: How much work to do: `DEFAULT`, or `QUICK` for a rough run.
        json_path: Where to write the raw figures, if anywhere.
        sections: The sections to run; `SECTIONS` by default.
        strict: Whether a performance row that misses its target fails the run.
        out: The stream for the report; standard output by default.
        err: The stream for progress lines; standard error by default.

    Returns:
        0 if every correctness row held (and, if *strict*, every performance
        row met its target), 1 if not, 2 if a section crashed, 130 if the run
        was interrupted.
    """
    sections = _sections() if sections is None else sections
    out = out or sys.stdout
    err = err or sys.stderr
    env = _environment()
    progress = Progress(sum(len(s.steps) for s in sections), err)

    started = time.perf_counter()
    results: list[tuple[Section, SectionResult]] = []
    stop: _Stop | None = None
    interrupt: KeyboardInterrupt | None = None
    for section in sections:
        try:
            results.append((section, section.run(scale, progress)))
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001, PERF203  # reported below, with its traceback
            if isinstance(e, KeyboardInterrupt):
                interrupt = e  # forgotten once its handling ended (see below)
                stop = _Stop(section, EXIT_INTERRUPTED)
                err.write(f"\nusercontext report: interrupted in the {section.title} section.\n")
            else:
                stop = _Stop(section, EXIT_ERROR, f"{type(e).__name__}: {e}")
                err.write(
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
    outcome = _Outcome(env, scale, wall_s, results, code, stop, strict)
    out.write(outcome.markdown())
    out.flush()
    if json_path is not None:
        Path(json_path).write_text(json.dumps(outcome.json(), indent=2) + "\n", encoding="utf-8")
    err.write(f"done in {wall_s:.1f} s, exit code {code}\n")
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
        except BaseException as e:  # noqa: BLE001  # raised again in the caller's thread
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


# -- Measuring ---------------------------------------------------------------

_UNROLL = 10  # copies of a cheap statement per loop turn, so the loop costs ~1/10 per op


class Timed(Protocol):
    """
    An operation that can be timed in batches: `Op`, or an async one.
    """

    @property
    def label(self) -> str:
        """
        What the operation is, for the JSON output.
        """
        ...

    def batch(self, n: int) -> int:
        """
        Run *n* operations; return the nanoseconds they took.
        """
        ...


@attrs.frozen
class Op:
    """
    An operation timed in batches.

    A batch of *n* (a multiple of 10) runs *stmt* *n* times with *namespace*
    as its globals, in a loop over *stmt* written out 10 times, as `timeit`
    does. With *fresh*, each batch first (untimed) calls ``fresh(n)`` for a
    list of *n* new argument tuples, bound in turn to *names* (such as
    ``"u, t, r"``), and *stmt* runs once per tuple.
    """

    label: str
    stmt: str
    namespace: dict[str, Any]
    fresh: Callable[[int], list[tuple[str, ...]]] | None = None
    names: str = ""

    def batch(self, n: int) -> int:
        """
        Run a batch of *n* operations with the collector off; return its nanoseconds.
        """
        if self.fresh is None:
            stmt = "\n".join([self.stmt] * _UNROLL)
            timer = timeit.Timer(stmt, globals=self.namespace, timer=time.perf_counter_ns)
            return int(timer.timeit(n // _UNROLL))
        self.namespace["_inputs"] = self.fresh(n)
        try:
            stmt = f"for {self.names} in _inputs:\n    {self.stmt}"
            timer = timeit.Timer(stmt, globals=self.namespace, timer=time.perf_counter_ns)
            return int(timer.timeit(1))
        finally:
            del self.namespace["_inputs"]


def _calibrate(op: Timed, batch_ns: int) -> int:
    """
    Return the number of operations per batch that takes at least *batch_ns*.
    """
    n = _UNROLL
    while True:
        elapsed = op.batch(n)
        if elapsed >= batch_ns:
            return n
        # Aim a little past the target, and grow at most 100x per try.
        n = max(n * 2, min(n * 100, int(n * 1.2 * batch_ns / max(elapsed, 1))))
        n -= n % _UNROLL


@attrs.frozen
class Comparison:
    """
    Per-operation times of *ours_op* and *floor_op*, one per batch, in nanoseconds.
    """

    ours_op: Timed
    floor_op: Timed
    ours: list[float]
    floor: list[float]
    ours_batch: int
    floor_batch: int

    @property
    def ours_ns(self) -> float:
        """
        Our best time per operation.
        """
        return min(self.ours)

    @property
    def floor_ns(self) -> float:
        """
        The floor's best time per operation.
        """
        return min(self.floor)

    @property
    def ratio(self) -> float:
        """
        Our best time over the floor's best time.
        """
        return self.ours_ns / self.floor_ns

    @property
    def pair_ratios(self) -> list[float]:
        """
        Our time over the floor's for each interleaved pair of batches.
        """
        return [o / f for o, f in zip(self.ours, self.floor, strict=True)]

    @property
    def median_ratio(self) -> float:
        """
        The median of `pair_ratios`.
        """
        return statistics.median(self.pair_ratios)

    def figures(self, target: float | None, status: str) -> dict[str, Any]:
        """
        Return every time measured, both ratios, *target* and *status*
        (PASS, MISS or INFO), for JSON.
        """
        return {
            "ours": _timing_figures(self.ours_op, self.ours, self.ours_batch),
            "floor": _timing_figures(self.floor_op, self.floor, self.floor_batch),
            "ratio": self.ratio,
            "median_pair_ratio": self.median_ratio,
            "pair_ratios": self.pair_ratios,
            "target_ratio": target,
            "status": status,
        }


def _timing_figures(op: Timed, per_op: list[float], batch: int) -> dict[str, Any]:
    return {
        "op": op.label,
        "per_op_ns": min(per_op),
        "median_ns": statistics.median(per_op),
        "max_ns": max(per_op),
        "ops_per_s": 1e9 / min(per_op),
        "batch_ops": batch,
        "per_op_ns_by_batch": per_op,
    }


def time_op(op: Timed, scale: Scale) -> tuple[list[float], int]:
    """
    Time *op* alone: return its time per operation in each of ``scale.repeats``
    batches, and the number of operations per batch.
    """
    n = _calibrate(op, scale.batch_ns)
    return [op.batch(n) / n for _ in range(scale.repeats)], n


def compare(ours: Timed, floor: Timed, scale: Scale) -> Comparison:
    """
    Time *ours* and *floor* in interleaved batches, alternating which goes first.
    """
    n_ours = _calibrate(ours, scale.batch_ns)
    n_floor = _calibrate(floor, scale.batch_ns)
    o: list[float] = []
    f: list[float] = []
    for i in range(scale.repeats):
        runs = [(ours, n_ours, o), (floor, n_floor, f)]
        if i % 2:
            runs.reverse()
        for op, n, into in runs:
            into.append(op.batch(n) / n)
    return Comparison(ours, floor, o, f, n_ours, n_floor)


def in_empty_context(fn: Callable[[], T]) -> T:
    """
    Run *fn* in an empty Context: nothing bound, no other variables set.
    """
    return contextvars.Context().run(fn)


def percentile(values: Sequence[float], p: float) -> float:
    """
    Return the *p*-th percentile of *values* (nearest rank).
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def paired_ratios(ours: Sequence[float], floor: Sequence[float]) -> dict[str, Any]:
    """
    Return the figures of runs of ours and of the floor interleaved in pairs:
    both lists, the ratio of their best, and the median of the pairs' ratios.
    """
    return {
        "ours_ms": list(ours),
        "floor_ms": list(floor),
        "ratio": min(ours) / min(floor),
        "median_pair_ratio": statistics.median(o / f for o, f in zip(ours, floor, strict=True)),
    }


def ratio_ok(best: float, median: float, target: float) -> bool:
    """
    Tell whether a "lower is better" ratio meets *target*: it misses only when
    it is clearly above it.

    Clearly means both estimates are above it: the ratio of the best batches,
    and the median of the ratios of the interleaved pairs of batches.
    """
    return not (best > target and median > target)


def fmt_ns(ns: float) -> str:
    """
    Format a time of *ns* nanoseconds in ns, µs or ms, with three significant digits.
    """
    if ns < 100:  # noqa: PLR2004
        return f"{ns:.1f} ns"
    if ns < 1_000:  # noqa: PLR2004
        return f"{ns:.0f} ns"
    if ns < 1_000_000:  # noqa: PLR2004
        return f"{ns / 1e3:.2f} µs"
    return f"{ns / 1e6:.2f} ms"


def fmt_ratio(c: Comparison, target: float | None) -> str:
    """
    Format *c* as both times and their ratio, noting when the two estimates of
    the ratio fall on either side of *target*.
    """
    text = f"{fmt_ns(c.ours_ns)} vs {fmt_ns(c.floor_ns)}: **{c.ratio:.2f}x**"
    if target is not None and (c.ratio > target) != (c.median_ratio > target):
        # The two estimates disagree about the target: say so beside the status.
        text += f" (median of pairs {c.median_ratio:.2f}x: within noise)"
    return text


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


# -- Contexts ----------------------------------------------------------------

LEGACY_NS_PER_CONTEXT = 150_000.0  # "~0.15ms" per context
LEGACY_CONTEXTS_PER_S = 4_000.0  # "4000+ contexts/sec"
LEGACY_BYTES_PER_CONTEXT = 300.0  # "~0.3KB (isolated)"
SPEEDUP_TARGET = 100.0  # DESIGN.md: at least 100x faster than the legacy figures
CREATION_TARGET = 2.5
CHILD_TARGET = 1.5
SIZE_TARGET = 1.1
BIND_TARGET = 1.2
CURRENT_TARGET = 3.0


@attrs.frozen
class Floor5:
    """
    The creation floor: a frozen attrs slots class with five str fields.
    """

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    connection_id: str


# The same fields as UserContext, in a plain frozen attrs slots class: the
# shape a context cannot be smaller than.
Floor9: type = attrs.make_class(
    "Floor9",
    [a.name for a in attrs.fields(UserContext)],
    frozen=True,
    slots=True,
    weakref_slot=False,
)

_floor_var: contextvars.ContextVar[object] = contextvars.ContextVar("usercontext_report_floor")


class FloorBind:
    """
    The `bind` floor: the least a class-based context manager can do.
    """

    __slots__ = ("_token", "_value")

    def __init__(self, value: object) -> None:
        self._value = value

    def __enter__(self) -> object:
        self._token = _floor_var.set(self._value)
        return self._value

    def __exit__(self, *exc_info: object) -> None:
        _floor_var.reset(self._token)


_unique = itertools.count()


def _fresh_ids(n: int) -> list[tuple[str, ...]]:
    """
    Return *n* triples of ids never used before in this process.
    """
    return [(f"u-{k:014d}", f"t-{k:014d}", f"r-{k:014d}") for k in itertools.islice(_unique, n)]


def _creation_ops() -> tuple[Op, Op]:
    ns = {
        "UserContext": UserContext,
        "Floor5": Floor5,
        "u": "user-42",
        "t": "thread-7",
        "r": "run-1",
        "rid": "0123456789abcdef0123456789abcdef",
        "c": "connection-3",
    }
    UserContext(user_id="user-42", thread_id="thread-7", run_id="run-1")  # validated once
    return (
        Op(
            "UserContext(user_id=u, thread_id=t, run_id=r)",
            "UserContext(user_id=u, thread_id=t, run_id=r)",
            ns,
        ),
        Op("Floor5(u, t, r, rid, c)", "Floor5(u, t, r, rid, c)", ns),
    )


def _unique_creation_ops() -> tuple[Op, Op]:
    ns = {"UserContext": UserContext, "Floor5": Floor5, "rid": "0" * 32, "c": "connection-3"}
    return (
        Op(
            "UserContext(user_id=u, thread_id=t, run_id=r), ids new to the process",
            "UserContext(user_id=u, thread_id=t, run_id=r)",
            ns,
            _fresh_ids,
            "u, t, r",
        ),
        Op(
            "Floor5(u, t, r, rid, c), ids new to the process",
            "Floor5(u, t, r, rid, c)",
            ns,
            _fresh_ids,
            "u, t, r",
        ),
    )


def _memory(n: int) -> dict[str, Any]:
    """
    Measure the bytes held per context, ids included, over *n* live contexts.
    """

    def build_ours(ids: list[tuple[str, ...]]) -> list[object]:
        return [UserContext(user_id=u, thread_id=t, run_id=r) for u, t, r in ids]

    def build_floor(ids: list[tuple[str, ...]]) -> list[object]:
        now, empty = time.time, UserContext(user_id="u-0", thread_id="t-0", run_id="r-0").metadata
        return [
            Floor9(u, t, r, os.urandom(16).hex(), None, None, 0, now(), empty) for u, t, r in ids
        ]

    def held(build: Callable[[list[tuple[str, ...]]], list[object]]) -> tuple[float, float]:
        # The ids are made before tracing starts (tracing their creation would
        # double the run time) and counted exactly with sys.getsizeof; all the
        # rest (the object, its time stamp, its request id, the id cache) is
        # traced. Only what is still held at the end counts.
        ids = _fresh_ids(n)
        id_bytes = sum(sys.getsizeof(i) for triple in ids for i in triple)
        enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = build(ids)
            traced = tracemalloc.get_traced_memory()[0] - before - sys.getsizeof(kept)
        finally:
            tracemalloc.stop()
            if enabled:
                gc.enable()
        return traced / n, id_bytes / n

    ours, id_bytes = held(build_ours)
    floor, floor_id_bytes = held(build_floor)
    sample = UserContext(user_id="u-00000000000000", thread_id="t-0", run_id="r-0")
    shallow_floor = Floor9(*(getattr(sample, a.name) for a in attrs.fields(UserContext)))
    return {
        "contexts": n,
        "id_lengths": {"user_id": 16, "thread_id": 16, "run_id": 16, "request_id": 32},
        "bytes_per_context": ours + id_bytes,
        "traced_bytes_per_context": ours,
        "id_bytes_per_context": id_bytes,
        "floor_bytes_per_instance": floor + floor_id_bytes,
        "floor_traced_bytes_per_instance": floor,
        "floor": "Floor9: frozen attrs slots class with UserContext's fields, same ids",
        "shallow_bytes": sys.getsizeof(sample),
        "shallow_floor_bytes": sys.getsizeof(shallow_floor),
        "shallow_ratio": sys.getsizeof(sample) / sys.getsizeof(shallow_floor),
        "legacy_bytes_per_context": LEGACY_BYTES_PER_CONTEXT,
    }


def _bind_ops() -> tuple[Op, Op]:
    ctx = UserContext(user_id="user-42", thread_id="thread-7", run_id="run-1")
    ns = {"bind": bind, "FloorBind": FloorBind, "ctx": ctx}
    return (
        Op("with bind(ctx): pass", "with bind(ctx): pass", ns),
        Op("with FloorBind(ctx): pass", "with FloorBind(ctx): pass", ns),
    )


def _current_ops() -> tuple[Op, Op]:
    ns = {"current": current, "get": _floor_var.get}
    return (Op("current()", "current()", ns), Op("ContextVar.get()", "get()", ns))


def _time_current(scale: Scale) -> Comparison:
    ours, floor = _current_ops()
    ctx = UserContext(user_id="user-42", thread_id="thread-7", run_id="run-1")

    def run() -> Comparison:
        with bind(ctx), FloorBind(ctx):
            return compare(ours, floor, scale)

    return in_empty_context(run)


@attrs.define
class _Tally:
    """
    What the isolation scenario observed.
    """

    checks: int = 0
    cross_user: int = 0
    missing: int = 0
    stale: int = 0
    task_checks: int = 0
    thread_checks: int = 0
    executor_checks: int = 0
    after_checks: int = 0

    def add(self, observed: list[str | None], expected: str | None) -> int:
        """
        Count the user ids in *observed*, seen where *expected* was bound.
        """
        for user_id in observed:
            if expected is None:
                self.stale += user_id is not None
            elif user_id is None:
                self.missing += 1
            elif user_id != expected:
                self.cross_user += 1
        self.checks += len(observed)
        return len(observed)


def _observe(times: int) -> list[str | None]:
    """
    Look at the current user *times* times, yielding the GIL in between.
    """
    seen: list[str | None] = []
    for _ in range(times):
        ctx = current_or_none()
        seen.append(None if ctx is None else ctx.user_id)
        time.sleep(0)
    return seen


def _isolation(scale: Scale) -> _Tally:
    """
    Check, from many tasks of many users at once, that each sees only its own user.

    Every task binds a context of its user, starts two child tasks in a task
    group of its own, and each child checks the current user in the task, in a
    worker thread (`usercontext.to_thread`) and in a pool thread shared by all
    users (`usercontext.ContextExecutor`), yielding between checks. Afterwards
    the pool's threads and the caller must see no context at all.
    """
    tally = _Tally()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    executor = ContextExecutor(pool)

    async def leaf(user_id: str) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(scale.rounds):
            tally.task_checks += tally.add(_observe(1), user_id)
            await anyio.lowlevel.checkpoint()
            tally.task_checks += tally.add(_observe(1), user_id)
            seen = await usercontext.to_thread(_observe, 3)
            tally.thread_checks += tally.add(seen, user_id)
            seen = await loop.run_in_executor(executor, _observe, 3)
            tally.executor_checks += tally.add(seen, user_id)

    async def user_task(user: int, task: int) -> None:
        ctx = UserContext(
            user_id=f"iso-user-{user}", thread_id=f"iso-thread-{task}", run_id=f"iso-run-{task}"
        )
        async with bind(ctx), anyio.create_task_group() as tg:
            tg.start_soon(leaf, ctx.user_id)
            tg.start_soon(leaf, ctx.user_id)

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            for task in range(scale.tasks_per_user):
                for user in range(scale.users):
                    tg.start_soon(user_task, user, task)
        # Nothing may stay behind in the caller or in the pool's reused threads.
        loop = asyncio.get_running_loop()
        for _ in range(8):
            tally.after_checks += tally.add(_observe(1), None)
            seen = await loop.run_in_executor(executor, _observe, 1)
            tally.after_checks += tally.add(seen, None)

    try:
        in_empty_context(lambda: anyio.run(scenario, backend="asyncio"))
    finally:
        executor.shutdown()
    return tally


def _legacy_rows(out: Table, creation: Comparison) -> None:
    best, median = creation.ours_ns, statistics.median(creation.ours)
    figures: dict[str, Any] = {
        "ns_per_context": LEGACY_NS_PER_CONTEXT,
        "contexts_per_s": LEGACY_CONTEXTS_PER_S,
        "bytes_per_context": LEGACY_BYTES_PER_CONTEXT,
        "target_factor": SPEEDUP_TARGET,
        "speedup": LEGACY_NS_PER_CONTEXT / best,
        "median_speedup": LEGACY_NS_PER_CONTEXT / median,
        "rate_factor": 1e9 / best / LEGACY_CONTEXTS_PER_S,
        "median_rate_factor": 1e9 / median / LEGACY_CONTEXTS_PER_S,
    }
    # "Higher is better" here: miss only when both estimates fall short.
    ok = {}
    for kind in ("speedup", "rate_factor"):
        ok[kind] = not (
            figures[kind] < SPEEDUP_TARGET and figures[f"median_{kind}"] < SPEEDUP_TARGET
        )
        figures[f"{kind}_status"] = "PASS" if ok[kind] else "MISS"
    out.figures["legacy"] = figures
    out.rows += [
        Row(
            id="contexts.creation_speedup_vs_legacy",
            kind="performance",
            metric="Time per context vs legacy (0.15 ms)",
            target=f"≥ {SPEEDUP_TARGET:g}x faster",
            achieved=f"{fmt_ns(best)}: **{figures['speedup']:.0f}x** faster",
            ok=ok["speedup"],
            value=Quantity(figures["speedup"], "x"),
            goal=Goal(">=", SPEEDUP_TARGET, "x"),
            details={
                "per_context": Quantity(best, "ns"),
                "legacy_per_context": Quantity(LEGACY_NS_PER_CONTEXT, "ns"),
                "median_speedup": Quantity(figures["median_speedup"], "x"),
            },
        ),
        Row(
            id="contexts.creation_rate_vs_legacy",
            kind="performance",
            metric="Creation rate vs legacy (4,000 contexts/s)",
            target=f"≥ {SPEEDUP_TARGET * LEGACY_CONTEXTS_PER_S:,.0f}/s ({SPEEDUP_TARGET:g}x)",
            achieved=f"{1e9 / best:,.0f}/s: **{figures['rate_factor']:.0f}x**",
            ok=ok["rate_factor"],
            value=Quantity(1e9 / best, "contexts/s"),
            goal=Goal(">=", SPEEDUP_TARGET * LEGACY_CONTEXTS_PER_S, "contexts/s"),
            details={
                "factor": Quantity(figures["rate_factor"], "x"),
                "legacy_rate": Quantity(LEGACY_CONTEXTS_PER_S, "contexts/s"),
            },
        ),
    ]


def _memory_rows(out: Table, n: int) -> None:
    mem = _memory(n)
    small = mem["shallow_ratio"] <= SIZE_TARGET
    mem["shallow_status"] = "PASS" if small else "MISS"
    out.figures["memory"] = mem
    out.rows += [
        Row(
            id="contexts.memory_per_context",
            kind="info",
            metric=f"Memory per context, ids included, {n:,} live with unique ids (tracemalloc)",
            target="none (info); legacy ~0.3 KB",
            achieved=(
                f"{mem['bytes_per_context']:.0f} B (floor "
                f"{mem['floor_bytes_per_instance']:.0f} B); "
                f"{mem['bytes_per_context'] / LEGACY_BYTES_PER_CONTEXT:.2f}x legacy"
            ),
            value=Quantity(mem["bytes_per_context"], "B"),
            details={
                "floor": Quantity(mem["floor_bytes_per_instance"], "B"),
                "legacy": Quantity(LEGACY_BYTES_PER_CONTEXT, "B"),
            },
        ),
        Row(
            id="contexts.shallow_size_vs_floor",
            kind="performance",
            metric="Shallow size (`sys.getsizeof`) vs same-shape attrs slots instance",
            target=f"≤ {SIZE_TARGET:g}x",
            achieved=(
                f"{mem['shallow_bytes']} B vs {mem['shallow_floor_bytes']} B: "
                f"**{mem['shallow_ratio']:.2f}x**"
            ),
            ok=small,
            value=Quantity(mem["shallow_ratio"], "x"),
            goal=Goal("<=", SIZE_TARGET, "x"),
            details={
                "ours": Quantity(mem["shallow_bytes"], "B"),
                "floor": Quantity(mem["shallow_floor_bytes"], "B"),
            },
        ),
    ]


def _isolation_rows(out: Table, scale: Scale) -> None:
    tally = _isolation(scale)
    tasks = scale.users * scale.tasks_per_user * 2
    out.figures["isolation"] = {
        **attrs.asdict(tally),
        "users": scale.users,
        "tasks": scale.users * scale.tasks_per_user,
        "child_tasks": tasks,
        "rounds": scale.rounds,
    }
    inside = tally.checks - tally.after_checks
    out.rows += [
        Row(
            id="contexts.isolation_cross_user",
            kind="correctness",
            metric="Isolation: cross-user observations (task groups, to_thread, ContextExecutor)",
            target="0, in > 0 checks",
            achieved=(
                f"{tally.cross_user} in {inside:,} checks by {tasks:,} tasks of {scale.users} users"
            ),
            ok=tally.cross_user == 0 and inside > 0,
            value=Quantity(tally.cross_user, "observations"),
            goal=Goal("==", 0, "observations"),
            details={"checks": Quantity(inside, "checks"), "tasks": Quantity(tasks, "tasks")},
        ),
        Row(
            id="contexts.isolation_missing_or_left",
            kind="correctness",
            metric="Isolation: context missing inside, or left behind after",
            target="0, in > 0 checks",
            achieved=(
                f"{tally.missing} missing in {inside:,} checks, {tally.stale} left behind in "
                f"{tally.after_checks} checks after"
            ),
            ok=tally.missing == tally.stale == 0 and tally.after_checks > 0,
            value=Quantity(tally.missing + tally.stale, "observations"),
            goal=Goal("==", 0, "observations"),
            details={
                "missing": Quantity(tally.missing, "observations"),
                "left_behind": Quantity(tally.stale, "observations"),
                "checks_after": Quantity(tally.after_checks, "checks"),
            },
        ),
    ]


def contexts_section(scale: Scale, progress: Progress) -> SectionResult:
    """
    Measure creating, deriving, binding and reading contexts, their memory, and
    their isolation under concurrency.
    """
    out = progress.table("contexts")

    progress("contexts", "creation")
    ours, floor = _creation_ops()
    creation = in_empty_context(lambda: compare(ours, floor, scale))
    out.ratio(
        "creation",
        "Creation, generated request id, vs floor (frozen attrs class, 5 str fields)",
        CREATION_TARGET,
        creation,
    )
    _legacy_rows(out, creation)

    progress("contexts", "creation, unique ids")
    unique = in_empty_context(lambda: compare(*_unique_creation_ops(), scale))
    out.rows.append(
        Row(
            id="contexts.creation_unique_ids_vs_floor",
            kind="info",
            metric="Creation, every id new (validated, not cached), vs floor",
            target="none (info)",
            achieved=fmt_ratio(unique, None),
            value=Quantity(unique.ratio, "x"),
            details={
                "ours": Quantity(unique.ours_ns, "ns"),
                "floor": Quantity(unique.floor_ns, "ns"),
            },
        )
    )
    out.figures["creation_unique_ids"] = unique.figures(None, "INFO")

    progress("contexts", "child")
    parent = UserContext(user_id="user-42", thread_id="thread-7", run_id="run-1")
    child = Op("ctx.child()", "ctx.child()", {"ctx": parent})
    out.ratio(
        "child",
        "`ctx.child()` vs creation",
        CHILD_TARGET,
        in_empty_context(lambda: compare(child, ours, scale)),
    )

    progress("contexts", "memory")
    _memory_rows(out, scale.memory_contexts)

    progress("contexts", "bind")
    out.ratio(
        "bind",
        "`with bind(ctx)` vs class-based `ContextVar` set/reset",
        BIND_TARGET,
        in_empty_context(lambda: compare(*_bind_ops(), scale)),
    )

    progress("contexts", "current")
    out.ratio("current", "`current()` vs `ContextVar.get()`", CURRENT_TARGET, _time_current(scale))
    loop_ns, _ = time_op(
        Op("pass", "pass", {}), attrs.evolve(scale, repeats=min(scale.repeats, 20))
    )
    out.figures["loop_overhead_ns_per_op"] = loop = min(loop_ns)

    progress("contexts", "isolation")
    _isolation_rows(out, scale)

    notes = (
        (
            f"Times are per operation: the best of {scale.repeats} batches of at least "
            f"{scale.batch_ns / 1e6:g} ms each, ours and its floor interleaved, the garbage "
            f"collector off while timing. They include the timing loop (~{loop:.1f} ns per "
            "operation), for ours and the floor alike."
        ),
        (
            "A ratio misses its target only when it is clearly above it: when both the ratio of "
            "the best batches and the median of the ratios of interleaved pairs are above it."
        ),
        (
            "Floors: a frozen attrs slots class with 5 str fields created positionally; for "
            "`bind`, a minimal class whose `__enter__`/`__exit__` call `ContextVar.set`/`reset`; "
            "for `current()`, a bound `ContextVar.get`; for memory, a frozen attrs slots class "
            "with the same fields and ids as `UserContext`."
        ),
        (
            "Creation with ids seen before skips their validation (the library caches ids that "
            "passed); the row with new ids shows the cost without that cache."
        ),
        (
            "Legacy figures are those of the legacy report (0.15 ms and 4,000 contexts/s, "
            "~0.3 KB per context for its per-request contexts); they were not measured here."
        ),
    )
    return SectionResult(tuple(out.rows), out.figures, notes)


def _sections() -> tuple[Section, ...]:
    """
    Return the sections of the report, in order.

    The section modules build on this one, so they are imported here, when
    first needed, rather than at the top: importing any of them first works.
    """
    from ._report_db import STEPS as DB_STEPS
    from ._report_db import db_section
    from ._report_engines import STEPS as ENGINE_STEPS
    from ._report_engines import engines_section
    from ._report_events import STEPS as EVENT_STEPS
    from ._report_events import events_section
    from ._report_http import STEPS as HTTP_STEPS
    from ._report_http import http_section

    return (
        Section(
            "contexts",
            "Contexts",
            (
                "creation",
                "creation, unique ids",
                "child",
                "memory",
                "bind",
                "current",
                "isolation",
            ),
            contexts_section,
        ),
        Section("engines", "Engines and quotas", ENGINE_STEPS, engines_section),
        Section("db", "Database sessions", DB_STEPS, db_section),
        Section("events", "Event dispatch", EVENT_STEPS, events_section),
        Section("http", "Concurrent HTTP requests", HTTP_STEPS, http_section),
    )


def __getattr__(name: str) -> tuple[Section, ...]:
    # SECTIONS, the sections of the report in order, is built on first use.
    if name == "SECTIONS":
        return _sections()
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)

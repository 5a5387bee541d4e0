"""
The "Contexts" section of ``usercontext report``.

It times creating, deriving, binding and reading contexts against their floors
(`usercontext._report.floors`), measures their memory, and checks their
isolation under concurrency: many tasks of many users at once, across task
groups, worker threads and a shared pool of threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import os
import statistics
import sys
import time
import tracemalloc

from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import attrs

import usercontext

from usercontext import ContextExecutor, UserContext, bind, current, current_or_none

from .floors import Floor5, Floor9, FloorBind, floor_var
from .frame import SectionResult
from .rows import Goal, Quantity, Row
from .timing import Op, compare, fmt_ns, fmt_ratio, in_empty_context, time_op


if TYPE_CHECKING:
    from collections.abc import Callable

    from .frame import Progress, Table
    from .scale import Scale
    from .timing import Comparison


__all__ = ["STEPS", "contexts_section"]

LEGACY_NS_PER_CONTEXT = 150_000.0  # "~0.15ms" per context
LEGACY_CONTEXTS_PER_S = 4_000.0  # "4000+ contexts/sec"
LEGACY_BYTES_PER_CONTEXT = 300.0  # "~0.3KB (isolated)"
SPEEDUP_TARGET = 100.0  # DESIGN.md: at least 100x faster than the legacy figures
CREATION_TARGET = 2.5
CHILD_TARGET = 1.5
SIZE_TARGET = 1.1
BIND_TARGET = 1.2
CURRENT_TARGET = 3.0

STEPS = (
    "creation",
    "creation, unique ids",
    "child",
    "memory",
    "bind",
    "current",
    "isolation",
)


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
    ns = {"current": current, "get": floor_var.get}
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
    ok: dict[str, bool] = {}
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

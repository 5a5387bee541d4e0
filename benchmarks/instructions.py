"""
Instructions per operation, ours against its floor, counted by valgrind's
callgrind: figures that hold on a noisy, shared machine where timings do not.

Each measured side (ours or the floor of an operation) is a small script run
by this file's worker (``--worker NAME SIDE N``): it sets up, runs a warm-up
batch, then *N* batches of the operation, and exits. The driver runs it under
``valgrind --tool=callgrind`` twice, with two values of *N*, and divides the
difference of the two totals by the difference in operations: interpreter
start-up, imports, set-up and warm-up cost the same in both runs and cancel
out. Fresh-interpreter operations (``import``) are counted whole instead.

Run it from the repository root::

    python benchmarks/instructions.py                # every operation, a table
    python benchmarks/instructions.py --only engine  # one (repeat --only for more)
    python benchmarks/instructions.py --json out.json --check

With ``--check`` it exits with 1 when a ratio passes its target by more than
the margin (``--margin``, 10% by default; see ``benchmarks/README.md``).
Without valgrind it says so and exits with 0, unless ``CI=true``, where the
figures are required and it exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    Batch = Callable[[], Awaitable[None]]
    Counter = Callable[[list[str], bool], list[int]]


MARGIN = 0.10

# -- The operations --------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """
    One measured operation: what ours and its floor run, and the target.

    Each worker batch runs *batch* operations; the driver runs *n1* and *n2*
    batches (after one warm-up batch) and takes the difference. A *fresh*
    operation is a fresh interpreter running *ours* or *floor* as ``-c`` code.
    A *target* of `None` makes the row information only. A row that misses
    its target today carries *guard*, the figure it measured, which the CI
    guard holds it to instead (so it cannot regress while the target is open);
    the row still shows MISS against the target.
    """

    name: str
    title: str
    unit: str
    ours: str
    floor: str
    target: float | None
    batch: int = 200
    n1: int = 1
    n2: int = 3
    fresh: bool = False
    needs: str | None = None  # a module the row needs (skipped without it)
    guard: float | None = None

    @property
    def sides(self) -> tuple[str, str]:
        """
        The worker's names of ours and the floor.
        """
        return (_OURS_SIDE.get(self.name, "ours"), "floor")


# The rows whose "ours" is a hand-written reference, not the library.
_OURS_SIDE = {"http-lean": "lean", "registry-sync-bare": "bare", "registry-sync-lean": "lean"}


OPERATIONS = (
    Operation(
        "http",
        "HTTP scenario, in-process ASGI: report's Service vs FloorService",
        "request",
        "Service",
        "FloorService",
        1.6,
        batch=1_000,
        n1=0,
        n2=1,
    ),
    Operation(
        "http-lean",
        "HTTP scenario: the lean hand-written service (the physical limit) vs FloorService",
        "request",
        "LeanService",
        "FloorService",
        None,
        batch=1_000,
        n1=0,
        n2=1,
    ),
    Operation(
        "engine",
        "uncontended `async with factory.engine(ctx)` vs a semaphore + engine by hand",
        "engine",
        "EngineFactory",
        "asyncio.Semaphore",
        2.5,
    ),
    Operation(
        "emit",
        "`await emitter.emit(...)` to an in-memory sink vs asyncio.Queue(64) of dicts",
        "event",
        "EmitterHub",
        "asyncio.Queue(64)",
        1.8,
    ),
    Operation(
        "emit-wakeup",
        "one event per wake-up, emit to sink vs the same round trip through a queue",
        "event",
        "EmitterHub",
        "asyncio.Queue",
        1.1,
        batch=100,
    ),
    Operation(
        "registry-sync",
        "sync scope, one generator resource, vs svcs",
        "scope",
        "Registry",
        "svcs.Container",
        0.45,
        needs="svcs",
        # Missed: ours measured 0.55x svcs when this guard was set (0.56x
        # and 0.60x before); the bare hand-written scope (a row below)
        # measures 0.39x, and the lean one, with every guarantee the scope
        # documents, 0.53x: the target lies below what they allow (see
        # benchmarks/README.md).
        guard=0.55,
    ),
    Operation(
        "registry-sync-bare",
        "sync scope: the bare hand-written scope (the physical limit) vs svcs",
        "scope",
        "FloorScope",
        "svcs.Container",
        None,
        needs="svcs",
    ),
    Operation(
        "registry-sync-lean",
        "sync scope: the lean hand-written scope with every guarantee (the physical limit) vs svcs",
        "scope",
        "LeanScope",
        "svcs.Container",
        None,
        needs="svcs",
    ),
    Operation(
        "registry-async",
        "async scope, one async generator resource, vs a hand-rolled scope",
        "scope",
        "Registry",
        "FloorScope",
        3.0,
    ),
    Operation(
        "import",
        "`import usercontext` vs `import attrs, anyio`, fresh interpreters",
        "interpreter",
        "import usercontext",
        "import attrs, anyio",
        1.3,
        fresh=True,
    ),
)
BY_NAME = {op.name: op for op in OPERATIONS}


# -- The worker: both sides of one operation, in a process of its own ----------------
#
# Each side is an async context manager that sets the side up (a service and
# its lifespan, a hub) and yields an async function running one batch.


@contextlib.asynccontextmanager
async def _http(side: str, batch: int) -> AsyncIterator[Batch]:
    from usercontext._report import http, service

    if side == "lean":
        from usercontext._report.lean import LeanService

        svc: Any = LeanService()
    else:
        svc = service.Service() if side == "ours" else service.FloorService()
    per_user = batch // service.USERS

    async def one_round() -> None:
        # One round of the report's scenario: *per_user* requests of every user,
        # released at once, then delivery and idle eviction.
        svc.connect()
        run = await http._in_process_round(svc.asgi, per_user)
        await svc.settle()
        if run.failed or run.cross_user:
            sys.exit(f"the {side} service failed {run.failed} and crossed {run.cross_user}")

    async with http._lifespan_of(svc.asgi):
        yield one_round


@contextlib.asynccontextmanager
async def _engine(side: str, batch: int) -> AsyncIterator[Batch]:
    import usercontext as uc

    closed: list[object] = []
    ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    factory = uc.EngineFactory(lambda _ctx: object(), close=closed.append, per_user=2)
    sems = {"u-42": asyncio.Semaphore(2)}

    async def ours() -> None:
        for _ in range(batch):
            async with factory.engine(ctx):
                pass
        closed.clear()

    async def floor() -> None:
        for _ in range(batch):
            async with sems["u-42"]:
                engine = object()
                closed.append(engine)
        closed.clear()

    yield ours if side == "ours" else floor


@contextlib.asynccontextmanager
async def _emit(side: str, batch: int) -> AsyncIterator[Batch]:
    import usercontext as uc

    from usercontext._report.floors import CTX, DATA, TYPE, CountingSink

    async def floor() -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(64)
        received: list[dict[str, Any]] = []

        async def consume() -> None:
            for _ in range(batch):
                received.append(await queue.get())  # noqa: PERF401  # the floor's consumer

        consumer = asyncio.ensure_future(consume())
        for _ in range(batch):
            await queue.put({"type": TYPE, "data": dict(DATA)})
        await consumer

    if side == "floor":
        yield floor
        return
    async with uc.EmitterHub(maxsize=1_000, overflow="block", timeout=None) as hub:
        sink = CountingSink()
        hub.attach(CTX.user_id, sink)
        emitter = hub.emitter(CTX)

        async def ours() -> None:
            target = sink.count + batch
            for _ in range(batch):
                await emitter.emit(TYPE, DATA)
            await sink.wait_for(target)

        yield ours


@contextlib.asynccontextmanager
async def _emit_wakeup(side: str, batch: int) -> AsyncIterator[Batch]:
    import usercontext as uc

    from usercontext._report.floors import CTX, DATA, TYPE

    waiting: list[asyncio.Future[None]] = []

    def arrived(_events: object) -> None:
        waiting.pop().set_result(None)

    if side == "floor":
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def consume() -> None:
            while True:
                arrived([await queue.get()])

        async def floor() -> None:
            loop = asyncio.get_running_loop()
            for _ in range(batch):
                done = loop.create_future()
                waiting.append(done)
                await queue.put({"type": TYPE, "data": dict(DATA)})
                await done

        consumer = asyncio.ensure_future(consume())
        yield floor
        consumer.cancel()
        return
    # The HTTP pattern: an event is emitted, and the sink gets it on the
    # delivery's next wake-up, before the next event is emitted.
    async with uc.EmitterHub() as hub:
        hub.attach(CTX.user_id, uc.CallbackSink(arrived))
        emitter = hub.emitter(CTX)

        async def ours() -> None:
            loop = asyncio.get_running_loop()
            for _ in range(batch):
                done = loop.create_future()
                waiting.append(done)
                await emitter.emit(TYPE, DATA)
                await done

        yield ours


class _Session:
    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


def _session(*_args: object) -> Iterator[_Session]:
    s = _Session()
    yield s
    s.closed = True


async def _asession(_ctx: object) -> AsyncIterator[_Session]:
    s = _Session()
    yield s
    s.closed = True


@contextlib.asynccontextmanager
async def _registry_sync(side: str, batch: int) -> AsyncIterator[Batch]:
    import usercontext as uc

    ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    if side == "bare":
        from usercontext._report.floors import FloorScope

        providers = {_Session: _session}

        async def bare() -> None:
            for _ in range(batch):
                with FloorScope(providers, ctx) as scope:
                    scope.get(_Session)

        yield bare
        return
    if side == "ours":
        registry = uc.Registry()
        registry.register(_Session, _session)

        async def ours() -> None:
            for _ in range(batch):
                with registry.scope(ctx) as scope:
                    scope.get(_Session)

        yield ours
        return
    import svcs

    rivals = svcs.Registry()
    rivals.register_factory(_Session, _session)

    async def floor() -> None:
        for _ in range(batch):
            container = svcs.Container(rivals)
            container.get(_Session)
            container.close()

    yield floor


@contextlib.asynccontextmanager
async def _registry_sync_lean(side: str, batch: int) -> AsyncIterator[Batch]:
    if side != "lean":
        async with _registry_sync(side, batch) as floor:  # svcs, as the row above
            yield floor
        return
    import usercontext as uc

    from usercontext._report.lean_scope import LeanCounts, LeanScope

    ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    providers = {_Session: (_session, [0, 0])}
    counts = LeanCounts()

    async def lean() -> None:
        for _ in range(batch):
            with LeanScope(providers, ctx, counts) as scope:
                scope.get(_Session)

    yield lean


@contextlib.asynccontextmanager
async def _registry_async(side: str, batch: int) -> AsyncIterator[Batch]:
    import usercontext as uc

    from usercontext._report.floors import FloorScope

    ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    registry = uc.Registry()
    registry.register(_Session, _asession)
    providers = {_Session: _asession}

    async def ours() -> None:
        for _ in range(batch):
            async with registry.scope(ctx) as scope:
                await scope.aget(_Session)

    async def floor() -> None:
        for _ in range(batch):
            async with FloorScope(providers, ctx) as scope:
                await scope.aget(_Session)

    yield ours if side == "ours" else floor


_SIDES = {
    "http": _http,
    "http-lean": _http,
    "engine": _engine,
    "emit": _emit,
    "emit-wakeup": _emit_wakeup,
    "registry-sync": _registry_sync,
    "registry-sync-bare": _registry_sync,
    "registry-sync-lean": _registry_sync_lean,
    "registry-async": _registry_async,
}


def mark() -> None:
    """
    End a part of the count: callgrind runs with ``--dump-before=getppid``,
    which writes the counts so far to a file of their own at each call.
    """
    os.getppid()


def worker(op: Operation) -> None:
    """
    Run both sides of *op* in this process: set each up, run a warm-up batch
    of each, then for each side *n1* batches and *n2* batches, each run
    between two marks.
    """
    name = op.name

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            batches = [
                await stack.enter_async_context(_SIDES[name](side, op.batch)) for side in op.sides
            ]
            for batch in batches:
                await batch()
            # Every part ends with a full collection: the garbage a side
            # leaves (cycles included) is charged to that side, and no part
            # starts with a collection that another side's objects brought on.
            for batch in batches:
                for n in (op.n1, op.n2):
                    gc.collect()
                    mark()
                    for _ in range(n):
                        await batch()
            gc.collect()
            mark()

    asyncio.run(main())


# -- The driver ------------------------------------------------------------------------

_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def parse_callgrind(text: bytes) -> int:
    """
    Return the instruction count (``Ir``) of a callgrind output file's text.
    """
    found = _TOTALS.search(text)
    if found is None:
        msg = "no 'summary:' or 'totals:' line in the callgrind output"
        raise ValueError(msg)
    return int(found.group(1))


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # The same hashes in every run, so that dicts and sets do the same work.
    env["PYTHONHASHSEED"] = "0"
    env.pop("COVERAGE_PROCESS_START", None)
    # A service imports from bytecode caches (pip writes them at install, and
    # the first import of an editable install does): the import row's warm-up
    # run writes them, which a machine set not to write bytecode would stop,
    # and then every import would count a compile of our source.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


_PART = re.compile(rb"^part:\s*(\d+)", re.MULTILINE)


def count(argv: list[str], marks: bool, *, valgrind: str = "valgrind") -> list[int]:  # noqa: FBT001  # the counter's signature
    """
    Run *argv* under callgrind and return the instructions it executed: one
    total, or with *marks* one per part between the worker's marks.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"]
        if marks:
            cmd.append("--dump-before=getppid")
        result = subprocess.run(  # noqa: S603  # our own interpreter and scripts
            [*cmd, *argv], capture_output=True, env=_environment(), check=False
        )
        if result.returncode != 0:
            msg = f"{' '.join(argv)} failed under callgrind:\n{result.stderr.decode()[-3000:]}"
            raise RuntimeError(msg)
        parts = {}
        for path in Path(tmp).glob("callgrind.out*"):
            text = path.read_bytes()
            found = _PART.search(text)
            parts[int(found.group(1)) if found else 1] = parse_callgrind(text)
        return [parts[k] for k in sorted(parts)]


def _argv(op: Operation, side: str) -> list[str]:
    if op.fresh:
        return [sys.executable, "-c", op.ours if side == "ours" else op.floor]
    sizes = [str(n) for n in (op.batch, op.n1, op.n2)]
    return [sys.executable, str(Path(__file__).resolve()), "--worker", op.name, *sizes]


def per_op(op: Operation, parts: list[int]) -> tuple[float, float]:
    """
    Return the instructions of one operation of ours and of the floor, from
    the *parts* of a worker's run: set-up and warm-up, then for each side the
    *n1* batches and the *n2* batches, then the exit.
    """
    if len(parts) != 2 + 2 * len(op.sides):
        msg = f"{op.name}: expected {2 + 2 * len(op.sides)} parts, got {len(parts)}"
        raise ValueError(msg)
    ops = (op.n2 - op.n1) * op.batch
    ours_low, ours_high, floor_low, floor_high = parts[1:5]
    return (ours_high - ours_low) / ops, (floor_high - floor_low) / ops


@dataclass
class Result:
    """
    One row of the table: ours, the floor, their ratio, and its verdict.
    """

    name: str
    title: str
    unit: str
    ours: float
    floor: float
    target: float | None
    margin: float
    seconds: float
    guard: float | None = None  # see `Operation`

    @property
    def ratio(self) -> float:
        """
        Ours over the floor.
        """
        return self.ours / self.floor

    @property
    def status(self) -> str:
        """
        ``PASS`` at or under the target, ``MISS`` above it, ``INFO`` without one.
        """
        if self.target is None:
            return "INFO"
        return "PASS" if self.ratio <= self.target else "MISS"

    @property
    def fails_guard(self) -> bool:
        """
        Whether the ratio passes its target by more than the margin.
        """
        bound = self.guard if self.guard is not None else self.target
        return bound is not None and self.ratio > bound * (1 + self.margin)

    def as_dict(self) -> dict[str, Any]:
        """
        The row for ``--json``.
        """
        return {
            **asdict(self),
            "ratio": self.ratio,
            "status": self.status,
            "fails_guard": self.fails_guard,
        }


def measure(op: Operation, margin: float = MARGIN, counter: Counter = count) -> Result:
    """
    Count ours and the floor of *op*; return the row.
    """
    started = time.monotonic()
    if op.fresh:
        for side in op.sides:
            # Write the bytecode caches first, so that no counted run compiles.
            subprocess.run(_argv(op, side), env=_environment(), check=True)  # noqa: S603  # our interpreter
        (ours,) = counter(_argv(op, "ours"), False)  # noqa: FBT003  # the counter's signature
        (floor,) = counter(_argv(op, "floor"), False)  # noqa: FBT003
        per = (float(ours), float(floor))
    else:
        per = per_op(op, counter(_argv(op, "ours"), True))  # noqa: FBT003
    return Result(
        op.name, op.title, op.unit, *per, op.target, margin, time.monotonic() - started, op.guard
    )


def _k(n: float) -> str:
    return f"{n / 1e3:,.1f} k" if n < 1e7 else f"{n / 1e6:,.1f} M"


def table(results: list[Result]) -> str:
    """
    Format *results* as a Markdown table.
    """
    lines = [
        "| operation | unit | ours | floor | ratio | target | status | guard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        target = "none" if r.target is None else f"<= {r.target:g}x"
        guard = "FAIL" if r.fails_guard else "ok"
        if r.guard is not None:
            guard += f" (held to today's {r.guard:g}x)"
        lines.append(
            f"| {r.name} | {r.unit} | {_k(r.ours)} | {_k(r.floor)} | {r.ratio:.2f}x | {target} "
            f"| {r.status} | {guard} |"
        )
    return "\n".join(lines)


def _selected(only: list[str] | None) -> list[Operation]:
    if not only:
        return list(OPERATIONS)
    unknown = [name for name in only if name not in BY_NAME]
    if unknown:
        names = ", ".join(BY_NAME)
        msg = f"unknown operation(s) {', '.join(unknown)}; choose from {names}."
        raise SystemExit(msg)
    return [BY_NAME[name] for name in only]


def _available(op: Operation) -> bool:
    if op.needs is None:
        return True
    import importlib.util

    return importlib.util.find_spec(op.needs) is not None


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """
    Measure the operations asked for, print the table, and with ``--check``
    return 1 if any ratio passes its target by more than the margin.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="one operation (repeat)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    parser.add_argument("--check", action="store_true", help="exit 1 on a clear miss")
    parser.add_argument("--margin", type=float, default=MARGIN, help="the guard's margin")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)  # NAME BATCH N1 N2
    args = parser.parse_args(argv)
    if args.worker:
        name, batch, n1, n2 = args.worker
        worker(dataclasses.replace(BY_NAME[name], batch=int(batch), n1=int(n1), n2=int(n2)))
        return 0
    operations = _selected(args.only)
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        if os.environ.get("CI") == "true":
            _say("valgrind is missing, and CI=true requires the instruction counts.")
            return 1
        _say("valgrind is missing: instruction counts skipped (install valgrind to run them).")
        return 0
    results = []
    for op in operations:
        if not _available(op):
            _say(f"-- {op.name}: skipped, {op.needs} is not installed")
            continue
        result = measure(op, args.margin, lambda cmd, marks: count(cmd, marks, valgrind=valgrind))
        results.append(result)
        _say(
            f"-- {op.name}: {_k(result.ours)} / {_k(result.floor)} per {op.unit}, "
            f"{result.ratio:.2f}x ({result.seconds:.0f} s)"
        )
    _say()
    _say(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    failed = [r.name for r in results if r.fails_guard]
    if failed:
        _say(f"\nPast their target by more than {args.margin:.0%}: {', '.join(failed)}")
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())

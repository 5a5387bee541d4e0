"""
Benchmarks of creating, deriving, binding and reading contexts, each beside its floor.

Every benchmark runs ``ROUNDS`` (1,000) operations per call, so the times that
pytest-benchmark prints in microseconds read as nanoseconds per operation. The
operations run the way `timeit` runs them, and the way ``usercontext report``
times them: a loop over the statement written out 10 times, with the garbage
collector off. The loop costs the same for ours and the floor.

Each benchmark sits in a group with its floor (``--benchmark-group-by=group``),
so one run shows both and their ratio; benchmarks/README.md lists the targets.
"""

from __future__ import annotations

import functools
import itertools
import sys
import timeit

from typing import Any

import attrs
import pytest

import usercontext

from usercontext import UserContext
from usercontext._report.floors import Floor5, FloorBind, floor_var


ROUNDS = 1_000  # operations per benchmarked call
_UNROLL = 10


def _batch(stmt: str, **names: Any) -> functools.partial[float]:
    """
    Return a function that runs *stmt* ``ROUNDS`` times with *names* as its globals.
    """
    timer = timeit.Timer("\n".join([stmt] * _UNROLL), globals=names)
    return functools.partial(timer.timeit, ROUNDS // _UNROLL)


_unique = itertools.count()


def _fresh_ids() -> list[tuple[str, str, str]]:
    """
    Return ``ROUNDS`` triples of ids never used before in this process.
    """
    return [
        (f"u-{k:014d}", f"t-{k:014d}", f"r-{k:014d}") for k in itertools.islice(_unique, ROUNDS)
    ]


def _fresh_batch(benchmark: Any, stmt: str, **names: Any) -> None:
    """
    Benchmark *stmt* over ``ROUNDS`` new ``(u, t, r)`` id triples per call.

    The ids are made before each call, untimed, so every call meets ids that
    the library has never validated.
    """
    timer = timeit.Timer(f"for u, t, r in ids:\n    {stmt}", globals=names)

    def setup() -> None:
        names["ids"] = _fresh_ids()

    benchmark.extra_info["ops_per_call"] = ROUNDS
    benchmark.pedantic(
        functools.partial(timer.timeit, 1), setup=setup, rounds=300, warmup_rounds=10
    )


# -- Floors ------------------------------------------------------------------


# The floors are the report's, so the benchmarks and the report compare alike.


U, T, R = "user-42", "thread-7", "run-1"
RID, CONN = "0123456789abcdef0123456789abcdef", "connection-3"


# -- Creation ----------------------------------------------------------------


@pytest.mark.benchmark(group="creation")
def test_create(benchmark):
    """
    Benchmark creating a context with a generated request id, from ids seen before.

    Target: at most 2.5x `test_create_floor`.
    """
    UserContext(user_id=U, thread_id=T, run_id=R)
    benchmark.extra_info["ops_per_call"] = ROUNDS
    benchmark(
        _batch(
            "UserContext(user_id=u, thread_id=t, run_id=r)", UserContext=UserContext, u=U, t=T, r=R
        )
    )


@pytest.mark.benchmark(group="creation")
def test_create_floor(benchmark):
    """
    Benchmark the creation floor: a frozen attrs slots class with five str
    fields, created positionally.
    """
    benchmark.extra_info["ops_per_call"] = ROUNDS
    benchmark(_batch("Floor5(u, t, r, rid, c)", Floor5=Floor5, u=U, t=T, r=R, rid=RID, c=CONN))


@pytest.mark.benchmark(group="creation")
def test_child(benchmark):
    """
    Benchmark deriving a child context (new request id, parent link, depth + 1).

    Target: at most 1.5x `test_create`.
    """
    ctx = UserContext(user_id=U, thread_id=T, run_id=R)
    benchmark.extra_info["ops_per_call"] = ROUNDS
    benchmark(_batch("ctx.child()", ctx=ctx))


@pytest.mark.benchmark(group="creation, unique ids")
def test_create_unique_ids(benchmark):
    """
    Benchmark creating contexts whose ids are all new, so each one is validated
    rather than found among the ids that passed before.

    No target: it shows what the validation cache saves.
    """
    _fresh_batch(
        benchmark, "UserContext(user_id=u, thread_id=t, run_id=r)", UserContext=UserContext
    )


@pytest.mark.benchmark(group="creation, unique ids")
def test_create_unique_ids_floor(benchmark):
    """
    Benchmark the creation floor with the same new ids.
    """
    _fresh_batch(benchmark, "Floor5(u, t, r, rid, c)", Floor5=Floor5, rid=RID, c=CONN)


def test_shallow_size():
    """
    A context is no bigger than a frozen attrs slots instance with the same
    fields: at most 1.1x its `sys.getsizeof` (sizes do not vary, so this asserts).
    """
    floor9 = attrs.make_class(
        "Floor9",
        [a.name for a in attrs.fields(UserContext)],
        frozen=True,
        slots=True,
        weakref_slot=False,
    )
    ctx = UserContext(user_id=U, thread_id=T, run_id=R)
    floor = floor9(*(getattr(ctx, a.name) for a in attrs.fields(UserContext)))

    assert not hasattr(ctx, "__dict__")
    assert sys.getsizeof(ctx) / sys.getsizeof(floor) <= 1.1


# -- Binding and reading -----------------------------------------------------


@pytest.mark.benchmark(group="bind")
def test_bind(benchmark):
    """
    Benchmark ``with bind(ctx): pass`` with nothing bound before.

    Target: at most 1.2x `test_bind_floor`.
    """
    ctx = UserContext(user_id=U, thread_id=T, run_id=R)
    benchmark.extra_info["ops_per_call"] = ROUNDS
    benchmark(_batch("with bind(ctx): pass", bind=usercontext.bind, ctx=ctx))


@pytest.mark.benchmark(group="bind")
def test_bind_floor(benchmark):
    """
    Benchmark the floor of `bind`: ``with`` a minimal class whose
    ``__enter__``/``__exit__`` call `ContextVar.set`/`ContextVar.reset`.
    """
    ctx = UserContext(user_id=U, thread_id=T, run_id=R)
    benchmark.extra_info["ops_per_call"] = ROUNDS
    benchmark(_batch("with FloorBind(ctx): pass", FloorBind=FloorBind, ctx=ctx))


@pytest.mark.benchmark(group="current")
def test_current(benchmark):
    """
    Benchmark `usercontext.current` with a context bound.

    Target: at most 3x `test_current_floor`.
    """
    ctx = UserContext(user_id=U, thread_id=T, run_id=R)
    benchmark.extra_info["ops_per_call"] = ROUNDS
    with usercontext.bind(ctx):
        benchmark(_batch("current()", current=usercontext.current))


@pytest.mark.benchmark(group="current")
def test_current_floor(benchmark):
    """
    Benchmark the floor of `current`: `ContextVar.get` of a variable that is set.
    """
    benchmark.extra_info["ops_per_call"] = ROUNDS
    with FloorBind(object()):
        benchmark(_batch("get()", get=floor_var.get))

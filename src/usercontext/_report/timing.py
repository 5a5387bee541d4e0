"""
Timing for ``usercontext report``: operations timed in interleaved batches
against their floors, percentiles, and the formatting of times and ratios.

A ratio of ours to its floor misses its target only when it is clearly above
it: when both the ratio of the best batches and the median of the ratios of
interleaved pairs of batches are above it (`ratio_ok`).
"""

from __future__ import annotations

import contextvars
import statistics
import time
import timeit

from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs


if TYPE_CHECKING:
    import asyncio

    from collections.abc import Callable, Coroutine, Sequence

    from .scale import Scale


__all__ = [
    "Comparison",
    "LoopOp",
    "Op",
    "Timed",
    "compare",
    "curve",
    "fmt_ns",
    "fmt_ratio",
    "in_empty_context",
    "paired_ratios",
    "percentile",
    "ratio_ok",
    "time_op",
]

T = TypeVar("T")


_UNROLL = 10  # copies of a cheap statement per loop turn, so the loop costs ~1/10 per op


class Timed(Protocol):
    """
    An operation that can be timed in batches: `Op`, or `LoopOp` for an async one.
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


@attrs.frozen
class LoopOp:
    """
    An asynchronous operation timed in batches on *loop*: ``make(n)`` returns a
    coroutine running it *n* times.
    """

    label: str
    make: Callable[[int], Coroutine[Any, Any, None]]
    loop: asyncio.AbstractEventLoop

    def batch(self, n: int) -> int:
        """
        Run a batch of *n* operations with the collector off; return its nanoseconds.
        """
        timer = timeit.Timer(
            lambda: self.loop.run_until_complete(self.make(n)), timer=time.perf_counter_ns
        )
        return int(timer.timeit(1))


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


# The percentiles of a latency curve: fine steps in the tail, where the
# differences are.
CURVE_POINTS = (
    *range(0, 95, 5),
    95,
    96,
    97,
    98,
    99,
    99.5,
    99.9,
    100,
)


def curve(values: Sequence[float]) -> list[list[float]]:
    """
    Return the latency curve of *values*: ``[percentile, value]`` pairs at
    `CURVE_POINTS`, for the report's charts; empty if there are no values.
    """
    if not values:
        return []
    return [[p, percentile(values, p)] for p in CURVE_POINTS]


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
    if ns < 100:
        return f"{ns:.1f} ns"
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
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


def fmt_pairs(p50: dict[str, Any], p99: dict[str, Any], target: float | None) -> str:
    """
    Format the P50 and P99 `paired_ratios` of two services: each side's best
    P50 and best P99 over its runs, which the ratios divide, and the ratios,
    noting a median of pairs that falls on the other side of *target*.
    """
    ours = f"{min(p50['ours_ms']):.1f} / {min(p99['ours_ms']):.1f} ms"
    floor = f"{min(p50['floor_ms']):.1f} / {min(p99['floor_ms']):.1f} ms"
    text = f"{ours} vs {floor}: **{p50['ratio']:.2f}x / {p99['ratio']:.2f}x** (best of each side)"
    for name, pair in (("P50", p50), ("P99", p99)):
        median = pair["median_pair_ratio"]
        if target is not None and (pair["ratio"] > target) != (median > target):
            text += f" ({name} median of pairs {median:.2f}x: within noise)"
    return text

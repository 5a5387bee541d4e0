"""
The guard of the paired benchmarks: fail on a clear regression of a ratio to
its floor, stay quiet on noise.

Each pair is a benchmark of ours and the benchmark of its floor, with the
target of their ratio that ``benchmarks/README.md`` documents. The guard runs
every pair's two benchmarks *rounds* times with pytest-benchmark, the order
reversed every other round (ours first, then the floor first: interleaved),
takes each round's ratio of their best times, and judges the median of those
ratios against the target times *slack*. The slack is what a shared 2-core
machine needs to stay quiet (benchmarks/README.md gives the false-failure rate
measured on an unchanged tree); a regression past it is clear.

    python benchmarks/guard.py                 # 5 rounds, slack 1.5
    python benchmarks/guard.py --rounds 9 --slack 1.3 --json guard.json

Exit codes: 0 when every median ratio is within its target times the slack,
1 when one is past it, 2 on a usage error or when a benchmark run failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from pathlib import Path
from typing import Any

import attrs


HERE = Path(__file__).resolve().parent
SLACK = 1.5
ROUNDS = 5


@attrs.frozen
class Pair:
    """
    A benchmark of ours and of its floor (test ids in ``benchmarks/``), and
    the documented target of their ratio; or, with *extra*, one benchmark
    that times both in turn within every call and keeps their ratio in its
    ``extra_info[extra]`` (*floor* is then empty).
    """

    name: str
    ours: str
    floor: str
    target: float
    extra: str = ""


PAIRS = (
    Pair("creation", "test_context.py::test_create", "test_context.py::test_create_floor", 2.5),
    Pair("child", "test_context.py::test_child", "test_context.py::test_create", 1.5),
    Pair("bind", "test_context.py::test_bind", "test_context.py::test_bind_floor", 1.2),
    Pair("current", "test_context.py::test_current", "test_context.py::test_current_floor", 3.0),
    Pair(
        "quota acquire + release",
        "test_quota.py::test_local_quota",
        "test_quota.py::test_semaphore_dict_floor",
        1.3,
    ),
    Pair(
        "quota acquire + arelease",
        "test_quota.py::test_local_quota_protocol",
        "test_quota.py::test_semaphore_dict_floor",
        1.3,
    ),
    Pair(
        "reject by acquire_nowait",
        "test_quota.py::test_acquire_nowait_rejected",
        "test_quota.py::test_reject_nowait_floor",
        1.5,
    ),
    Pair(
        "reject by acquire(timeout=0)",
        "test_quota.py::test_acquire_timeout_zero",
        "test_quota.py::test_reject_raise_floor",
        1.5,
    ),
    # Its two benchmarks apart swing by 3-20x on a busy machine: its own
    # interleaved one times both in every call.
    Pair("engine per request", "test_quota.py::test_engine_interleaved", "", 2.5, "ratio"),
    Pair(
        "emit_nowait",
        "test_emitter.py::test_emit_nowait",
        "test_emitter.py::test_emit_nowait_floor",
        1.2,
    ),
    Pair(
        "emit, end to end",
        "test_emitter.py::test_end_to_end",
        "test_emitter.py::test_end_to_end_floor",
        1.5,
    ),
)


def _ids(pairs: tuple[Pair, ...]) -> list[str]:
    ids: list[str] = []
    for pair in pairs:
        for test in (pair.ours, pair.floor):
            if test and test not in ids:
                ids.append(test)
    return ids


def run_round(tests: list[str], into: Path) -> dict[str, dict[str, Any]]:
    """
    Run *tests* (in that order) once with pytest-benchmark; return each
    one's best time per call in seconds (``"min"``) and its ``extra_info``,
    by test id.

    Raises:
        RuntimeError: pytest failed; the message has the end of its output.
    """
    command = [
        sys.executable,
        "-m",
        "pytest",
        *(f"benchmarks/{t}" for t in tests),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-enable",
        "--benchmark-only",
        "--benchmark-warmup=on",
        "--benchmark-min-rounds=10",
        "--benchmark-max-time=0.1",
        f"--benchmark-json={into}",
    ]
    proc = subprocess.run(  # noqa: S603  # our own interpreter and test ids
        command, cwd=HERE.parent, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        msg = f"the benchmarks failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
        raise RuntimeError(msg)
    data = json.loads(into.read_text())
    return {
        b["fullname"].removeprefix("benchmarks/"): {"min": b["stats"]["min"], **b["extra_info"]}
        for b in data["benchmarks"]
    }


def guard(pairs: tuple[Pair, ...], rounds: int, slack: float) -> dict[str, Any]:
    """
    Time every pair *rounds* times, interleaved; return each pair's ratios,
    their median and verdict.
    """
    tests = _ids(pairs)
    ratios: dict[str, list[float]] = {p.name: [] for p in pairs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = tests if r % 2 == 0 else tests[::-1]
            began = time.perf_counter()
            best = run_round(order, Path(tmp) / f"round-{r}.json")
            for p in pairs:
                ratios[p.name].append(
                    best[p.ours][p.extra] if p.extra else best[p.ours]["min"] / best[p.floor]["min"]
                )
            sys.stderr.write(
                f"round {r + 1}/{rounds} done in {time.perf_counter() - began:.1f} s\n"
            )
    results = []
    for p in pairs:
        median = statistics.median(ratios[p.name])
        limit = p.target * slack
        results.append(
            {
                "name": p.name,
                "ours": p.ours,
                "floor": p.floor,
                "target": p.target,
                "limit": limit,
                "ratios": ratios[p.name],
                "median": median,
                "status": "PASS" if median <= limit else "FAIL",
            }
        )
    return {"rounds": rounds, "slack": slack, "pairs": results}


def table(outcome: dict[str, Any]) -> str:
    """
    Return the guard's results as a Markdown table.
    """
    lines = [
        "| Pair | Target | Limit | Median ratio | Ratios by round | Status |",
        "|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['name']} | ≤ {r['target']:g}x | ≤ {r['limit']:.2f}x | {r['median']:.2f}x | "
        f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['status']} |"
        for r in outcome["pairs"]
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Run the guard; return its exit code.
    """
    parser = argparse.ArgumentParser(
        description="Fail when a paired benchmark's ratio to its floor clearly regresses."
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved runs (default 5)")
    parser.add_argument(
        "--slack", type=float, default=SLACK, help="the limit is target x slack (default 1.5)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.slack < 1:
        parser.error("--rounds must be at least 1, and --slack at least 1.0")
    try:
        outcome = guard(PAIRS, args.rounds, args.slack)
    except RuntimeError as e:
        sys.stderr.write(f"guard: {e}\n")
        return 2
    sys.stdout.write(table(outcome) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(outcome, indent=2) + "\n", encoding="utf-8")
    failed = [r["name"] for r in outcome["pairs"] if r["status"] == "FAIL"]
    if failed:
        sys.stdout.write(f"clear regression past target x {args.slack:g}: {', '.join(failed)}\n")
        return 1
    sys.stdout.write(f"every ratio within its target x {args.slack:g}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
How much work the report's scenarios do: the quick run, the default one, and
the full one with its long stability run.
"""

from __future__ import annotations

import attrs


__all__ = ["DEFAULT", "FULL", "QUICK", "Scale"]


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
        load_seconds: The length of the load section's phases, as a share
            of the full run's (whose spike lasts 2 s).
        leak_cycles: Cycles of requests in the memory-leak scenario.
        cycle_requests: Requests per cycle in the memory-leak scenario.
        load_levels: The numbers of requests in flight at once that the
            throughput-against-load scenario steps through.
        load_level_s: How long it keeps each of them, in seconds.
        stability_s: How long the sustained load of the stability run lasts,
            in seconds.
        stability_windows: How many windows the stability run is cut into, to
            judge its memory trend and its latency drift.
        time_factor: The run's length relative to the default one, for the
            time-left estimate of the progress lines.
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
    load_seconds: float = 1.0
    leak_cycles: int = 20
    cycle_requests: int = 200
    load_levels: tuple[int, ...] = (1, 10, 50, 100, 200, 500, 1_000)
    load_level_s: float = 0.3
    stability_s: float = 4.0
    stability_windows: int = 8
    time_factor: float = 1.0


DEFAULT = Scale(
    name="default",
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
    load_seconds=0.25,
    leak_cycles=10,
    cycle_requests=100,
    load_levels=(1, 10, 100, 500),
    load_level_s=0.2,
    stability_s=1.5,
    stability_windows=5,
    time_factor=0.2,
)
# The default run, and a stability run of five minutes: the legacy report's
# was 30 minutes at 50 requests/s; this one sustains far more requests in less.
FULL = attrs.evolve(
    DEFAULT,
    name="full (with a 5-minute stability run)",
    leak_cycles=100,
    cycle_requests=500,
    load_levels=(1, 10, 50, 100, 200, 500, 1_000, 2_000),
    load_level_s=1.0,
    stability_s=300.0,
    stability_windows=30,
    time_factor=6.0,
)

"""
How much work the report's scenarios do: the full run, and the quick one.
"""

from __future__ import annotations

import attrs


__all__ = ["DEFAULT", "QUICK", "Scale"]


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
    load_seconds=0.25,
)

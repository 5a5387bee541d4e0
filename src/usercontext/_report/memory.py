"""
The "Memory and leak cycles" section of ``usercontext report``.

It drives the report's example service (`usercontext._report.service.Service`:
the middleware, a registry scope with a session, an engine under a per-user
quota, events to each user's connection) in-process, and measures with
`tracemalloc` what the legacy report's "Memory Usage Analysis" measured:

- the memory an active user holds: every user has one request in flight (its
  context, scope, session, engine and emitter), measured against the idle
  service;
- leak cycles: the same requests again and again, cycle after cycle, the
  memory held after each (the garbage collected), its growth per cycle, the
  peak within the cycles and how much of it was given back.

The memory after each cycle is what the report's chart of memory over leak
cycles draws.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
import tracemalloc

from typing import TYPE_CHECKING, Any

from .frame import SectionResult, in_thread
from .http import _DISCONNECT, _REQUEST, _http_scope, _in_process_round, _lifespan_of, _requests
from .rows import Goal, Quantity, Row
from .service import USERS, Service


if TYPE_CHECKING:
    from collections.abc import Sequence

    from .frame import Progress, Table
    from .scale import Scale


__all__ = ["STEPS", "growth_per_cycle", "memory_section"]

STEPS = (
    "memory held per active user (1 request in flight per user, 10 and 100 users)",
    "leak cycles: the same requests cycle after cycle, memory after each",
)

# The legacy report's "Memory Usage Analysis": the process at 102 MB idle,
# 145 MB with 10 active users and 320 MB with 100, and over 100 cycles of 10
# requests a growth of 6 MB (threshold 20 MB), a peak of 137 MB and 85% of it
# recovered by the collector (threshold 80%).
LEGACY_IDLE_MB, LEGACY_10_USERS_MB, LEGACY_100_USERS_MB = 102.0, 145.0, 320.0
LEGACY_PER_USER_KB = (LEGACY_100_USERS_MB - LEGACY_IDLE_MB) * 1024 / 100
LEGACY_GROWTH_MB, LEGACY_GROWTH_LIMIT_MB = 6.0, 20.0
LEGACY_CYCLES, LEGACY_CYCLE_REQUESTS = 100, 10
LEGACY_RECOVERY = 0.85
PER_USER_TARGET_KB = LEGACY_PER_USER_KB / 100  # DESIGN.md: at least 100x better than legacy
# A leak of anything per request (a context, a scope, a task) is at least one
# allocated block per request, most of them several. A leak-free cycle's count
# moves by ~100 blocks either way (free lists, bounded rings refilled), which
# over a quick run's cycles of 100 requests is a slope of ~0.2 per request.
GROWTH_TARGET_BLOCKS_PER_REQUEST = 1.0
# A growth fitted over a whole run below this many blocks is within what a
# steady count moves by (~100 blocks either way): no leak, whatever its slope
# over a short run. A leak of one block per request passes it within 500
# requests.
NOISE_BLOCKS = 500.0
RECOVERY_TARGET = 0.90
ACTIVE_USERS = (10, USERS)
HOLD_S = 0.1  # how long each request of the active-users step stays in flight, at most


def growth_per_cycle(values: Sequence[float]) -> float:
    """
    Return the least-squares slope of *values*, one per cycle: the growth per cycle.

    Two values or fewer have no trend: the slope is 0 for one, their
    difference for two.
    """
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    spread = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / spread


async def _serve_one(app: Any, token: bytes, request_id: str) -> int:
    """
    Send one request to *app*; return its status.
    """
    sent: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = [_DISCONNECT, _REQUEST]

    async def receive() -> dict[str, Any]:
        return messages.pop() if len(messages) > 1 else messages[0]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_http_scope(token, request_id), receive, send)
    status: int = sent[0]["status"]
    return status


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _active(service: Service, users: int) -> dict[str, Any]:
    """
    Hold one request of each of *users* users in flight (each waits in its
    engine) and measure the memory they hold beyond the idle service.
    """
    idle = _traced()
    tasks = [
        asyncio.create_task(_serve_one(service.asgi, token, request_id))
        for _, token, request_id in _requests(1)[:users]
    ]
    deadline = time.monotonic() + HOLD_S
    while service.factory.stats().in_use < users and time.monotonic() < deadline:  # noqa: ASYNC110  # no event to wait on
        await asyncio.sleep(0.001)
    in_flight = service.factory.stats().in_use
    held = _traced()
    statuses = await asyncio.gather(*tasks)
    await service.settle()
    return {
        "users": users,
        "in_flight": in_flight,
        "idle_bytes": idle,
        "active_bytes": held,
        "per_user_bytes": (held - idle) / users,
        "ok": sum(status == 200 for status in statuses),
    }


async def _active_users() -> list[dict[str, Any]]:
    tracemalloc.start()
    try:
        return await _active_users_traced()
    finally:
        tracemalloc.stop()


async def _active_users_traced() -> list[dict[str, Any]]:
    service = Service(work_s=HOLD_S)
    async with _lifespan_of(service.asgi):
        service.connect()
        await _active(service, ACTIVE_USERS[0])  # warm up: first-use caches
        results: list[dict[str, Any]] = []
        for users in ACTIVE_USERS:
            service.connect()
            results.append(await _active(service, users))
    return results


def _blocks(*, collect: bool = True) -> int:
    if collect:
        gc.collect()
    return sys.getallocatedblocks()


async def _cycles(cycles: int, per_user: int) -> dict[str, Any]:
    """
    Run *cycles* cycles of *per_user* requests of every user on one service;
    return the blocks allocated after each cycle's requests, before and after
    the garbage is collected.
    """
    service = Service(work_s=0.001)
    after: list[int] = []
    before_gc: list[int] = []
    failed = cross_user = 0
    state: dict[str, Any] = {}
    async with _lifespan_of(service.asgi):
        service.connect()
        await _in_process_round(service.asgi, per_user)  # warm up: first-use caches
        await service.settle()
        initial = _blocks()
        for _ in range(cycles):
            service.connect()
            run = await _in_process_round(service.asgi, per_user)
            before_gc.append(_blocks(collect=False))
            state = await service.settle()
            after.append(_blocks())
            failed += run.failed
            cross_user += run.cross_user
    return {
        "initial_blocks": initial,
        "after_blocks": after,
        "before_gc_blocks": before_gc,
        "failed": failed,
        "cross_user": cross_user,
        "state": state,
    }


def _active_rows(out: Table) -> None:
    results = in_thread(lambda: asyncio.run(_active_users()))
    out.figures["active_users"] = {
        "results": results,
        "legacy_mb": {
            "idle": LEGACY_IDLE_MB,
            "10_users": LEGACY_10_USERS_MB,
            "100_users": LEGACY_100_USERS_MB,
        },
        "legacy_per_user_kb": LEGACY_PER_USER_KB,
        "target_per_user_kb": PER_USER_TARGET_KB,
    }
    for r in results:
        users, kb = r["users"], r["per_user_bytes"] / 1024
        complete = r["in_flight"] == users and r["ok"] == users
        out.rows.append(
            Row(
                id=f"memory.per_active_user_{users}",
                kind="performance",
                metric=(
                    f"Memory held per active user, {users} users with a request in flight "
                    "(context, scope, session, engine, emitter)"
                ),
                target=f"≤ {PER_USER_TARGET_KB:.1f} KB (legacy ~{LEGACY_PER_USER_KB:,.0f} KB)",
                achieved=(
                    f"**{kb:.1f} KB** per user ({r['in_flight']} of {users} in flight); "
                    f"{LEGACY_PER_USER_KB / max(kb, 0.001):,.0f}x less than legacy"
                ),
                ok=complete and kb <= PER_USER_TARGET_KB,
                value=Quantity(kb, "KB"),
                goal=Goal("<=", PER_USER_TARGET_KB, "KB"),
                details={
                    "in_flight": Quantity(r["in_flight"], "requests"),
                    "idle": Quantity(r["idle_bytes"], "B"),
                    "active": Quantity(r["active_bytes"], "B"),
                    "legacy": Quantity(LEGACY_PER_USER_KB, "KB"),
                },
            )
        )


def _cycle_rows(out: Table, scale: Scale) -> None:
    per_user = max(1, scale.cycle_requests // USERS)
    requests = per_user * USERS
    r: dict[str, Any] = in_thread(lambda: asyncio.run(_cycles(scale.leak_cycles, per_user)))
    after, peaks, initial = r["after_blocks"], r["before_gc_blocks"], r["initial_blocks"]
    # The first cycles may still fill free lists and caches: the trend is
    # judged on the later four fifths.
    judged = after[len(after) // 5 :]
    slope = growth_per_cycle(judged)
    fitted = slope * (len(judged) - 1)
    per_request = slope / requests
    peak = max(peaks)
    final = after[-1]
    recovered = (peak - final) / (peak - initial) if peak > initial else 1.0
    state = r["state"]
    left = {
        key: state[key]
        for key in ("resources_open", "engines_active", "quota_in_use", "quota_keys", "hub_users")
    }
    out.figures["leak_cycles"] = {
        **r,
        "cycles": scale.leak_cycles,
        "requests_per_cycle": requests,
        "judged_from_cycle": len(after) // 5 + 1,
        "growth_per_cycle_blocks": slope,
        "growth_per_request_blocks": per_request,
        "fitted_growth_blocks": fitted,
        "noise_blocks": NOISE_BLOCKS,
        "total_growth_blocks": final - initial,
        "recovered": recovered,
        "left": left,
        "target_growth_per_request_blocks": GROWTH_TARGET_BLOCKS_PER_REQUEST,
        "legacy": {
            "cycles": LEGACY_CYCLES,
            "requests_per_cycle": LEGACY_CYCLE_REQUESTS,
            "growth_mb": LEGACY_GROWTH_MB,
            "growth_limit_mb": LEGACY_GROWTH_LIMIT_MB,
            "recovered": LEGACY_RECOVERY,
        },
    }
    total = scale.leak_cycles * requests
    legacy_kb = LEGACY_GROWTH_MB * 1024 / (LEGACY_CYCLES * LEGACY_CYCLE_REQUESTS)
    out.rows += [
        Row(
            id="memory.leak_growth_per_cycle",
            kind="correctness",
            metric=(
                f"Leak cycles: memory growth per cycle of {requests:,} requests, "
                f"{scale.leak_cycles} cycles (least squares, after the first fifth)"
            ),
            target=(
                f"≤ {GROWTH_TARGET_BLOCKS_PER_REQUEST:g} block per request, or ≤ "
                f"{NOISE_BLOCKS:g} blocks fitted over the run (legacy "
                f"{LEGACY_GROWTH_MB:g} MB over {LEGACY_CYCLES * LEGACY_CYCLE_REQUESTS:,} "
                f"requests, ~{legacy_kb:,.1f} KB per request)"
            ),
            achieved=(
                f"**{slope:+,.0f} blocks per cycle** ({per_request:+.2f} per request); "
                f"{final - initial:+,} blocks over {total:,} requests"
            ),
            ok=per_request <= GROWTH_TARGET_BLOCKS_PER_REQUEST or fitted <= NOISE_BLOCKS,
            value=Quantity(per_request, "blocks"),
            goal=Goal("<=", GROWTH_TARGET_BLOCKS_PER_REQUEST, "blocks"),
            details={
                "per_cycle": Quantity(slope, "blocks"),
                "fitted": Quantity(fitted, "blocks"),
                "total": Quantity(final - initial, "blocks"),
                "legacy_per_request": Quantity(legacy_kb, "KB"),
            },
        ),
        Row(
            id="memory.leak_recovered",
            kind="correctness",
            metric=(
                "Leak cycles: memory given back by the collector, of the most held before it "
                "ran (GC effectiveness)"
            ),
            target=f"≥ {RECOVERY_TARGET:.0%} (legacy {LEGACY_RECOVERY:.0%}, threshold 80%)",
            achieved=(
                f"**{recovered:.1%}**: {peak - initial:,} blocks above the start before "
                f"collection, {final - initial:+,} left"
            ),
            ok=recovered >= RECOVERY_TARGET,
            value=Quantity(100 * recovered, "%"),
            goal=Goal(">=", 100 * RECOVERY_TARGET, "%"),
            details={
                "peak_above_start": Quantity(peak - initial, "blocks"),
                "left": Quantity(final - initial, "blocks"),
            },
        ),
        Row(
            id="memory.leak_state_left",
            kind="correctness",
            metric=(
                "Leak cycles: every request succeeded for its own user, and nothing is left "
                "(open resources, engines, quota slots and keys, hub users)"
            ),
            target="0 failed, 0 cross-user, 0 left",
            achieved=(
                f"{r['failed']} failed, {r['cross_user']} cross-user of {total:,}; left: "
                + ", ".join(f"{k} {v}" for k, v in left.items())
            ),
            ok=r["failed"] == r["cross_user"] == 0 and not any(left.values()),
            value=Quantity(sum(left.values()), "objects"),
            goal=Goal("==", 0, "objects"),
            details={
                "failed": Quantity(r["failed"], "requests"),
                "cross_user": Quantity(r["cross_user"], "requests"),
            },
        ),
    ]


def memory_section(scale: Scale, progress: Progress) -> SectionResult:
    """
    Measure the memory an active user holds, and the memory over cycles of requests.
    """
    out = progress.table("memory")
    progress("memory", STEPS[0])
    _active_rows(out)
    progress("memory", STEPS[1])
    _cycle_rows(out, scale)
    notes = (
        (
            "Memory per active user is what `tracemalloc` traces (Python's allocations); over "
            "the leak cycles it is the count of allocated blocks (`sys.getallocatedblocks()`), "
            "which costs nothing to keep. Both are taken after a full garbage collection. The "
            "legacy report gave the size of its whole process, so the comparison is per user "
            "and per request, not of totals."
        ),
        (
            "Each cycle sends its requests through the example service's ASGI app in-process, "
            "waits for their events to be delivered, disconnects every user and waits for the "
            "hub to forget them; a warm-up cycle runs first."
        ),
    )
    return SectionResult(tuple(out.rows), out.figures, notes)

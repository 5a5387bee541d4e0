"""
The "Throughput and stability" section of ``usercontext report``.

It drives the report's example service (`usercontext._report.service.Service`)
in-process with closed-loop clients: each client sends its next request as
soon as its last one is answered, so the number of clients is the number of
requests in flight.

- Throughput against load: for each number of requests in flight in
  ``scale.load_levels``, the requests answered per second and their P50 and
  P99 latency; the load where throughput stops growing (saturation) is marked.
- Stability: a sustained load (50 requests in flight, the legacy report's 50
  users) for ``scale.stability_s`` seconds, cut into windows: the requests,
  their latency and the memory in each window. The memory trend (allocated
  blocks per 1,000 requests) and the latency drift (the median latency of the
  last third of the windows over the first third) are judged against targets.
  ``usercontext report --full`` makes it five minutes long.
"""

from __future__ import annotations

import array
import asyncio
import gc
import statistics
import sys
import time

from pathlib import Path
from typing import TYPE_CHECKING, Any

from usercontext import AGENT_COMPLETED, AGENT_STARTED, UserContext

from .frame import SectionResult, in_thread
from .http import _lifespan_of, _requests
from .memory import NOISE_BLOCKS, _serve_one, growth_per_cycle
from .rows import Goal, Quantity, Row
from .service import TOKENS, USERS, Service
from .timing import percentile


if TYPE_CHECKING:
    from collections.abc import Sequence

    from .frame import Progress, Table
    from .scale import Scale


__all__ = ["STEPS", "stability_section"]

STEPS = (
    "throughput against load: requests answered per second at each number in flight",
    "stability: a sustained load, its memory trend and latency drift window by window",
)

WORK_S = 0.01  # the legacy scenario's "~10ms simulated work"
STABILITY_CLIENTS = 50  # the legacy stability run's "50 concurrent" users
SATURATED = 0.95  # saturation: the least load that reaches this share of the peak throughput
# The legacy stability run: 30 minutes at 50 requests/s, 90,000 requests, its
# response time degrading by "<5% over time", an error rate "<0.1%".
LEGACY_STABILITY_MIN, LEGACY_STABILITY_RPS, LEGACY_DRIFT = 30.0, 50.0, 0.05
LEGACY_BREAKING_POINT = 800  # "Breaking Point: ~800 concurrent requests"
LEGACY_THROUGHPUT = 1_000.0  # "Request Throughput: 1000+ req/sec"
DRIFT_TARGET = 1.10
WARM_UP_REQUESTS = 40  # per client, before the windows: first uses, and the slow fills
WARM_UP_EVENTS = 400  # per user: past the small ints CPython caches, and the replay history
# A leak of one object per request is over 1,000 blocks per 1,000 requests; a
# steady service's count moves by ~100 blocks from window to window, which
# over a quick run's few windows of ~1,000 requests is a slope of up to ~100.
TREND_TARGET_BLOCKS = 250.0


def _rss_bytes() -> int | None:
    """
    Return the resident memory of the process, where ``/proc`` tells it.
    """
    try:
        fields = Path("/proc/self/statm").read_text(encoding="ascii").split()
    except OSError:
        return None
    import os

    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


class _Clients:
    """
    Closed-loop clients of a service: each sends a request, waits for its
    answer, and sends the next, until told to stop.
    """

    def __init__(self, service: Service, clients: int) -> None:
        self.service = service
        self.clients = clients
        # The latencies of the current window, in ms. An array holds its
        # numbers without an object each, so that what the clients record
        # does not show in the memory trend they measure.
        self.latencies = array.array("d")
        self.failed = 0
        self.stop = False

    async def _client(self, k: int, until: int | None = None) -> None:
        requests = _requests(1)
        _, token, request_id = requests[k % USERS]
        n = 0
        while not self.stop and (until is None or n < until):
            n += 1
            started = time.perf_counter()
            status = await _serve_one(self.service.asgi, token, f"{request_id}-{k}-{n}")
            if status == 200:
                self.latencies.append((time.perf_counter() - started) * 1e3)
            else:
                self.failed += 1

    async def warm_up(self, requests: int) -> None:
        """
        Send *requests* requests from each client, and wait for their answers.
        """
        await asyncio.gather(*(self._client(k, requests) for k in range(self.clients)))
        self.latencies = array.array("d")

    async def run(self, seconds: float, windows: int = 1) -> list[dict[str, Any]]:
        """
        Run the clients for *seconds*, cut into *windows*; return each
        window's figures.
        """
        tasks = [asyncio.create_task(self._client(k)) for k in range(self.clients)]
        start = time.perf_counter()
        marks: list[tuple[float, array.array[float], int, int | None]] = []
        for w in range(windows):
            await asyncio.sleep(max(0.0, start + seconds * (w + 1) / windows - time.perf_counter()))
            latencies, self.latencies = self.latencies, array.array("d")
            at = time.perf_counter()
            gc.collect()
            marks.append((at, latencies, sys.getallocatedblocks(), _rss_bytes()))
        self.stop = True
        await asyncio.gather(*tasks)
        results: list[dict[str, Any]] = []
        begin = start
        for at, latencies, blocks, rss in marks:
            results.append(
                {
                    "start_s": begin - start,
                    "end_s": at - start,
                    "requests": len(latencies),
                    "per_s": len(latencies) / (at - begin),
                    "p50_ms": percentile(latencies, 50) if latencies else None,
                    "p99_ms": percentile(latencies, 99) if latencies else None,
                    "blocks": blocks,
                    "rss_bytes": rss,
                }
            )
            begin = at
        return results


async def _load_levels(levels: Sequence[int], seconds: float) -> dict[str, Any]:
    service = Service(work_s=WORK_S)
    results: list[dict[str, Any]] = []
    failed = 0
    async with _lifespan_of(service.asgi):
        service.connect()
        await _Clients(service, 10).run(0.1)  # warm up
        for level in levels:
            clients = _Clients(service, level)
            (window,) = await clients.run(seconds)
            failed += clients.failed
            results.append({"in_flight": level, **window})
        state = await service.settle()
    return {"levels": results, "failed": failed, "state": state}


async def _sustained(seconds: float, windows: int) -> dict[str, Any]:
    service = Service(work_s=WORK_S)
    async with _lifespan_of(service.asgi):
        service.connect()
        clients = _Clients(service, STABILITY_CLIENTS)
        await _fill_histories(service)
        await clients.warm_up(WARM_UP_REQUESTS)
        results = await clients.run(seconds, windows)
        state = await service.settle()
    return {"windows": results, "failed": clients.failed, "state": state}


async def _fill_histories(service: Service) -> None:
    """
    Emit events to every user until the hub's bounded replay history of each
    is full, and their sequence numbers are past the small ints that CPython
    caches (up to 256): a history that fills, or events whose numbers start
    to take an object each, would show as a trend that is none.
    """
    hub = service.hub
    for user_id in TOKENS.values():
        for _ in range(WARM_UP_EVENTS // 2):
            # The very events of the service's requests, each pair with a
            # request id of its own, in the history that theirs will replace.
            ctx = UserContext(user_id=user_id, thread_id="web", run_id="agent")
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(AGENT_STARTED, {"agent": "triage"})
            emitter.emit_nowait(AGENT_COMPLETED, {"agent": "triage", "result": "ok"})
        stats = hub.stats()
        while stats.delivered < stats.emitted:  # no event to wait on
            await asyncio.sleep(0.001)
            stats = hub.stats()


def _saturation(levels: list[dict[str, Any]]) -> dict[str, Any]:
    peak = max(levels, key=lambda r: r["per_s"])
    return next(r for r in levels if r["per_s"] >= SATURATED * peak["per_s"])


def _load_rows(out: Table, scale: Scale) -> None:
    seconds = scale.load_level_s
    r = in_thread(lambda: asyncio.run(_load_levels(scale.load_levels, seconds)))
    levels = r["levels"]
    peak = max(levels, key=lambda lv: lv["per_s"])
    knee = _saturation(levels)
    out.figures["throughput"] = {
        **r,
        "seconds_per_level": seconds,
        "work_ms": WORK_S * 1e3,
        "peak": peak,
        "saturation": knee,
        "legacy": {"breaking_point": LEGACY_BREAKING_POINT, "throughput": LEGACY_THROUGHPUT},
    }
    total = sum(lv["requests"] for lv in levels)
    out.rows += [
        Row(
            id="stability.peak_throughput",
            kind="performance",
            metric=(
                f"Peak throughput, in-process, {WORK_S * 1e3:g} ms of work per request, "
                f"{levels[0]['in_flight']} to {levels[-1]['in_flight']:,} requests in flight"
            ),
            target=f"≥ {LEGACY_THROUGHPUT:,.0f} requests/s (legacy '1000+ req/sec')",
            achieved=(
                f"**{peak['per_s']:,.0f}/s** at {peak['in_flight']:,} in flight; saturated from "
                f"{knee['in_flight']:,} in flight (P99 {knee['p99_ms'] or 0:.1f} ms there)"
            ),
            ok=peak["per_s"] >= LEGACY_THROUGHPUT,
            value=Quantity(peak["per_s"], "requests/s"),
            goal=Goal(">=", LEGACY_THROUGHPUT, "requests/s"),
            details={
                "at_in_flight": Quantity(peak["in_flight"], "requests"),
                "saturation_in_flight": Quantity(knee["in_flight"], "requests"),
                "legacy_breaking_point": Quantity(LEGACY_BREAKING_POINT, "requests"),
            },
        ),
        Row(
            id="stability.load_errors",
            kind="correctness",
            metric=(
                "Past saturation, requests wait their turn: none fails, up to "
                f"{levels[-1]['in_flight']:,} in flight (legacy broke at ~{LEGACY_BREAKING_POINT})"
            ),
            target="0 failed, > 0 answered",
            achieved=f"{r['failed']} failed of {total + r['failed']:,}",
            ok=r["failed"] == 0 and total > 0,
            value=Quantity(r["failed"], "requests"),
            goal=Goal("==", 0, "requests"),
            details={"answered": Quantity(total, "requests")},
        ),
    ]


def _drift(windows: list[dict[str, Any]]) -> tuple[float, float, float]:
    """
    Return the median P50 of the first third of the windows that answered
    requests, of the last third, and their ratio (1 when none answered).
    """
    p50s = [w["p50_ms"] for w in windows if w["p50_ms"] is not None]
    if not p50s:
        return 0.0, 0.0, 1.0
    third = max(1, len(p50s) // 3)
    first, last = statistics.median(p50s[:third]), statistics.median(p50s[-third:])
    return first, last, last / first


def _stability_rows(out: Table, scale: Scale) -> None:
    r = in_thread(lambda: asyncio.run(_sustained(scale.stability_s, scale.stability_windows)))
    windows = r["windows"]
    requests = sum(w["requests"] for w in windows)
    # The first window settles what the warm-up did not (the last first uses):
    # the trend is judged from its end on.
    judged = windows[1:]
    per_window = statistics.fmean(w["requests"] for w in judged)
    per_window_growth = growth_per_cycle([w["blocks"] for w in judged])
    trend = per_window_growth * 1_000 / max(per_window, 1.0)
    fitted = per_window_growth * (len(judged) - 1)
    steady = trend <= TREND_TARGET_BLOCKS or fitted <= NOISE_BLOCKS
    first, last, drift = _drift(windows)
    state = r["state"]
    left = {k: state[k] for k in ("resources_open", "engines_active", "quota_in_use", "hub_users")}
    rss = [w["rss_bytes"] for w in windows if w["rss_bytes"] is not None]
    out.figures["stability"] = {
        **r,
        "seconds": scale.stability_s,
        "clients": STABILITY_CLIENTS,
        "work_ms": WORK_S * 1e3,
        "requests": requests,
        "blocks_per_1000_requests": trend,
        "fitted_growth_blocks": fitted,
        "noise_blocks": NOISE_BLOCKS,
        "p50_first_ms": first,
        "p50_last_ms": last,
        "drift": drift,
        "left": left,
        "target_drift": DRIFT_TARGET,
        "target_blocks_per_1000_requests": TREND_TARGET_BLOCKS,
        "legacy": {
            "minutes": LEGACY_STABILITY_MIN,
            "requests_per_s": LEGACY_STABILITY_RPS,
            "drift": 1 + LEGACY_DRIFT,
        },
    }
    minutes = scale.stability_s / 60
    out.rows += [
        Row(
            id="stability.memory_trend",
            kind="correctness",
            metric=(
                f"Stability: memory trend over {scale.stability_s:g} s of sustained load, "
                f"{STABILITY_CLIENTS} requests in flight, {len(windows)} windows"
            ),
            target=(
                f"≤ {TREND_TARGET_BLOCKS:g} blocks per 1,000 requests or ≤ {NOISE_BLOCKS:g} "
                "fitted over the run, nothing left (legacy: 'linear, bounded')"
            ),
            achieved=(
                f"**{trend:+.1f} blocks per 1,000 requests** over {requests:,} requests"
                + (f"; RSS {(rss[-1] - rss[0]) / 2**20:+.1f} MB" if len(rss) > 1 else "")
                + "; left: "
                + ", ".join(f"{k} {v}" for k, v in left.items())
            ),
            ok=steady and not any(left.values()) and requests > 0,
            value=Quantity(trend, "blocks"),
            goal=Goal("<=", TREND_TARGET_BLOCKS, "blocks"),
            details={
                "requests": Quantity(requests, "requests"),
                "fitted": Quantity(fitted, "blocks"),
            },
        ),
        Row(
            id="stability.errors",
            kind="correctness",
            metric="Stability: failed requests",
            target="0 (legacy < 0.1%)",
            achieved=f"{r['failed']} of {requests + r['failed']:,}",
            ok=r["failed"] == 0,
            value=Quantity(r["failed"], "requests"),
            goal=Goal("==", 0, "requests"),
        ),
        Row(
            id="stability.latency_drift",
            kind="performance",
            metric="Stability: latency drift, median latency of the last third of windows vs first",
            target=f"≤ {DRIFT_TARGET:g}x (legacy '<5% over time' in {LEGACY_STABILITY_MIN:g} min)",
            achieved=f"{first:.2f} ms → {last:.2f} ms: **{drift:.3f}x**",
            ok=drift <= DRIFT_TARGET,
            value=Quantity(drift, "x"),
            goal=Goal("<=", DRIFT_TARGET, "x"),
            details={"first": Quantity(first, "ms"), "last": Quantity(last, "ms")},
        ),
        Row(
            id="stability.throughput",
            kind="info",
            metric="Stability: requests per second sustained",
            target=(
                f"none (info); legacy {LEGACY_STABILITY_RPS:g}/s for {LEGACY_STABILITY_MIN:g} min"
            ),
            achieved=(
                f"**{requests / scale.stability_s:,.0f}/s** for {minutes:.2g} min "
                f"({requests / scale.stability_s / LEGACY_STABILITY_RPS:,.0f}x legacy's rate)"
            ),
            value=Quantity(requests / scale.stability_s, "requests/s"),
        ),
    ]


def stability_section(scale: Scale, progress: Progress) -> SectionResult:
    """
    Measure throughput against load, and the service under a sustained load.
    """
    out = progress.table("stability")
    progress("stability", STEPS[0])
    _load_rows(out, scale)
    progress("stability", STEPS[1])
    _stability_rows(out, scale)
    notes = (
        (
            "Clients are closed loops in the same process as the service: each sends its next "
            "request when its last is answered, so their number is the number of requests in "
            "flight. The service allows two engines per user (100 users), so past 200 in flight "
            "requests queue for their user's engines."
        ),
        (
            "Memory is counted in allocated blocks (`sys.getallocatedblocks()`) after a full "
            "garbage collection at the end of each window: cheap enough to leave the load as it "
            "is. The trend is the least-squares slope from the end of the first window on. "
            "Before the windows every user "
            f"gets {WARM_UP_EVENTS} events, which fill the hub's bounded replay histories and "
            "take the events' sequence numbers past the small ints CPython caches."
        ),
        "`usercontext report --full` sustains the load for five minutes.",
    )
    return SectionResult(tuple(out.rows), out.figures, notes)

"""
The "Load" section of ``usercontext report``: the service under more work
than it can do, with the admission policy off and on, side by side.

A simulated service: an `usercontext.EngineFactory` of *SLOTS* engines in all,
each request holding one for *WORK_S* seconds, so that it serves at most
``SLOTS / WORK_S`` requests per second (its *capacity*). Requests of *USERS*
users arrive open-loop (Poisson arrivals at a set rate, whatever the
service's answers), and each is timed from its arrival to its end. With the
policy on, the factory has an `usercontext.Admission` of a per-user rate
limit and load shedding (`usercontext.Shed`: a bounded queue, and refusal
when the expected wait exceeds the request's timeout); off, it has none and
requests wait as long as it takes.

The scenarios: a light load (the unloaded latency every target refers to),
a sustained load below capacity, a spike of ten times the capacity for
*SPIKE_S* seconds between spells of normal load, a stress run stepping the
offered load up past the breaking point, and a backend that fails and heals
under a circuit breaker.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

from typing import TYPE_CHECKING, Any

import attrs

from usercontext import (
    Admission,
    CircuitBreaker,
    CircuitOpenError,
    EngineFactory,
    LoadShedError,
    LocalRateLimiter,
    QuotaTimeoutError,
    RateLimitedError,
    Shed,
    UserContext,
)

from .frame import Progress, SectionResult, Table
from .rows import Goal, Quantity, Row
from .timing import in_empty_context, percentile


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from .scale import Scale


__all__ = ["STEPS", "load_section"]

SLOTS = 20
WORK_S = 0.05
CAPACITY = SLOTS / WORK_S  # requests per second
USERS = 50
# The policy: a request may wait at most this share of one request's work.
WAIT_SHARE = 0.4
MAX_WAITING = SLOTS // 2
# Each user may go at three times its share of the normal load, in bursts of 5.
RATE_PER_USER = 3 * 0.5 * CAPACITY / USERS
BURST = 5
NORMAL = 0.5  # the normal load, as a share of capacity
SPIKE = 10.0  # the spike's load, as a multiple of capacity
SPIKE_S = 2.0
# Below capacity, Poisson arrivals still queue now and then: the share of
# them that may be refused rather than wait past the policy's timeout.
SUSTAINED_REFUSED = 0.02
GOODPUT_TARGET = 0.8  # the goodput at the top of the stress run, as a share of capacity
# The load, as a multiple of capacity, up to which the policy must keep the
# P99 within target (beyond it, refusing alone takes the CPU).
BREAKING_TARGET = 10.0
P99_TARGET = 1.5  # the admitted requests' P99 under load, over the unloaded P99
RECOVERY_TARGET_S = 1.0
WINDOW_S = 0.1  # the windows recovery is judged in
STRESS_STEPS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
BREAKER_FAILURES = 5
BREAKER_COOL_DOWN_S = 0.5

STEPS = ("unloaded", "sustained load", "spike", "stress", "failing backend")


@attrs.define
class _Run:
    """
    What one open-loop run measured: per request its arrival (seconds from
    the start), its outcome and, when served, its latency.
    """

    arrivals: list[float] = attrs.Factory(list[float])
    outcomes: list[str] = attrs.Factory(list[str])
    latencies: list[float] = attrs.Factory(list[float])  # -1 when not served
    peak_waiting: int = 0
    unfinished: int = 0
    wall_s: float = 0.0

    def served(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """
        The latencies, in ms, of the requests served that arrived from
        *start* to *end*.
        """
        return [
            lat * 1e3
            for at, lat in zip(self.arrivals, self.latencies, strict=True)
            if lat >= 0 and start <= at < end
        ]

    def count(self, outcome: str) -> int:
        """
        How many requests ended with *outcome*.
        """
        return self.outcomes.count(outcome)

    def p99(self, start: float = 0.0, end: float = float("inf")) -> float:
        """
        The P99 latency in ms of the requests served that arrived from
        *start* to *end*, or infinity if none was.
        """
        served = self.served(start, end)
        return percentile(served, 99) if served else float("inf")

    def figures(self) -> dict[str, Any]:
        """
        The run's figures for the JSON output.
        """
        served = self.served()
        return {
            "requests": len(self.arrivals),
            "served": len(served),
            "by_outcome": {o: self.count(o) for o in sorted(set(self.outcomes))},
            "p50_ms": percentile(served, 50) if served else None,
            "p99_ms": percentile(served, 99) if served else None,
            "peak_waiting": self.peak_waiting,
            "unfinished": self.unfinished,
            "wall_s": self.wall_s,
        }


def _engine(ctx: UserContext) -> int:  # noqa: ARG001  # the same engine for everyone
    return 1


def _factory(*, policy: bool) -> EngineFactory[int]:
    """
    The simulated service's factory, with the admission policy or without.
    """
    if not policy:
        return EngineFactory(_engine, per_user=SLOTS, total=SLOTS)
    admission = Admission(
        rate=LocalRateLimiter(RATE_PER_USER, burst=BURST),
        shed=Shed(max_waiting=MAX_WAITING),
    )
    return EngineFactory(
        _engine,
        per_user=SLOTS,
        total=SLOTS,
        timeout=WAIT_SHARE * WORK_S,
        admission=admission,
    )


def _outcome(refusal: Exception) -> str:
    """
    How a refused request ended, by its refusal.
    """
    if isinstance(refusal, LoadShedError):
        return f"shed_{refusal.reason}"
    return "rate_limited" if isinstance(refusal, RateLimitedError) else "timed_out"


async def _drive(
    factory: EngineFactory[int], phases: Sequence[tuple[float, float]], *, grace_s: float
) -> _Run:
    """
    Send Poisson arrivals through *factory*: for each of *phases*, ``(seconds,
    requests per second)``; then wait up to *grace_s* for the requests still
    running, and cancel the rest (counted as unfinished).
    """
    run = _Run()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time()

    async def request(i: int, ctx: UserContext, at: float) -> None:
        try:
            async with factory.engine(ctx):
                await asyncio.sleep(WORK_S)
        except (LoadShedError, RateLimitedError, QuotaTimeoutError) as e:
            run.outcomes[i] = _outcome(e)
            return
        run.outcomes[i] = "served"
        run.latencies[i] = loop.time() - start - at

    async def sample() -> None:
        quota = factory.quota
        while True:
            run.peak_waiting = max(run.peak_waiting, quota.stats().waiting)
            await asyncio.sleep(0.01)

    sampler = loop.create_task(sample())
    async for i, ctx, at in _arrivals(run, phases, start):
        task = loop.create_task(request(i, ctx, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=grace_s)
    # A task may be done with its callback still to run: not unfinished.
    left = [task for task in tasks if not task.done()]
    run.unfinished = len(left)
    for task in left:
        task.cancel()
    if tasks:
        await asyncio.wait(set(tasks))
    sampler.cancel()
    run.wall_s = loop.time() - start
    return run


async def _arrivals(
    run: _Run, phases: Sequence[tuple[float, float]], start: float
) -> AsyncIterator[tuple[int, UserContext, float]]:
    """
    Yield each request when it arrives, with its index in *run*, its user's
    context and its arrival time, the same in every run.
    """
    rng = random.Random(15)  # noqa: S311  # the same arrivals in every run, not a secret
    ctxs = [UserContext(user_id=f"u-{i}", thread_id="t-1", run_id="r-1") for i in range(USERS)]
    loop = asyncio.get_running_loop()
    at = end = 0.0
    for seconds, rate in phases:
        end += seconds
        at += rng.expovariate(rate)
        while at < end:
            delay = start + at - loop.time()
            if delay > 0.001:  # the loop's timers are no finer
                await asyncio.sleep(delay)
            run.arrivals.append(at)
            run.outcomes.append("unfinished")
            run.latencies.append(-1.0)
            yield len(run.arrivals) - 1, ctxs[rng.randrange(USERS)], at
            at += rng.expovariate(rate)
        at = end


def _run(phases: Sequence[tuple[float, float]], *, policy: bool, grace_s: float) -> _Run:
    return in_empty_context(
        lambda: asyncio.run(_drive(_factory(policy=policy), phases, grace_s=grace_s))
    )


def _recovery(run: _Run, after: float, until: float, unloaded_p99: float) -> float:
    """
    Seconds from *after* until the windows of arrivals are healthy for good
    (every request served, P99 within target), or infinity if they never
    are before *until*.
    """
    windows: list[tuple[float, bool]] = []
    t = after
    while t + WINDOW_S <= until + 1e-9:
        arrived = [i for i, a in enumerate(run.arrivals) if t <= a < t + WINDOW_S]
        served = [run.latencies[i] * 1e3 for i in arrived if run.latencies[i] >= 0]
        healthy = len(served) == len(arrived) and (
            not served or percentile(served, 99) <= P99_TARGET * unloaded_p99
        )
        windows.append((t, healthy))
        t += WINDOW_S
    recovered = float("inf")
    for t, healthy in reversed(windows):
        if not healthy:
            break
        recovered = t - after
    return recovered


def _q(value: float, unit: str) -> Quantity:
    """
    A figure, with "never" or "none served" (infinity) as a billion.
    """
    return Quantity(min(value, 1e9), unit)


def _finite(value: float) -> float | None:
    """
    *value*, or `None` (in the JSON) for "none served".
    """
    return None if value == math.inf else value


def _ms(value: float) -> str:
    return "none served" if value == float("inf") else f"{value:.1f} ms"


def _s(value: float, within: float) -> str:
    return f"> {within:.1f} s" if value == float("inf") else f"{value:.1f} s"


@attrs.frozen
class _Plan:
    """
    The durations of one report run, in seconds.
    """

    unloaded: float
    sustained: float
    calm: float
    spike: float
    step: float


def _plan(scale: Scale) -> _Plan:
    k = scale.load_seconds
    # The unloaded run and the stress steps need enough requests for a P99.
    return _Plan(
        unloaded=max(1.0, k), sustained=2 * k, calm=k, spike=SPIKE_S * k, step=max(0.25, 0.5 * k)
    )


def _unloaded(out: Table, plan: _Plan) -> float:
    # A short overload first, whose figures are dropped: what a process does
    # once (imports on the first refusal, the first timers) is not load.
    _run([(0.1, 2 * CAPACITY)], policy=True, grace_s=1.0)
    run = _run([(plan.unloaded, 0.1 * CAPACITY)], policy=True, grace_s=1.0)
    p99 = run.p99()
    out.figures["unloaded"] = run.figures()
    out.rows.append(
        Row(
            id="load.unloaded_p99",
            kind="info",
            metric=(
                f"Unloaded: {0.1 * CAPACITY:.0f} requests/s (10% of capacity), "
                f"{WORK_S * 1e3:g} ms of work each: P99 latency"
            ),
            target="the reference of every P99 target below",
            achieved=f"{_ms(p99)} ({len(run.served())} served)",
            value=_q(p99, "ms"),
        )
    )
    return p99


def _sustained(out: Table, plan: _Plan, unloaded: float) -> None:
    rate = 0.8 * CAPACITY
    runs = {p: _run([(plan.sustained, rate)], policy=p, grace_s=1.0) for p in (False, True)}
    out.figures["sustained"] = {("on" if p else "off"): r.figures() for p, r in runs.items()}
    on, off = runs[True], runs[False]
    refused = 1 - len(on.served()) / max(1, len(on.arrivals))
    ok = on.p99() <= P99_TARGET * unloaded and refused <= SUSTAINED_REFUSED
    out.rows.append(
        Row(
            id="load.sustained",
            kind="performance",
            metric=(
                f"Sustained: {rate:.0f} requests/s (80% of capacity) for {plan.sustained:g} s, "
                "policy off vs on: P99, refused"
            ),
            target=f"on: P99 ≤ {P99_TARGET:g}x unloaded, ≤ {SUSTAINED_REFUSED:.0%} refused",
            achieved=(f"off {_ms(off.p99())}; on **{_ms(on.p99())}**, {refused:.1%} refused"),
            ok=ok,
            value=_q(on.p99() / unloaded, "x"),
            goal=Goal("<=", P99_TARGET, "x"),
            details={
                "p99_off": _q(off.p99(), "ms"),
                "p99_on": _q(on.p99(), "ms"),
                "refused_on": Quantity(refused * 100, "%"),
            },
        )
    )


def _spike(out: Table, plan: _Plan, unloaded: float) -> None:
    normal, spike = NORMAL * CAPACITY, SPIKE * CAPACITY
    phases = [(plan.calm, normal), (plan.spike, spike), (2 * plan.calm, normal)]
    spike_start, spike_end = plan.calm, plan.calm + plan.spike
    end = spike_end + 2 * plan.calm
    runs = {p: _run(phases, policy=p, grace_s=plan.calm) for p in (False, True)}
    on, off = runs[True], runs[False]
    out.figures["spike"] = {("on" if p else "off"): r.figures() for p, r in runs.items()}
    p99 = {p: r.p99(spike_start, spike_end) for p, r in runs.items()}
    recovery = {p: _recovery(r, spike_end, end, unloaded) for p, r in runs.items()}
    refused = {
        o: on.count(o)
        for o in ("rate_limited", "shed_queue", "shed_deadline", "shed_user_queue", "timed_out")
    }
    during = f"{spike:.0f} requests/s ({SPIKE:g}x capacity) for {plan.spike:g} s"
    out.rows += [
        Row(
            id="load.spike_p99",
            kind="performance",
            metric=f"Spike: {during}, policy off vs on: P99 of the requests served",
            target=f"on: ≤ {P99_TARGET:g}x unloaded ({P99_TARGET * unloaded:.1f} ms)",
            achieved=f"off {_ms(p99[False])}; on **{_ms(p99[True])}**",
            ok=p99[True] <= P99_TARGET * unloaded,
            value=_q(p99[True] / unloaded, "x"),
            goal=Goal("<=", P99_TARGET, "x"),
            details={
                "p99_off": _q(p99[False], "ms"),
                "p99_on": _q(p99[True], "ms"),
            },
        ),
        Row(
            id="load.spike_recovery",
            kind="performance",
            metric=(
                "Spike: time after it until every request is served within target again, "
                "policy off vs on"
            ),
            target=f"on: ≤ {RECOVERY_TARGET_S:g} s",
            achieved=(
                f"off {_s(recovery[False], end - spike_end)}; "
                f"on **{_s(recovery[True], end - spike_end)}**"
            ),
            ok=recovery[True] <= RECOVERY_TARGET_S,
            value=_q(recovery[True], "s"),
            goal=Goal("<=", RECOVERY_TARGET_S, "s"),
        ),
        Row(
            id="load.spike_queue",
            kind="info",
            metric="Spike: peak queue, requests refused (by reason), unfinished, policy off vs on",
            target="off: the queue and latency grow; on: refused at once, counted by reason",
            achieved=(
                f"off: queue {off.peak_waiting}, {off.unfinished} unfinished; on: queue "
                f"{on.peak_waiting}, " + ", ".join(f"{n} {o}" for o, n in refused.items() if n)
            ),
            value=Quantity(on.peak_waiting, "requests"),
            details={
                "peak_waiting_off": Quantity(off.peak_waiting, "requests"),
                "peak_waiting_on": Quantity(on.peak_waiting, "requests"),
                "unfinished_off": Quantity(off.unfinished, "requests"),
                **{f"{o}_on": Quantity(n, "requests") for o, n in refused.items()},
            },
        ),
    ]


def _stress(out: Table, plan: _Plan, unloaded: float) -> None:
    phases = [(plan.step, share * CAPACITY) for share in STRESS_STEPS]
    runs = {p: _run(phases, policy=p, grace_s=plan.step) for p in (False, True)}
    steps: dict[str, list[dict[str, Any]]] = {}
    breaking: dict[bool, float | None] = {}
    for p, run in runs.items():
        rows: list[dict[str, Any]] = []
        breaking[p] = None
        for n, share in enumerate(STRESS_STEPS):
            lo, hi = n * plan.step, (n + 1) * plan.step
            served = run.served(lo, hi)
            p99 = run.p99(lo, hi)
            goodput = len(served) / plan.step
            rows.append({"load": share, "goodput_per_s": goodput, "p99_ms": p99})
            if breaking[p] is None and p99 > P99_TARGET * unloaded:
                breaking[p] = share
        steps["on" if p else "off"] = rows
    out.figures["stress"] = {
        side: [{**step, "p99_ms": _finite(step["p99_ms"])} for step in rows]
        for side, rows in steps.items()
    }
    top_on = steps["on"][-1]
    broke_on = breaking[True]
    held = broke_on is None or broke_on >= BREAKING_TARGET
    ok = held and top_on["goodput_per_s"] >= GOODPUT_TARGET * CAPACITY

    def broke(share: float | None) -> str:
        return "never" if share is None else f"{share:g}x"

    out.rows.append(
        Row(
            id="load.stress",
            kind="performance",
            metric=(
                "Stress: load stepped "
                + ", ".join(f"{s:g}x" for s in STRESS_STEPS)
                + f" capacity, {plan.step:g} s each, policy off vs on: where P99 first passes "
                f"{P99_TARGET:g}x unloaded; at {STRESS_STEPS[-1]:g}x, goodput and P99"
            ),
            target=(
                f"on: P99 within target up to ≥ {BREAKING_TARGET:g}x, goodput at "
                f"{STRESS_STEPS[-1]:g}x ≥ {GOODPUT_TARGET:.0%} of capacity"
            ),
            achieved=(
                f"off breaks at {broke(breaking[False])}, at the top "
                f"{steps['off'][-1]['goodput_per_s']:.0f}/s, {_ms(steps['off'][-1]['p99_ms'])}; "
                f"on breaks at {broke(breaking[True])}, at the top "
                f"**{top_on['goodput_per_s']:.0f}/s, {_ms(top_on['p99_ms'])}**"
            ),
            ok=ok,
            value=Quantity(top_on["goodput_per_s"] / CAPACITY * 100, "%"),
            goal=Goal(">=", 80, "%"),
            details={
                "capacity": Quantity(CAPACITY, "requests/s"),
                "p99_top_on": _q(top_on["p99_ms"], "ms"),
                "p99_top_off": _q(steps["off"][-1]["p99_ms"], "ms"),
            },
        )
    )


async def _failing_backend() -> dict[str, Any]:
    """
    Requests every 5 ms against a backend that is down for a while, then
    heals: count the calls of create while the breaker was open, and time
    the recovery after the backend healed.
    """
    down = True
    calls = 0

    def create(ctx: UserContext) -> int:  # noqa: ARG001  # the same for everyone
        nonlocal calls
        calls += 1
        if down:
            msg = "the engine backend is down"
            raise ConnectionError(msg)
        return 1

    breaker = CircuitBreaker(failures=BREAKER_FAILURES, within=1.0, cool_down=BREAKER_COOL_DOWN_S)
    factory = EngineFactory(create, admission=Admission(breaker=breaker))
    ctx = UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")
    outcomes: list[str] = []
    healed_at = recovered_at = None
    failures_before_open = None
    start = time.monotonic()
    while recovered_at is None and time.monotonic() - start < 10:  # a bound
        now = time.monotonic() - start
        if healed_at is None and now >= 2 * BREAKER_COOL_DOWN_S:
            down = False
            healed_at = now
        try:
            async with factory.engine(ctx):
                pass
        except ConnectionError:
            outcomes.append("failed")
        except CircuitOpenError:
            if failures_before_open is None:
                failures_before_open = outcomes.count("failed")
            outcomes.append("refused")
        else:
            outcomes.append("served")  # only once healed
            recovered_at = time.monotonic() - start
        await asyncio.sleep(0.005)
    return {
        "failures_before_open": failures_before_open,
        "calls": calls,
        "requests": len(outcomes),
        "refused": outcomes.count("refused"),
        "failed": outcomes.count("failed"),
        "healed_at_s": healed_at,
        "recovered_after_s": None if recovered_at is None else recovered_at - (healed_at or 0),
        "opened": breaker.stats().opened,
    }


def _breaker(out: Table) -> None:
    r = in_empty_context(lambda: asyncio.run(_failing_backend()))
    out.figures["failing_backend"] = r
    recovered = r["recovered_after_s"]
    limit = BREAKER_COOL_DOWN_S + 0.1
    ok = (
        r["failures_before_open"] == BREAKER_FAILURES
        and r["calls"] == r["failed"] + (r["requests"] - r["refused"] - r["failed"])
        and recovered is not None
        and recovered <= limit
    )
    out.rows.append(
        Row(
            id="load.breaker",
            kind="correctness",
            metric=(
                f"Failing backend, a request every 5 ms: breaker of {BREAKER_FAILURES} failures, "
                f"{BREAKER_COOL_DOWN_S:g} s cool-down"
            ),
            target=(
                f"opens after {BREAKER_FAILURES} failures, no create while open, serves again "
                f"≤ {limit:g} s after the backend heals"
            ),
            achieved=(
                f"opened after {r['failures_before_open']}, {r['refused']} refused at once, "
                f"{r['calls']} creates for {r['requests']} requests, served again after "
                + ("never" if recovered is None else f"{recovered:.2f} s")
            ),
            ok=ok,
            value=_q(math.inf if recovered is None else recovered, "s"),
            goal=Goal("<=", limit, "s"),
            details={
                "refused": Quantity(r["refused"], "requests"),
                "creates": Quantity(r["calls"], "calls"),
            },
        )
    )


def load_section(scale: Scale, progress: Progress) -> SectionResult:
    """
    Measure the service under load with the admission policy off and on.
    """
    out = progress.table("load")
    plan = _plan(scale)
    progress("load", STEPS[0])
    unloaded = _unloaded(out, plan)
    progress("load", STEPS[1])
    _sustained(out, plan, unloaded)
    progress("load", STEPS[2])
    _spike(out, plan, unloaded)
    progress("load", STEPS[3])
    _stress(out, plan, unloaded)
    progress("load", STEPS[4])
    _breaker(out)
    notes = (
        (
            f"The simulated service: {SLOTS} engines in all, {WORK_S * 1e3:g} ms of work per "
            f"request, so a capacity of {CAPACITY:.0f} requests/s; {USERS} users; Poisson "
            "arrivals at the offered rate, whatever the answers (open loop). Latency counts "
            "from arrival to the end of the request."
        ),
        (
            "Policy off: no admission policy, requests wait as long as it takes. Policy on: "
            f"`Admission(rate=LocalRateLimiter({RATE_PER_USER:g}, burst={BURST}), "
            f"shed=Shed(max_waiting={MAX_WAITING}))` and a factory timeout of "
            f"{WAIT_SHARE * WORK_S * 1e3:g} ms, so a request is refused at once when it "
            "cannot be served in time."
        ),
        (
            "A run with the policy off stops waiting for its backlog after the last phase "
            "(plus a grace period) and counts what is left as unfinished."
        ),
    )
    return SectionResult(tuple(out.rows), out.figures, notes)

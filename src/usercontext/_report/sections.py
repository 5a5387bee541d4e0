"""
The sections of ``usercontext report``, in the order the report runs them.

Each section is one entry of `SECTIONS`, on lines of its own, with what the
legacy report claimed for it and about how long it runs at the default scale.
"""

from __future__ import annotations

from . import across, contexts, db, engines, events, http, load, memory, stability
from .frame import Section


__all__ = ["SECTIONS"]

SECTIONS: tuple[Section, ...] = (
    Section(
        "contexts",
        "Contexts",
        contexts.STEPS,
        contexts.contexts_section,
        legacy="~0.15 ms per context, 4,000+ contexts/s, ~0.3 KB per context.",
        estimate_s=9,
    ),
    Section(
        "engines",
        "Engines and quotas",
        engines.STEPS,
        engines.engines_section,
        legacy=(
            "~8 ms to create an engine and ~2 ms to clean it up, 50+ concurrent engines, at "
            "most 2 engines per user."
        ),
        estimate_s=6,
    ),
    Section(
        "db",
        "Database sessions",
        db.STEPS,
        db.db_section,
        legacy=(
            "~200 transactions/s, 0 connection leaks, 100+ concurrent connections, 1,000 "
            "connections closed in 100 lifecycle cycles."
        ),
        estimate_s=5,
    ),
    Section(
        "events",
        "Event dispatch",
        events.STEPS,
        events.events_section,
        legacy=(
            "~2,000+ events/s, queues bounded per user, sub-millisecond event processing, no "
            "dispatch failure."
        ),
        estimate_s=4,
    ),
    Section(
        "http",
        "Concurrent HTTP requests",
        http.STEPS,
        http.http_section,
        legacy=(
            "1,000 simultaneous requests of 100 users, ~10 ms of work each: 98.7% success, "
            "P50/P95/P99 of 45/125/250 ms, 35 MB of growth, ~8.5 s in all, no cross-user "
            "contamination."
        ),
        estimate_s=6,
    ),
    Section(
        "load",
        "Load",
        load.STEPS,
        load.load_section,
        legacy=(
            "Sustained 10 requests/s for 60 s: 42 ms average, 0.3% errors; a spike from 0 to "
            "500 requests/s: 97.4% served, 340 ms at peak, 12 s to recover; a breaking point "
            "at ~800 concurrent requests."
        ),
        estimate_s=10,
    ),
    Section(
        "memory",
        "Memory and leak cycles",
        memory.STEPS,
        memory.memory_section,
        legacy=(
            "102 MB idle, 145 MB with 10 active users, 320 MB with 100; over 100 cycles of 10 "
            "requests, 6 MB of growth (limit 20 MB), a peak of 137 MB, 85% of it recovered."
        ),
        estimate_s=6,
    ),
    Section(
        "stability",
        "Throughput and stability",
        stability.STEPS,
        stability.stability_section,
        legacy=(
            "1,000+ requests/s, a breaking point at ~800 concurrent requests; 30 minutes at 50 "
            "requests/s with response times degrading by under 5% and memory growth 'linear, "
            "bounded'."
        ),
        estimate_s=11,
    ),
    Section(
        "across",
        "Across processes",
        across.STEPS,
        across.across_section,
        legacy="none: the legacy system ran in one process; scaling out was a plan.",
        estimate_s=4,
    ),
)

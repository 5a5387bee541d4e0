"""
The sections of ``usercontext report``, in the order the report runs them.
"""

from __future__ import annotations

from . import across, contexts, db, engines, events, http, load
from .frame import Section


__all__ = ["SECTIONS"]

SECTIONS: tuple[Section, ...] = (
    Section("contexts", "Contexts", contexts.STEPS, contexts.contexts_section),
    Section("engines", "Engines and quotas", engines.STEPS, engines.engines_section),
    Section("db", "Database sessions", db.STEPS, db.db_section),
    Section("events", "Event dispatch", events.STEPS, events.events_section),
    Section("http", "Concurrent HTTP requests", http.STEPS, http.http_section),
    Section("load", "Load", load.STEPS, load.load_section),
    Section("across", "Across processes", across.STEPS, across.across_section),
)

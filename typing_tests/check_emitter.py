# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of `EmitterHub`, `Emitter` and `Event`, checked by mypy and pyright.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import usercontext as uc


ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
hub = uc.EmitterHub()
emitter = hub.emitter(ctx)
assert_type(emitter, uc.Emitter)
assert_type(emitter.user_id, str)

event = emitter.emit_nowait("agent_started", {"agent": "triage"})
assert_type(event, uc.Event)
assert_type(event.type, str)
assert_type(event.data, Any)
assert_type(event.seq, int)
assert_type(event.event_id, str)
assert_type(event.ts, float)
assert_type(event.user_id, str)
assert_type(event.thread_id, str | None)
assert_type(event.run_id, str | None)
assert_type(event.request_id, str | None)
emitter.emit_nowait(1)  # type: ignore[arg-type]


async def use_emitter() -> None:
    assert_type(await emitter.emit("agent_completed"), uc.Event)
    assert_type(await emitter.emit("tick", {"n": 1}, timeout=1.0), uc.Event)
    async with uc.EmitterHub() as scoped:
        assert_type(scoped, uc.EmitterHub)

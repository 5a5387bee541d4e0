"""
The lean reference of a sync scope gives the guarantees it stands for: what
`benchmarks/instructions.py` measures as the sync scope's physical limit must
do the job of a `usercontext.Scope`, or the limit would be too low.
"""

from __future__ import annotations

import contextvars
import gc
import sys
import warnings

from typing import TYPE_CHECKING

import pytest

from usercontext import UserContext
from usercontext._report.floors import floor_var
from usercontext._report.lean_scope import LeanCounts, LeanScope


if TYPE_CHECKING:
    from collections.abc import Iterator

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

ALICE = UserContext(user_id="alice", thread_id="t-1", run_id="r-1")
BOB = UserContext(user_id="bob", thread_id="t-1", run_id="r-1")


def _scope(log: list[str], ctx: UserContext = ALICE) -> tuple[LeanScope, LeanCounts]:
    def session(ctx: UserContext) -> Iterator[str]:
        log.append(f"open {ctx.user_id}")
        yield f"session of {ctx.user_id}"
        log.append("close session")

    def broken(_ctx: UserContext) -> Iterator[str]:
        yield "broken"
        msg = "commit failed"
        raise ValueError(msg)

    def twice(_ctx: UserContext) -> Iterator[str]:
        yield "first"
        yield "second"

    def empty(_ctx: UserContext) -> Iterator[str]:
        yield from ()

    counts = LeanCounts()
    makers = {"session": session, "broken": broken, "twice": twice, "empty": empty}
    providers = {key: (make, [0, 0]) for key, make in makers.items()}
    return LeanScope(providers, ctx, counts), counts


def test_a_resource_is_made_once_bound_to_its_user_and_closed_with_counts() -> None:
    log: list[str] = []
    scope, counts = _scope(log)
    with scope as entered:
        assert floor_var.get() is ALICE
        assert entered.get("session") == "session of alice"
        assert entered.get("session") == "session of alice"
        assert log == ["open alice"]
    assert log == ["open alice", "close session"]
    assert floor_var.get(None) is None
    assert (counts.entered, counts.left) == (1, 1)
    assert scope._providers["session"][1] == [1, 1]


def test_entered_once_and_not_inside_another_users_binding() -> None:
    scope, _ = _scope([])
    with scope:
        pass
    with pytest.raises(RuntimeError, match="entered once"):
        scope.__enter__()
    other, counts = _scope([])
    token = floor_var.set(BOB)
    try:
        with pytest.raises(RuntimeError, match="Another user"):
            other.__enter__()
    finally:
        floor_var.reset(token)
    assert counts.entered == 0


def test_resources_only_while_open_and_for_its_own_user() -> None:
    scope, _ = _scope([])
    with pytest.raises(RuntimeError, match="not open"):
        scope.get("session")
    with scope:
        child = ALICE.child()
        token = floor_var.set(child)
        try:
            assert scope.get("session") == "session of alice"  # a child of the same user
        finally:
            floor_var.reset(token)
        # A thread started without a context binds nothing.
        assert contextvars.Context().run(scope.get, "session") == "session of alice"
        token = floor_var.set(BOB)
        try:
            with pytest.raises(RuntimeError, match="Another user"):
                scope.get("session")
        finally:
            floor_var.reset(token)
    with pytest.raises(RuntimeError, match="not open"):
        scope.get("session")


def test_a_provider_that_does_not_yield_is_refused() -> None:
    scope, _ = _scope([])
    with scope, pytest.raises(RuntimeError, match="did not yield"):
        scope.get("empty")
    assert scope._providers["empty"][1] == [0, 0]


def test_every_cleanup_runs_in_reverse_and_failures_are_raised_together() -> None:
    log: list[str] = []
    scope, counts = _scope(log)
    with pytest.raises(ExceptionGroup) as caught, scope:  # the scope's exit raises
        scope.get("session")
        scope.get("broken")
        scope.get("twice")
    messages = sorted(str(e) for e in caught.value.exceptions)
    assert messages == ["The generator yielded twice.", "commit failed"]
    assert log == ["open alice", "close session"]
    assert (counts.entered, counts.left) == (1, 1)
    assert [scope._providers[k][1] for k in ("session", "broken", "twice")] == [[1, 1]] * 3


def test_a_scope_dropped_open_warns_with_where_it_was_entered() -> None:
    scope, _ = _scope([])
    scope.__enter__()
    floor_var.reset(scope._token)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del scope
        gc.collect()
    assert len(caught) == 1
    assert caught[0].category is ResourceWarning
    assert __file__ in str(caught[0].message)
    assert "never closed" in str(caught[0].message)


def test_a_closed_scope_is_dropped_silently() -> None:
    scope, _ = _scope([])
    with scope:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del scope
        gc.collect()
    assert caught == []

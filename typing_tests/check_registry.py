# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of `Registry` and `Scope`, checked by mypy and pyright.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import assert_type

import usercontext as uc


if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Generator


class Session:
    def __init__(self, ctx: uc.UserContext) -> None:
        self.user_id = ctx.user_id


async def open_session(ctx: uc.UserContext) -> Session:
    return Session(ctx)


def session_with_cleanup(ctx: uc.UserContext) -> Generator[Session, None, None]:
    yield Session(ctx)


async def async_session_with_cleanup(ctx: uc.UserContext) -> AsyncGenerator[Session, None]:
    yield Session(ctx)


registry = uc.Registry()
registry.register(Session, Session)
registry.register(Session, open_session, replace=True)
registry.register(Session, session_with_cleanup, replace=True)
registry.register(Session, async_session_with_cleanup, replace=True)
registry.register("settings", lambda ctx: {"user": ctx.user_id})
registry.register(Session, 42)  # type: ignore[arg-type]

ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
assert_type(registry.scope(ctx), uc.Scope)

with registry.scope(ctx) as scope:
    assert_type(scope, uc.Scope)
    # A class as key gives an instance of that class; any other key gives Any.
    assert_type(scope.get(Session), Session)
    assert_type(scope.get("settings"), Any)


async def use_async_scope() -> None:
    async with registry.scope(ctx) as ascope:
        assert_type(ascope, uc.Scope)
        assert_type(await ascope.aget(Session), Session)
        assert_type(await ascope.aget("settings"), Any)


with registry.override(Session, Session(ctx)):
    pass

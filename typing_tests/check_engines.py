# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of the quotas and of `EngineFactory`, checked by mypy and pyright.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from typing_extensions import assert_type

import usercontext as uc


if TYPE_CHECKING:
    from collections.abc import AsyncGenerator


class Engine:
    def __init__(self, ctx: uc.UserContext) -> None:
        self.user_id = ctx.user_id


async def make_engine(ctx: uc.UserContext) -> Engine:
    return Engine(ctx)


@asynccontextmanager
async def engine_session(ctx: uc.UserContext) -> AsyncGenerator[Engine, None]:
    yield Engine(ctx)


async def use_factories(ctx: uc.UserContext) -> None:
    assert_type(uc.EngineFactory(Engine), uc.EngineFactory[Engine])
    from_coroutine = uc.EngineFactory(make_engine)
    assert_type(from_coroutine, uc.EngineFactory[Engine])
    from_manager = uc.EngineFactory(engine_session, per_user=lambda _user_id: 5, total=100)
    assert_type(from_manager, uc.EngineFactory[Engine])
    for factory in (uc.EngineFactory(Engine), from_coroutine, from_manager):
        assert_type(factory, uc.EngineFactory[Engine])
        async with factory.engine(ctx) as engine:
            assert_type(engine, Engine)
        with factory.engine() as sync_engine:
            assert_type(sync_engine, Engine)
        assert_type(factory.stats(), uc.FactoryStats)
        assert_type(factory.stats().top, tuple[tuple[str, int], ...])
        assert_type(factory.quota, uc.Quota)
        await factory.aclose()

    uc.EngineFactory(Engine, timeout="5")  # type: ignore[call-overload]


try:
    uc.ThreadQuota().acquire_nowait("u-42")
except uc.QuotaError as error:
    assert_type(error.key, str)
    assert_type(error.limit, int)
    assert_type(error.waited, float)
    assert_type(error.timeout, float | None)

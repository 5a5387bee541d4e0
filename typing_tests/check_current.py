# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of the current context and of the propagation helpers, checked by mypy and pyright.
"""

from __future__ import annotations

import concurrent.futures

from typing import TYPE_CHECKING, Any

from typing_extensions import assert_type

import usercontext as uc


if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine


ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")

assert_type(uc.current(), uc.UserContext)
assert_type(uc.current_or_none(), uc.UserContext | None)

with uc.bind(ctx) as bound:
    assert_type(bound, uc.UserContext)


async def use_async_bind() -> None:
    async with uc.bind(ctx) as abound:
        assert_type(abound, uc.UserContext)


uc.bind("u-42")  # type: ignore[arg-type]


def greet(name: str, /, *, excited: bool = False) -> str:
    return name + ("!" if excited else "")


async def fetch(key: str, retries: int = 3) -> bytes:
    return key.encode() * retries


# bind as a decorator keeps the function's type.
assert_type(uc.bind(ctx)(greet)("x", excited=True), str)
uc.bind(ctx)(greet)(name="x")  # type: ignore[call-arg]
bound_fetch: Callable[[str, int], Coroutine[Any, Any, bytes]] = uc.bind(ctx)(fetch)

# wrap and isolated keep the signature through a ParamSpec.
wrapped = uc.wrap(greet)
assert_type(wrapped("x"), str)
assert_type(wrapped("x", excited=True), str)
wrapped(1)  # type: ignore[arg-type]
wrapped("x", shout=True)  # type: ignore[call-arg]

isolated = uc.isolated(greet)
assert_type(isolated("x", excited=True), str)
isolated(name="x")  # type: ignore[call-arg]

isolated_async = uc.isolated(fetch)


async def use_async_helpers() -> None:
    assert_type(await uc.bind(ctx)(fetch)("k"), bytes)
    assert_type(await isolated_async("k", retries=1), bytes)
    await isolated_async("k", retries="1")  # type: ignore[arg-type]
    # to_thread returns what the function returns.
    assert_type(await uc.to_thread(greet, "x"), str)
    assert_type(await uc.to_thread(uc.current), uc.UserContext)
    assert_type(await uc.to_thread(len, "abc", abandon_on_cancel=True), int)


with uc.ContextExecutor(concurrent.futures.ThreadPoolExecutor()) as pool:
    assert_type(pool, uc.ContextExecutor)
    assert_type(pool.submit(greet, "x"), concurrent.futures.Future[str])
    assert_type(pool.submit(uc.current).result(), uc.UserContext)

uc.ContextExecutor(concurrent.futures.ProcessPoolExecutor(), processes=True).shutdown()
uc.ContextExecutor(pool, processes="yes")  # type: ignore[arg-type]

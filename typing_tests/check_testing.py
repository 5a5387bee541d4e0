# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of the test kit in `usercontext.testing`, checked by mypy and pyright.
"""

from __future__ import annotations

from typing_extensions import assert_type

import usercontext as uc

from usercontext.testing import (
    ContextFactory,
    CrossUserObservation,
    IsolationChecker,
    IsolationReport,
    Leak,
    LeakGuard,
)


contexts = ContextFactory(prefix="tenant")
assert_type(contexts.make(user_id="alice"), uc.UserContext)
assert_type(contexts.users(3), list[uc.UserContext])
assert_type(contexts.bind(), uc.UserContext)
assert_type(contexts.bind(contexts.make()), uc.UserContext)
contexts.unbind_all()

checker = IsolationChecker(users=contexts.users(2), per_user=1)
assert_type(checker.users, tuple[uc.UserContext, ...])
report = checker.check(lambda ctx: ctx.user_id)
assert_type(report, IsolationReport)
assert_type(report.results, dict[str, tuple[object, ...]])


async def handler(ctx: uc.UserContext) -> str:
    return ctx.user_id


async def main() -> None:
    assert_type(await IsolationChecker(users=4).acheck(handler), IsolationReport)


observation = CrossUserObservation("a", "b", "b", "result")
assert_type(observation.seen_user_id, str)

with LeakGuard(frames=8) as guard:
    assert_type(guard, LeakGuard)
assert_type(guard.stop(), list[Leak])
assert_type(Leak("hub", "a hub is running", None).where, str | None)

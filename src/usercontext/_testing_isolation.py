"""
`IsolationChecker`: run a callable as many users at once, and fail on any
call that observes another user's context or data.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
import threading

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs

from ._context import UserContext
from ._current import bind, current_or_none, isolated


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

__all__ = ["CrossUserObservation", "IsolationChecker", "IsolationReport"]

# ExceptionGroup is a builtin from Python 3.11 on; the backport (a dependency
# of anyio there) provides it before.
_ExceptionGroup: Any = (
    getattr(builtins, "ExceptionGroup", None)
    or importlib.import_module("exceptiongroup").ExceptionGroup
)

_MAX_DEPTH = 8
_START_TIMEOUT_S = 30.0


@attrs.frozen
class CrossUserObservation:
    """
    One call of `IsolationChecker` that observed another user.

    Attributes:
        user_id: The user the call ran for.
        seen_user_id: The other user it observed.
        value: What it observed: the string that names the other user, the
            other user's `usercontext.UserContext`, or the context bound when
            the call ended.
        where: Where in the call's result *value* was found (``"result"``,
            ``"result['user']"``, ``"bound at the end"``).

    .. versionadded:: 0.1.0
    """

    user_id: str
    seen_user_id: str
    value: object
    where: str

    def __str__(self) -> str:
        return (
            f"the call of user {self.user_id!r} saw user {self.seen_user_id!r}: "
            f"{self.where} is {self.value!r}"
        )


@attrs.frozen
class IsolationReport:
    """
    What an `IsolationChecker` run did, when no call observed another user.

    Attributes:
        users: The user ids, in order.
        calls: How many calls ran, over all users.
        results: Every call's result, per user id, in the order the calls
            finished.

    .. versionadded:: 0.1.0
    """

    users: tuple[str, ...]
    calls: int
    results: dict[str, tuple[object, ...]]


def _users(users: int | Sequence[UserContext]) -> list[UserContext]:
    if isinstance(users, int) and not isinstance(users, bool):
        if users < 2:  # noqa: PLR2004  # isolation needs another user to leak to
            msg = f"users must be at least 2 to check isolation between users, got {users}."
            raise ValueError(msg)
        width = len(str(users - 1))
        return [
            UserContext(user_id=f"u-{i:0{width}d}", thread_id=f"t-{i}", run_id=f"r-{i}")
            for i in range(users)
        ]
    given: list[object] = list(users) if isinstance(users, (list, tuple)) else [users]
    contexts = [c for c in given if isinstance(c, UserContext)]
    if len(contexts) != len(given):
        msg = (
            "users must be a number of users, or a list or tuple of usercontext.UserContext, "
            f"got {users!r}."
        )
        raise TypeError(msg)
    if len({c.user_id for c in contexts}) != len(contexts) or len(contexts) < 2:  # noqa: PLR2004
        msg = "users must hold at least two contexts, each of a different user."
        raise ValueError(msg)
    return contexts


def _observations(  # noqa: C901  # one branch per kind of value searched
    value: object, own: str, pattern: re.Pattern[str], where: str, depth: int = 0
) -> Iterator[tuple[str, object, str]]:
    """
    Yield ``(other user, value, where)`` for each part of *value* that names
    a user other than *own*.
    """
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, UserContext):
        if value.user_id != own:
            yield value.user_id, value, where
    elif isinstance(value, str):
        for match in pattern.finditer(value):
            if match.group(0) != own:
                yield match.group(0), value, where
                return
    elif isinstance(value, Mapping):
        mapping = cast("Mapping[object, object]", value)
        for key, item in mapping.items():
            yield from _observations(key, own, pattern, f"{where} key {key!r}", depth + 1)
            yield from _observations(item, own, pattern, f"{where}[{key!r}]", depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = cast("Iterable[object]", value)
        for i, item in enumerate(items):
            yield from _observations(item, own, pattern, f"{where}[{i}]", depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for name, item in vars(value).items():
            yield from _observations(item, own, pattern, f"{where}.{name}", depth + 1)


class IsolationChecker:
    """
    Run a callable as many users at once, and fail on any cross-user
    observation.

    `check` runs a sync callable in threads, `acheck` an async one in tasks
    (on asyncio or trio). Each call runs in a fresh Context with its user's
    context bound and gets that context as its argument; every call starts
    at the same time. A call observes another user when its result names one
    (a `usercontext.UserContext` of another user, or a string with another
    user's id as a whole word, anywhere in lists, tuples, sets, mappings and
    objects' attributes), or when another user's context is bound as it
    ends. Have the callable return what your code gave it: the session's
    user, the rows it read, the events it got.

    >>> import usercontext as uc
    >>> from usercontext.testing import IsolationChecker
    >>> cache = {}
    >>> def handler(ctx):
    ...     return cache.setdefault("greeting", f"hello {uc.current().user_id}")
    >>> IsolationChecker(users=3).check(handler)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    AssertionError: 4 cross-user observations in 6 calls of 3 users:
    - the call of user 'u-...' saw user 'u-...': result is 'hello u-...'
    ...

    Args:
        users: How many users (ids ``u-0``, ``u-1`` ... of one width), or the
            contexts to run as, each of a different user.
        per_user: How many calls of each user run at once.

    Raises:
        ValueError: If fewer than two users are given, or *per_user* is not
            a positive int.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, users: int | Sequence[UserContext] = 10, per_user: int = 2) -> None:
        if type(per_user) is not int or per_user < 1:
            msg = f"per_user must be a positive int, got {per_user!r}."
            raise ValueError(msg)
        self._contexts = _users(users)
        self._per_user = per_user
        ids = sorted((c.user_id for c in self._contexts), key=len, reverse=True)
        self._pattern = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, ids)) + r")(?![\w-])")

    @property
    def users(self) -> tuple[UserContext, ...]:
        """
        The contexts the calls run as, one per user.
        """
        return tuple(self._contexts)

    def check(self, fn: Callable[[UserContext], object]) -> IsolationReport:
        """
        Call *fn* in threads, *per_user* times for each user, all at once.

        Returns:
            What ran, when no call observed another user.

        Raises:
            AssertionError: If a call observed another user; the message names
                each call's user, the user seen and the value.
            ExceptionGroup: If calls raised, with their exceptions.
            TypeError: If *fn* is a coroutine function: use `acheck`.
        """
        __tracebackhide__ = True  # pytest shows the assertion, not this frame
        if inspect.iscoroutinefunction(fn):
            msg = f"check() runs sync callables in threads; use `await acheck({fn.__qualname__})`."
            raise TypeError(msg)
        calls = [c for c in self._contexts for _ in range(self._per_user)]
        barrier = threading.Barrier(len(calls))
        outcomes: list[tuple[UserContext, object, UserContext | None]] = []
        errors: list[BaseException] = []

        @isolated
        def run(ctx: UserContext) -> None:
            try:
                with bind(ctx):
                    barrier.wait(_START_TIMEOUT_S)
                    result = fn(ctx)
                    outcomes.append((ctx, result, current_or_none()))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(ctx,)) for ctx in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self._judge(outcomes, errors)

    async def acheck(self, fn: Callable[[UserContext], Awaitable[object]]) -> IsolationReport:
        """
        Call the async *fn* in tasks, *per_user* times for each user, all at
        once (each task starts its call once every task has started).

        Returns:
            What ran, when no call observed another user.

        Raises:
            AssertionError: If a call observed another user; the message names
                each call's user, the user seen and the value.
            ExceptionGroup: If calls raised, with their exceptions.
            TypeError: If *fn* is not a coroutine function: use `check`.
        """
        import anyio

        __tracebackhide__ = True
        if not inspect.iscoroutinefunction(fn):
            msg = f"acheck() runs coroutine functions in tasks; use check({fn!r}) for threads."
            raise TypeError(msg)
        calls = [c for c in self._contexts for _ in range(self._per_user)]
        outcomes: list[tuple[UserContext, object, UserContext | None]] = []
        errors: list[BaseException] = []
        started = anyio.Event()
        waiting = [len(calls)]

        @isolated
        async def run(ctx: UserContext) -> None:
            try:
                with bind(ctx):
                    waiting[0] -= 1
                    if not waiting[0]:
                        started.set()
                    await started.wait()
                    result = await fn(ctx)
                    outcomes.append((ctx, result, current_or_none()))
            except Exception as e:
                errors.append(e)

        async with anyio.create_task_group() as tg:
            for ctx in calls:
                tg.start_soon(run, ctx)
        return self._judge(outcomes, errors)

    def _judge(
        self,
        outcomes: list[tuple[UserContext, object, UserContext | None]],
        errors: list[BaseException],
    ) -> IsolationReport:
        __tracebackhide__ = True
        if errors:
            msg = f"{len(errors)} of {len(errors) + len(outcomes)} calls raised"
            raise _ExceptionGroup(msg, errors)
        seen: list[CrossUserObservation] = []
        for ctx, result, bound in outcomes:
            own = ctx.user_id
            if bound is not None and bound.user_id != own:
                seen.append(CrossUserObservation(own, bound.user_id, bound, "bound at the end"))
            seen += [
                CrossUserObservation(own, other, value, where)
                for other, value, where in _observations(result, own, self._pattern, "result")
            ]
        users = tuple(c.user_id for c in self._contexts)
        if seen:
            s = "s" if len(seen) != 1 else ""
            head = f"{len(seen)} cross-user observation{s} in {len(outcomes)} calls of "
            lines = [f"{head}{len(users)} users:", *(f"- {o}" for o in seen)]
            raise AssertionError("\n".join(lines))
        results: dict[str, list[object]] = {user: [] for user in users}
        for ctx, result, _ in outcomes:
            results[ctx.user_id].append(result)
        return IsolationReport(
            users=users,
            calls=len(outcomes),
            results={user: tuple(r) for user, r in results.items()},
        )

    def __repr__(self) -> str:
        return (
            f"<usercontext.testing.IsolationChecker(users={len(self._contexts)}, "
            f"per_user={self._per_user})>"
        )

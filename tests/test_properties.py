from __future__ import annotations

import concurrent.futures
import random

import anyio
import anyio.lowlevel

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usercontext import (
    ContextExecutor,
    InvalidContextError,
    UserContext,
    bind,
    current,
    current_or_none,
    to_thread,
)


USERS = 200
TASKS_PER_USER = 5
ROUNDS = 3
SUBTASKS = 2
# Per round: 2 checks in the task, 3 in each subtask, 1 in a thread, 1 in the executor.
CHECKS_PER_ROUND = 2 + 3 * SUBTASKS + 1 + 1
EXPECTED_CHECKS = USERS * TASKS_PER_USER * (ROUNDS * CHECKS_PER_ROUND + 1)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
ID_FIELDS = (
    "user_id",
    "thread_id",
    "run_id",
    "request_id",
    "connection_id",
    "parent_request_id",
)
HEADERS = (
    "x-usercontext-user-id",
    "x-usercontext-thread-id",
    "x-usercontext-run-id",
    "x-usercontext-request-id",
    "x-usercontext-connection-id",
    "x-usercontext-parent-request-id",
    "x-usercontext-depth",
    "x-usercontext-created-at",
    "x-usercontext-metadata",
)
any_value = st.one_of(st.text(), st.binary(), st.integers(), st.none(), st.floats())


def current_user():
    """
    Return the user_id bound in the running code, or None.
    """
    ctx = current_or_none()
    return None if ctx is None else ctx.user_id


class Observer:
    """
    Runs the tasks of the isolation property test and counts what they see.
    """

    def __init__(self, executor):
        self.executor = executor
        self.stats = {"checks": 0, "cross_user": 0, "cross_task": 0, "missing": 0}

    def check(self, observed, own):
        """
        Count one observation of *observed* by code that runs for *own*.
        """
        self.stats["checks"] += 1
        if observed is None:
            self.stats["missing"] += 1
        elif observed.user_id != own.user_id:
            self.stats["cross_user"] += 1
        elif observed.request_id not in (own.request_id, own.parent_request_id):
            self.stats["cross_task"] += 1

    @staticmethod
    async def pause(rng):
        """
        Yield to the scheduler, sometimes for a little while.
        """
        await anyio.sleep(rng.choice((0, 0, 0, 0.0005, 0.001)))

    async def subtask(self, own, seed):
        """
        A task in a nested task group: 3 checks, one under a child context.
        """
        rng = random.Random(seed)
        self.check(current_or_none(), own)
        await self.pause(rng)
        self.check(current_or_none(), own)
        with bind(own.child(run_id="sub")) as child:
            await self.pause(rng)
            self.check(current_or_none(), child)

    async def user_task(self, user, task):
        """
        One request of one user: ROUNDS rounds of CHECKS_PER_ROUND checks, and
        a last one.
        """
        rng = random.Random(user * 1000 + task)
        own = UserContext(user_id=f"user-{user}", thread_id=f"thread-{task}", run_id="run")
        async with bind(own):
            for _ in range(ROUNDS):
                self.check(current_or_none(), own)
                await self.pause(rng)
                self.check(current_or_none(), own)
                async with anyio.create_task_group() as tg:
                    for _ in range(SUBTASKS):
                        tg.start_soon(self.subtask, own, rng.random())
                self.check(await to_thread(current_or_none), own)
                future = self.executor.submit(current_or_none)
                self.check(await anyio.to_thread.run_sync(future.result), own)
            await self.pause(rng)
            self.check(current(), own)


class TestIsolationUnderConcurrency:
    async def test_no_cross_user_observation(self):
        """
        1,000 tasks of 200 users, with random awaits, nested task groups,
        worker threads and an executor, each only ever observe their own
        user's context; every planned check runs.
        """
        order = [(u, t) for u in range(USERS) for t in range(TASKS_PER_USER)]
        random.Random(42).shuffle(order)

        with ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=4)) as executor:
            observer = Observer(executor)
            async with anyio.create_task_group() as tg:
                for user, task in order:
                    tg.start_soon(observer.user_task, user, task)

        assert observer.stats == {
            "checks": EXPECTED_CHECKS,
            "cross_user": 0,
            "cross_task": 0,
            "missing": 0,
        }
        assert EXPECTED_CHECKS == 1000 * 31
        assert current_or_none() is None

    def test_observer_counts(self):
        """
        The observer counts every check and tells the kinds of wrong
        observation apart, so the property test cannot pass by seeing nothing.
        """
        own = UserContext(user_id="user-a", thread_id="t", run_id="r")
        observer = Observer(executor=None)

        child = own.child()
        observer.check(own, own)
        observer.check(child, child)
        observer.check(own, child)
        observer.check(None, own)
        observer.check(UserContext(user_id="user-b", thread_id="t", run_id="r"), own)
        observer.check(UserContext(user_id="user-a", thread_id="t", run_id="r"), own)

        assert observer.stats == {"checks": 6, "cross_user": 1, "cross_task": 1, "missing": 1}

    async def test_checker_detects_leaks(self):
        """
        The way the property test observes contexts notices a leak: a context
        bound without unbinding is seen by later code of the same task, though
        not by other tasks.
        """
        a = UserContext(user_id="user-a", thread_id="t", run_id="r")
        leaked = bind(a)

        async def leaky():
            leaked.__enter__()
            await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(leaky)
        assert current_user() is None

        await leaky()
        try:
            assert current_user() == "user-a"
        finally:
            leaked.__exit__(None, None, None)
        assert current_user() is None


class TestFuzz:
    @FUZZ
    @given(field=st.sampled_from(ID_FIELDS), value=any_value)
    def test_construct_and_round_trip(self, field, value):
        """
        Whatever an id holds, construction raises only InvalidContextError or
        TypeError; every context that constructs round-trips through the dict
        and header codecs.
        """
        kw = {"user_id": "u-1", "thread_id": "t-1", "run_id": "r-1", field: value}
        if field == "parent_request_id" and value is not None:
            kw["depth"] = 1
        try:
            ctx = UserContext(**kw)
        except (InvalidContextError, TypeError):
            return

        assert getattr(ctx, field) == value or (field == "request_id" and value is None)
        assert UserContext.from_dict(ctx.to_dict()) == ctx
        assert UserContext.from_headers(ctx.to_headers()) == ctx
        assert (
            UserContext.from_headers(
                [(k.encode(), v.encode()) for k, v in ctx.to_headers().items()]
            )
            == ctx
        )

    @FUZZ
    @given(
        user_id=st.text(min_size=1),
        thread_id=st.text(min_size=1),
        run_id=st.text(min_size=1),
    )
    def test_every_field_at_once(self, user_id, thread_id, run_id):
        """
        Arbitrary text in every required id raises only InvalidContextError or
        TypeError, or gives a context that round-trips.
        """
        try:
            ctx = UserContext(user_id=user_id, thread_id=thread_id, run_id=run_id).child()
        except (InvalidContextError, TypeError):
            return

        assert UserContext.from_dict(ctx.to_dict()) == ctx
        assert UserContext.from_headers(ctx.to_headers()) == ctx

    @FUZZ
    @given(
        metadata=st.dictionaries(
            st.text(min_size=1, max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3)
                ),
                max_leaves=10,
            ),
            max_size=5,
        )
    )
    def test_metadata_round_trip(self, metadata):
        """
        JSON-like metadata either is refused with InvalidContextError or
        TypeError, or round-trips through the dict codec, and through headers
        unless to_headers() refuses it with InvalidContextError.
        """
        try:
            ctx = UserContext(user_id="u-1", thread_id="t-1", run_id="r-1", metadata=metadata)
        except (InvalidContextError, TypeError):
            return

        assert UserContext.from_dict(ctx.to_dict()).to_dict() == ctx.to_dict()
        try:
            headers = ctx.to_headers()
        except InvalidContextError:
            return
        assert UserContext.from_headers(headers).to_dict() == ctx.to_dict()

    @FUZZ
    @given(
        pairs=st.lists(
            st.tuples(
                st.one_of(
                    st.sampled_from(HEADERS),
                    st.text().map(lambda s: "x-usercontext-" + s),
                    st.text(),
                ),
                st.text(),
            ),
            max_size=12,
        ),
        base=st.booleans(),
    )
    def test_from_headers(self, pairs, base):
        """
        Arbitrary x-usercontext-* headers raise only InvalidContextError or
        TypeError, or decode into a context that encodes back to an equal one.
        """
        if base:
            pairs = [
                ("x-usercontext-user-id", "u-1"),
                ("x-usercontext-thread-id", "t-1"),
                ("x-usercontext-run-id", "r-1"),
                *pairs,
            ]
        try:
            ctx = UserContext.from_headers(pairs)
        except (InvalidContextError, TypeError):
            return

        assert isinstance(ctx, UserContext)
        assert UserContext.from_dict(ctx.to_dict()) == ctx

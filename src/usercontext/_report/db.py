"""
The "Database sessions" section of ``usercontext report``.

It runs real transactions through `usercontext.sqlalchemy.session_provider` in
registry scopes: on a SQLite file (aiosqlite) in a temporary directory, and on
PostgreSQL (asyncpg) when ``USERCONTEXT_REPORT_POSTGRES_URL`` names one. It
times them against the same transactions on a session opened, committed and
closed by hand, then sends requests of which 30% fail and 20% are cancelled,
and checks with `usercontext.sqlalchemy.PoolWatch`, the pool's events and the
rows written that nothing leaked.

SQLAlchemy and the drivers come with the ``sqlalchemy`` extra. Without them the
section reports one info row that says so, and imports nothing else.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
import tempfile

from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from usercontext import Registry, Scope, UserContext

from .frame import Progress, SectionResult, Table
from .rows import Goal, Quantity, Row
from .timing import Comparison, LoopOp, fmt_ratio, in_empty_context


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    import sqlalchemy as sa

    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from usercontext.sqlalchemy import PoolWatch

    from .scale import Scale


__all__ = ["POSTGRES_URL_VAR", "STEPS", "db_section"]

POSTGRES_URL_VAR = "USERCONTEXT_REPORT_POSTGRES_URL"
STEPS = (
    "sqlite: throughput",
    "sqlite: failures and cancellations",
    f"postgresql (if {POSTGRES_URL_VAR} is set)",
)
INSTALL_HINT = "install usercontext[sqlalchemy] to measure database sessions"
LEGACY_TXN_PER_S = 200.0  # the legacy report: "~150 txn/sec" before, "~200 txn/sec" after
FAIL_SHARE, CANCEL_SHARE = 0.3, 0.2
CONCURRENCY = 10
CANCEL_AFTER_S = 0.005


@attrs.frozen
class _Sizes:
    pairs: int  # interleaved pairs of timed batches
    txns: int  # transactions per batch and task
    requests: int  # requests in the failures and cancellations scenario


def _sizes(scale: Scale) -> _Sizes:
    """
    Size the work from *scale*: the full report (100 repeats) times 12 pairs of
    batches and sends 200 requests; quicker runs do less.
    """
    if scale.repeats >= 50:  # between QUICK's 15 and DEFAULT's 60
        return _Sizes(pairs=12, txns=20, requests=200)
    return _Sizes(pairs=6, txns=10, requests=60)


@attrs.frozen
class _Backend:
    """
    A database to measure, and how.

    Args:
        name: Its name in the rows.
        url: Its SQLAlchemy URL, with an async driver.
        pool_size: The engine's pool size (no overflow).
        tasks: Concurrent tasks timing the throughput.
        slow_query: A query that runs long enough to be cancelled in its
            middle, or `None` to cancel between queries.
        connect_args: Passed to the driver's connect.
        pragmas: Statements run on the first connection, before the
            table is created.
    """

    name: str
    url: str | URL
    pool_size: int
    tasks: int
    slow_query: str | None
    connect_args: dict[str, Any] = attrs.Factory(dict[str, Any])
    pragmas: tuple[str, ...] = ()

    @property
    def application_name(self) -> str | None:
        """
        The application_name its connections show in pg_stat_activity, if set.
        """
        name: str | None = self.connect_args.get("server_settings", {}).get("application_name")
        return name


def _missing(*modules: str) -> list[str]:
    missing: list[str] = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:  # noqa: PERF203  # a few modules, once
            missing.append(name)
    return missing


def db_section(scale: Scale, progress: Progress) -> SectionResult:
    """
    Measure database sessions: throughput against a hand-written floor, and
    leaks under failing and cancelled requests, on SQLite and optionally on
    PostgreSQL.
    """
    missing = _missing("sqlalchemy", "aiosqlite", "greenlet")
    if missing:
        for step in STEPS:
            progress("database", step)
        return SectionResult(
            (
                Row(
                    id="db.not_measured",
                    kind="info",
                    metric="Database sessions",
                    target="none (info)",
                    achieved=f"not measured: {INSTALL_HINT}",
                    note=f"not measured: {INSTALL_HINT}",
                ),
            ),
            {"skipped": f"not installed: {', '.join(missing)}"},
        )
    out = progress.table("db")
    sizes = _sizes(scale)
    with tempfile.TemporaryDirectory(prefix="usercontext-report-") as tmp:
        sqlite = _Backend(
            "SQLite",
            f"sqlite+aiosqlite:///{tmp}/report.sqlite",
            pool_size=1,  # SQLite runs one write at a time
            tasks=1,
            # With aiosqlite 0.22, cancelling a query in its middle leaves
            # SQLAlchemy a task that never ends: see docs/how-to-sqlalchemy.md.
            slow_query=None,
            # WAL stays set in the file. synchronous is set on the connection,
            # the pool's only one, which nothing here invalidates (were it
            # replaced, the new one would only be slower).
            pragmas=("pragma journal_mode=wal", "pragma synchronous=normal"),
        )
        _measure(out, sqlite, sizes, lambda step: progress("database", f"sqlite: {step}"))
    progress("database", STEPS[2])
    url = os.environ.get(POSTGRES_URL_VAR)
    if url:
        _postgres(out, url, sizes)
    notes = (
        (
            f"Throughput: {sizes.pairs} interleaved pairs of batches of transactions, each "
            "inserting one row and committing: through a registry scope and `session_provider` "
            "(ours), and on an `async_sessionmaker` session opened, committed and closed by "
            f"hand (the floor); {CONCURRENCY} tasks at once on PostgreSQL, one on SQLite. The "
            "best batch of each is shown."
        ),
        (
            f"Failures and cancellations: requests {CONCURRENCY} at a time, each inserting a "
            f"row tagged with its request id; {FAIL_SHARE:.0%} raise in their body and "
            f"{CANCEL_SHARE:.0%} are cancelled {CANCEL_AFTER_S * 1e3:g} ms after the insert: "
            "on PostgreSQL in the middle of a query, on SQLite between queries (cancelling an "
            "aiosqlite query in its middle leaves SQLAlchemy a task that never ends)."
        ),
        (
            "SQLite is a file in a temporary directory, in WAL mode, through aiosqlite and a "
            f"pool of one connection. Set {POSTGRES_URL_VAR}=postgresql://user@host/db to "
            "measure PostgreSQL through asyncpg too: it creates a table of its own and drops it."
        ),
        "The legacy figure (~150-200 txn/s) is that of the legacy report, not measured here.",
    )
    return SectionResult(tuple(out.rows), out.figures, notes)


def _postgres(out: Table, url: str, sizes: _Sizes) -> None:
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    def failed(why: str) -> None:
        # Correctness: the leak checks asked for were not made, so the run
        # cannot say that they hold.
        out.rows.append(
            Row(
                id="db.postgresql_measured",
                kind="correctness",
                metric="PostgreSQL",
                target="measured",
                achieved=f"not measured: {why}",
                ok=False,
                note=f"not measured: {why}",
            )
        )

    if _missing("asyncpg"):
        failed("install usercontext[sqlalchemy] (asyncpg)")
        return
    try:
        asyncpg_url = make_url(url).set(drivername="postgresql+asyncpg")
    except ArgumentError as e:
        failed(f"{POSTGRES_URL_VAR} is not a database URL ({e})")
        return
    backend = _Backend(
        "PostgreSQL",
        asyncpg_url,
        pool_size=CONCURRENCY,
        tasks=CONCURRENCY,
        slow_query="select pg_sleep(0.5)",
        connect_args={
            "server_settings": {"application_name": f"usercontext-report-{os.urandom(4).hex()}"}
        },
    )
    try:
        _measure(out, backend, sizes, lambda _step: None)
    except _UnreachableError as e:
        failed(f"could not use {asyncpg_url.render_as_string()}: {e}")


class _UnreachableError(Exception):
    """
    The database could not be reached, or the section's table not created.
    """


def _measure(out: Table, backend: _Backend, sizes: _Sizes, announce: Callable[[str], None]) -> None:
    """
    Run both measurements on *backend*, on an event loop of their own, in a
    table of their own that is dropped afterwards.
    """
    import sqlalchemy as sa

    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.ext.asyncio import create_async_engine

    from usercontext.sqlalchemy import PoolWatch

    table = sa.Table(
        f"usercontext_report_{os.urandom(4).hex()}",
        sa.MetaData(),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
    )
    engine = create_async_engine(
        backend.url,
        pool_size=backend.pool_size,
        max_overflow=0,
        connect_args=backend.connect_args,
    )
    loop = asyncio.new_event_loop()
    # From before the first connection to after the last is closed.
    watch = PoolWatch(engine)
    m = _Measurement(out, backend, sizes, loop, engine, table, watch)

    async def create() -> None:
        try:
            async with engine.connect() as conn:
                for pragma in backend.pragmas:
                    await conn.exec_driver_sql(pragma)
                await conn.run_sync(table.create)
                await conn.commit()
        except (OSError, SQLAlchemyError) as e:
            await engine.dispose()
            raise _UnreachableError(f"{type(e).__name__}: {e}") from e

    async def drop() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(table.drop)
        await engine.dispose()

    def run() -> None:
        loop.run_until_complete(create())
        try:
            announce("throughput")
            m.throughput()
            announce("failures and cancellations")
            loop.run_until_complete(m.failures())
        finally:
            loop.run_until_complete(drop())
        watch.close()
        m.lifecycle_row()

    try:
        in_empty_context(run)
    finally:
        watch.close()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _contexts(n: int) -> list[UserContext]:
    return [
        UserContext(user_id=f"user-{i % 100}", thread_id=f"thread-{i}", run_id=f"run-{i}")
        for i in range(n)
    ]


class _RequestFailedError(Exception):
    """
    Raised by the body of a request meant to fail.
    """


@attrs.define
class _Measurement:
    """
    The measurements of one database.
    """

    out: Table
    backend: _Backend
    sizes: _Sizes
    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    table: sa.Table
    watch: PoolWatch

    def throughput(self) -> None:
        """
        Time transactions through registry scopes against a session by hand.
        """
        from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

        from usercontext.sqlalchemy import session_provider

        maker = async_sessionmaker(self.engine)
        registry = Registry()
        registry.register(AsyncSession, session_provider(maker))
        insert = self.table.insert()
        tasks = self.backend.tasks
        batch_size = self.sizes.txns * min(tasks, 4)

        def concurrently(
            one: Callable[[UserContext], Coroutine[Any, Any, None]],
        ) -> Callable[[int], Coroutine[Any, Any, None]]:
            async def batch(n: int) -> None:
                contexts = _contexts(n)

                async def task(k: int) -> None:
                    for ctx in contexts[k::tasks]:
                        await one(ctx)

                await asyncio.gather(*(task(k) for k in range(tasks)))

            return batch

        async def ours(ctx: UserContext) -> None:
            async with registry.scope(ctx) as scope:
                session = await scope.aget(AsyncSession)
                await session.execute(
                    insert, {"request_id": ctx.request_id, "user_id": ctx.user_id}
                )

        async def floor(ctx: UserContext) -> None:
            session = maker()
            try:
                await session.execute(
                    insert, {"request_id": ctx.request_id, "user_id": ctx.user_id}
                )
                await session.commit()
            finally:
                await session.close()

        ops = (
            LoopOp(
                "registry scope + session_provider: insert, commit", concurrently(ours), self.loop
            ),
            LoopOp("session by hand: insert, commit, close", concurrently(floor), self.loop),
        )
        for op in ops:
            op.batch(batch_size)  # warm up: connect, prepare, fill the caches
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(self.sizes.pairs):
            order = (1, 0) if i % 2 else (0, 1)  # alternate which goes first
            for k in order:
                times[k].append(ops[k].batch(batch_size) / batch_size)
        c = Comparison(ops[0], ops[1], times[0], times[1], batch_size, batch_size)
        name, key = self.backend.name, self.backend.name.lower()
        # Reported, not judged: a database round trip dominates both sides, and
        # the issue sets the throughput, not this ratio, as the target.
        self.out.rows.append(
            Row(
                id=f"db.{key}_transaction_vs_floor",
                kind="info",
                metric=(
                    f"{name}: time per transaction, registry scope + `session_provider` vs "
                    "session by hand"
                ),
                target="none (info)",
                achieved=fmt_ratio(c, None),
                value=Quantity(c.ratio, "x"),
                details={
                    "ours": Quantity(c.ours_ns, "ns"),
                    "floor": Quantity(c.floor_ns, "ns"),
                    "median_pair_ratio": Quantity(c.median_ratio, "x"),
                },
            )
        )
        self.out.figures[f"{key}_overhead"] = c.figures(None, "INFO")
        rate, floor_rate = 1e9 / c.ours_ns, 1e9 / c.floor_ns
        self.out.figures[f"{key}_throughput"] = {
            "txn_per_s": rate,
            "floor_txn_per_s": floor_rate,
            "legacy_txn_per_s": LEGACY_TXN_PER_S,
            "tasks": tasks,
            "transactions_timed": 2 * self.sizes.pairs * batch_size,
        }
        self.out.rows.append(
            Row(
                id=f"db.{key}_throughput",
                kind="performance",
                metric=f"{name}: transaction throughput vs legacy (~150-200 txn/s)",
                target=f"> {LEGACY_TXN_PER_S:g} txn/s",
                achieved=(
                    f"**{rate:,.0f} txn/s** (floor {floor_rate:,.0f}), "
                    f"{rate / LEGACY_TXN_PER_S:.1f}x legacy"
                ),
                ok=rate > LEGACY_TXN_PER_S,
                value=Quantity(rate, "txn/s"),
                goal=Goal(">", LEGACY_TXN_PER_S, "txn/s"),
                details={"floor": Quantity(floor_rate, "txn/s")},
            )
        )

    async def failures(self) -> None:
        """
        Send requests that fail or are cancelled; check what they left behind.
        """
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

        from usercontext.sqlalchemy import session_provider

        registry = Registry()
        registry.register(AsyncSession, session_provider(async_sessionmaker(self.engine)))
        n = self.sizes.requests
        n_fail, n_cancel = round(n * FAIL_SHARE), round(n * CANCEL_SHARE)
        kinds = ["fail"] * n_fail + ["cancel"] * n_cancel + ["ok"] * (n - n_fail - n_cancel)
        random.Random(42).shuffle(kinds)  # noqa: S311  # an order, not a secret
        result = _Failures(registry)
        limiter = anyio.CapacityLimiter(CONCURRENCY)
        insert = self.table.insert()
        slow = None if self.backend.slow_query is None else text(self.backend.slow_query)

        async def body(scope: Scope, ctx: UserContext, kind: str, cs: anyio.CancelScope) -> None:
            session = await scope.aget(AsyncSession)
            # coverage.py loses track of the lines of a frame that resumes
            # after a SQLAlchemy greenlet switch (unless it runs with
            # concurrency = greenlet): what follows the first query is chosen
            # before it, and runs in a frame of its own, with nothing after
            # its own query.
            wait = partial(anyio.sleep, 1) if slow is None else partial(session.execute, slow)
            await session.execute(insert, {"request_id": ctx.request_id, "user_id": ctx.user_id})
            await then(kind, cs, wait)

        async def then(
            kind: str, cs: anyio.CancelScope, wait: Callable[[], Awaitable[Any]]
        ) -> None:
            if kind == "fail":
                raise _RequestFailedError
            if kind == "cancel":
                cs.deadline = anyio.current_time() + CANCEL_AFTER_S
                await wait()

        async def request(ctx: UserContext, kind: str) -> None:
            async with limiter:
                with anyio.CancelScope() as cs:
                    try:
                        async with registry.scope(ctx) as scope:
                            await body(scope, ctx, kind, cs)
                    except _RequestFailedError:
                        result.failed.add(ctx.request_id)
                    else:
                        result.ok.add(ctx.request_id)
                # A deadline may fall just after the query returned: then the
                # body succeeded (and committed), and counts as such.
                if cs.cancelled_caught:
                    result.ok.discard(ctx.request_id)
                    result.cancelled.add(ctx.request_id)

        async with anyio.create_task_group() as tg:
            for ctx, kind in zip(_contexts(n), kinds, strict=True):
                tg.start_soon(request, ctx, kind)
        await self._collect(result)
        self._failure_rows(result)

    async def _collect(self, result: _Failures) -> None:
        """
        Record what the requests left: connections held, rows, idle transactions.
        """
        from sqlalchemy import select

        watch = self.watch
        result.checked_out, result.held = watch.checked_out, [str(h) for h in watch.held()]
        async with self.engine.connect() as conn:
            rows = set((await conn.execute(select(self.table.c.request_id))).scalars())
            result.rows = rows & (result.ok | result.failed | result.cancelled)
            result.idle_in_transaction = await self._idle_in_transaction(conn)

    async def _idle_in_transaction(self, conn: AsyncConnection) -> int | None:
        """
        Count the server processes of our connections left idle in a
        transaction, on PostgreSQL.
        """
        from sqlalchemy import text

        app = self.backend.application_name
        if app is None:
            return None
        count: int = (await conn.execute(text(_IDLE_IN_TRANSACTION_SQL), {"app": app})).scalar_one()
        return count

    def _failure_rows(self, r: _Failures) -> None:
        stats = r.registry.stats()
        left = len(r.rows & (r.failed | r.cancelled))
        missing = len(r.ok - r.rows)
        n = self.sizes.requests
        name, key = self.backend.name, self.backend.name.lower()
        self.out.figures[f"{key}_requests"] = {
            "requests": n,
            "succeeded": len(r.ok),
            "failed": len(r.failed),
            "cancelled": len(r.cancelled),
            "rows": len(r.rows),
            "rows_of_failed_or_cancelled": left,
            "rows_of_successful_missing": missing,
            "checked_out_at_end": r.checked_out,
            "held_at_end": r.held,
            "idle_in_transaction": r.idle_in_transaction,
            "resources_open": [list(item) for item in stats.top],
            "close_errors": stats.close_errors,
        }
        counted = len(r.ok) + len(r.failed) + len(r.cancelled) == n
        idle = (
            ""
            if r.idle_in_transaction is None
            else f", {r.idle_in_transaction} idle in transaction"
        )
        clean = r.checked_out == 0 and not r.idle_in_transaction and stats.top == ()
        connections = {
            "close_errors": Quantity(stats.close_errors, "errors"),
            "resources_open": Quantity(stats.in_use, "resources"),
        }
        if r.idle_in_transaction is not None:
            connections["idle_in_transaction"] = Quantity(r.idle_in_transaction, "connections")
        self.out.rows += [
            Row(
                id=f"db.{key}_rows_left_or_missing",
                kind="correctness",
                metric=(
                    f"{name}: {n} requests, {len(r.failed)} failing, {len(r.cancelled)} "
                    "cancelled: rows of failed or cancelled requests left / of successful "
                    "ones missing"
                ),
                target="0 / 0",
                achieved=f"**{left} / {missing}** ({len(r.rows)} rows for {len(r.ok)} successes)",
                ok=left == missing == 0 and counted,
                value=Quantity(left + missing, "rows"),
                goal=Goal("==", 0, "rows"),
                details={
                    "left": Quantity(left, "rows"),
                    "missing": Quantity(missing, "rows"),
                    "succeeded": Quantity(len(r.ok), "requests"),
                    "failed": Quantity(len(r.failed), "requests"),
                    "cancelled": Quantity(len(r.cancelled), "requests"),
                },
            ),
            Row(
                id=f"db.{key}_connections_checked_out",
                kind="correctness",
                metric=f"{name}: connections checked out at the end (`PoolWatch`)",
                target="0",
                achieved=f"**{r.checked_out}**{idle}, {stats.close_errors} cleanup errors",
                ok=clean and stats.close_errors == 0,
                value=Quantity(r.checked_out, "connections"),
                goal=Goal("==", 0, "connections"),
                details=connections,
            ),
        ]

    def lifecycle_row(self) -> None:
        """
        Add the row of connections opened and closed, once all are closed.
        """
        watch = self.watch
        name, key = self.backend.name, self.backend.name.lower()
        self.out.figures[f"{key}_connections"] = {
            "checkouts": watch.checkouts,
            "checkins": watch.checkins,
            "opened": watch.connects,
            "closed": watch.closes,
            "invalidated": watch.invalidations,
        }
        self.out.rows.append(
            Row(
                id=f"db.{key}_connections_opened_closed",
                kind="correctness",
                metric=f"{name}: connections opened / closed (pool events, after dispose)",
                target="equal",
                achieved=(
                    f"**{watch.connects} / {watch.closes}** ({watch.checkouts:,} checkouts, "
                    f"{watch.invalidations} invalidated)"
                ),
                ok=watch.connects == watch.closes > 0,
                value=Quantity(watch.connects - watch.closes, "connections"),
                goal=Goal("==", 0, "connections"),
                details={
                    "opened": Quantity(watch.connects, "connections"),
                    "closed": Quantity(watch.closes, "connections"),
                    "checkouts": Quantity(watch.checkouts, "checkouts"),
                    "invalidated": Quantity(watch.invalidations, "connections"),
                },
            )
        )


_IDLE_IN_TRANSACTION_SQL = (
    "select count(*) from pg_stat_activity "
    "where application_name = :app and state like 'idle in transaction%'"
)


@attrs.define
class _Failures:
    """
    What the failures and cancellations scenario saw.
    """

    registry: Registry
    ok: set[str] = attrs.Factory(set[str])
    failed: set[str] = attrs.Factory(set[str])
    cancelled: set[str] = attrs.Factory(set[str])
    rows: set[str] = attrs.Factory(set[str])
    checked_out: int = 0
    held: list[str] = attrs.Factory(list[str])
    idle_in_transaction: int | None = None

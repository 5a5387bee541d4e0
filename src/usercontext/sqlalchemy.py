"""
SQLAlchemy sessions per request, PostgreSQL row-level security per user, and a
connection pool leak detector.

Register `session_provider` in a `usercontext.Registry` and every request
scope gets its own session: committed when the scope's body succeeds, rolled
back when it fails or is cancelled, and closed always. `PoolWatch` proves that
no request kept a connection.

It needs the ``sqlalchemy`` extra: ``pip install usercontext[sqlalchemy]``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import re
import threading
import time

from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import attrs

from sqlalchemy import event, orm, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction

from usercontext import UserContext, current_or_none
from usercontext.exceptions import IsolationError, NoContextError


if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Generator
    from types import TracebackType

    from sqlalchemy.orm import ORMExecuteState
    from sqlalchemy.pool import ConnectionPoolEntry
    from typing_extensions import Self


__all__ = ["Checkout", "PoolWatch", "session_provider"]

_AS = TypeVar("_AS", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)

_COMMIT_MODES = ("on_success", "never")
# PostgreSQL accepts only two-part names ("prefix.name") for settings it does
# not know: https://www.postgresql.org/docs/current/runtime-config-custom.html
_SETTING = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)+")
# is_local=true: the setting ends with the transaction, so a pooled connection
# never carries one user's id into the next checkout.
_SET_CONFIG = text("select set_config(:name, :value, true)")


def _context_info(ctx: UserContext) -> dict[str, Any]:
    """
    Check that *ctx*'s user is the one bound, and return the session's info.
    """
    if not isinstance(ctx, UserContext):
        msg = (  # type: ignore[unreachable]
            f"A session provider takes the scope's usercontext.UserContext, got "
            f"{type(ctx).__name__}. Register it in a registry and ask the scope for the "
            "session: `session = await scope.aget(AsyncSession)`."
        )
        raise TypeError(msg)
    bound = current_or_none()
    if bound is None:
        msg = (
            f"Refusing to open a database session for user {ctx.user_id!r}: no UserContext "
            "is bound. Ask for the session inside its request's scope, "
            "`async with registry.scope(ctx) as scope: await scope.aget(AsyncSession)` (or "
            "`with` and `scope.get(Session)`), and run other tasks and threads with the "
            "request's context (usercontext.to_thread, task groups started inside the scope)."
        )
        raise NoContextError(msg)
    if bound.user_id != ctx.user_id:
        msg = (
            f"Refusing to open a database session for user {ctx.user_id!r} while user "
            f"{bound.user_id!r} is bound. Open a scope for that user instead."
        )
        raise IsolationError(msg)
    return {
        "user_id": ctx.user_id,
        "thread_id": ctx.thread_id,
        "run_id": ctx.run_id,
        "request_id": ctx.request_id,
        "usercontext": ctx,
    }


def _check_user(session: Session) -> None:
    bound = current_or_none()
    owner = session.info["user_id"]
    if bound is not None and bound.user_id != owner:
        msg = (
            f"This database session belongs to a request of user {owner!r}, but user "
            f"{bound.user_id!r} used it. Sessions are per request: get one from that user's "
            "own scope."
        )
        raise IsolationError(msg)


def _check_execute(orm_execute_state: ORMExecuteState) -> None:
    _check_user(orm_execute_state.session)


def _check_flush(session: Session, _flush_context: object, _instances: object) -> None:
    _check_user(session)


def _rls_listener(setting: str) -> Callable[[Session, SessionTransaction, Connection], None]:
    def set_user(session: Session, _transaction: SessionTransaction, conn: Connection) -> None:
        if conn.dialect.name != "postgresql":
            raise _not_postgresql(setting, conn.dialect.name)
        if getattr(conn.connection.dbapi_connection, "autocommit", False):
            msg = (
                f"rls={setting!r} needs a transaction, but this connection is in AUTOCOMMIT "
                "mode, where the setting would last a single statement. Use a transactional "
                "isolation level for sessions with row-level security."
            )
            raise ValueError(msg)
        conn.execute(_SET_CONFIG, {"name": setting, "value": session.info["user_id"]})

    return set_user


def _not_postgresql(setting: str, dialect: str) -> ValueError:
    return ValueError(
        f"rls={setting!r} sets a PostgreSQL setting for row-level security, but the "
        f"session's database is {dialect}. Use rls=None with other databases."
    )


def _session_class(base: type[Session], rls: str | None) -> type[Session]:
    """
    Return a subclass of *base* that checks its user on each use, and with
    *rls* sets it at each transaction's start.

    Listening on a class of our own costs nothing per session (a listener on
    a session instance costs about 15 µs), and leaves *base*, and the sessions
    of the caller's sessionmaker, untouched.
    """
    cls: type[Session] = type(base.__name__, (base,), {"__module__": base.__module__})
    event.listen(cls, "do_orm_execute", _check_execute)
    event.listen(cls, "before_flush", _check_flush)
    if rls is not None:
        event.listen(cls, "after_begin", _rls_listener(rls))
    return cls


@overload
def session_provider(
    sessionmaker: async_sessionmaker[_AS],
    /,
    *,
    commit: Literal["on_success", "never"] = ...,
    rls: str | None = ...,
) -> Callable[[UserContext], AsyncGenerator[_AS, None]]: ...
@overload
def session_provider(
    sessionmaker: orm.sessionmaker[_S],
    /,
    *,
    commit: Literal["on_success", "never"] = ...,
    rls: str | None = ...,
) -> Callable[[UserContext], Generator[_S, None, None]]: ...
def session_provider(
    sessionmaker: async_sessionmaker[Any] | orm.sessionmaker[Any],
    /,
    *,
    commit: Literal["on_success", "never"] = "on_success",
    rls: str | None = None,
) -> Callable[[UserContext], Any]:
    """
    Return a provider that opens one session per request scope.

    Register it in a `usercontext.Registry` under the session class, and ask
    the scope for the session. The session is created when first asked for,
    and when the scope ends it is committed if the scope's body succeeded (with
    *commit* ``"on_success"``), rolled back if the body raised or was
    cancelled, and closed in every case. The cleanup runs shielded from
    cancellation, within the registry's *close_timeout*.

    An ``async_sessionmaker`` gives ``AsyncSession``
    sessions, for ``async with`` scopes and `usercontext.Scope.aget`; a
    ``sessionmaker`` gives sync sessions, for ``with`` scopes and
    `usercontext.Scope.get`. The sessions are of a subclass of the
    sessionmaker's class (of its ``sync_session_class`` for async sessions),
    whose ``info`` holds the ids of the request's context (``"user_id"``,
    ``"thread_id"``, ``"run_id"``, ``"request_id"``) and the context itself
    (``"usercontext"``).

    A session belongs to its request's user: opening one when no context is
    bound, or when another user's is, raises; so does executing or flushing
    it while another user's context is bound.

    With *rls*, the name of a PostgreSQL setting such as ``"app.user_id"``,
    every transaction of the session starts with ``select set_config(rls,
    user_id, true)``, also after a commit, so that row-level security policies
    reading ``current_setting(rls, true)`` show each user only their rows. See
    :doc:`how-to-sqlalchemy`.

    >>> import usercontext as uc
    >>> from sqlalchemy import create_engine, text
    >>> from sqlalchemy.orm import Session, sessionmaker
    >>> from usercontext.sqlalchemy import session_provider
    >>> engine = create_engine("sqlite://")
    >>> registry = uc.Registry()
    >>> registry.register(Session, session_provider(sessionmaker(engine)))
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    >>> with registry.scope(ctx) as scope:
    ...     session = scope.get(Session)
    ...     session.scalar(text("select 42")), session.info["user_id"]
    (42, 'u-42')
    >>> engine.dispose()

    Args:
        sessionmaker: Makes the sessions; its configuration (bind, options,
            ``info``) applies to each.
        commit: ``"on_success"`` commits when the scope's body returns;
            ``"never"`` leaves committing to the body, and the scope's end
            rolls back whatever it did not commit.
        rls: A PostgreSQL setting, such as ``"app.user_id"``, to set to the
            user's id at the start of every transaction.

    Returns:
        A provider for `usercontext.Registry.register`: it takes the scope's
        context and returns an async generator (for an
        ``async_sessionmaker``) or a generator that
        yields the session.

    Raises:
        TypeError: If *sessionmaker* is neither kind of sessionmaker.
        ValueError: If *commit* is not one of the two modes, or *rls* is not
            a two-part setting name, or the sessionmaker's bind is not a
            PostgreSQL database while *rls* is given.

    The provider raises, when the scope asks for a session,
    `usercontext.exceptions.NoContextError` if no context is bound and
    `usercontext.exceptions.IsolationError` if another user's is.

    .. versionadded:: 0.1.0
    """
    if commit not in _COMMIT_MODES:
        msg = f'commit must be "on_success" or "never", got {commit!r}.'
        raise ValueError(msg)
    if rls is not None:
        name: object = rls
        if not isinstance(name, str) or not _SETTING.fullmatch(name):
            msg = (
                "rls must name a PostgreSQL setting in two parts, such as 'app.user_id', "
                f"got {rls!r}."
            )
            raise ValueError(msg)
        dialect = getattr(sessionmaker.kw.get("bind"), "dialect", None)
        if dialect is not None and dialect.name != "postgresql":
            raise _not_postgresql(rls, dialect.name)
    on_success = commit == "on_success"

    if isinstance(sessionmaker, async_sessionmaker):
        amaker: async_sessionmaker[Any] = sessionmaker
        base = amaker.kw.get("sync_session_class") or amaker.class_.sync_session_class
        sync_class = _session_class(base, rls)

        def provide_async(ctx: UserContext) -> AsyncGenerator[Any, None]:
            info = _context_info(ctx)
            return _async_session(amaker(info=info, sync_session_class=sync_class), on_success)

        return provide_async

    if isinstance(sessionmaker, orm.sessionmaker):
        maker: orm.sessionmaker[Any] = sessionmaker
        session_class = _session_class(maker.class_, rls)

        def provide(ctx: UserContext) -> Generator[Any, None, None]:
            info = _context_info(ctx)
            # What sessionmaker.__call__ does, with our class.
            kw = dict(maker.kw)
            kw["info"] = {**kw.get("info", {}), **info}
            return _sync_session(session_class(**kw), on_success)

        return provide

    msg = (  # type: ignore[unreachable]
        "session_provider() takes a sqlalchemy.orm.sessionmaker or a "
        f"sqlalchemy.ext.asyncio.async_sessionmaker, got {type(sessionmaker).__name__}."
    )
    raise TypeError(msg)


async def _async_session(session: AsyncSession, on_success: bool) -> AsyncGenerator[Any, None]:  # noqa: FBT001  # private
    try:
        yield session
    except BaseException:
        await session.rollback()
        raise
    else:
        if on_success:
            await session.commit()
    finally:
        await session.close()


def _sync_session(session: Session, on_success: bool) -> Generator[Any, None, None]:  # noqa: FBT001  # private
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    else:
        if on_success:
            session.commit()
    finally:
        session.close()


@attrs.frozen
class Checkout:
    """
    A connection checked out of a pool, as `PoolWatch.held` reports it.

    Attributes:
        user_id: The user whose context was bound at checkout, or `None`.
        request_id: The request id of that context, or `None`.
        seconds: How long the connection has been checked out.

    .. versionadded:: 0.1.0
    """

    user_id: str | None
    request_id: str | None
    seconds: float

    def __str__(self) -> str:
        who = (
            "outside any request (no UserContext bound)"
            if self.request_id is None
            else f"by request {self.request_id!r} of user {self.user_id!r}"
        )
        return f"{who}, for {self.seconds:.3f} s"


class PoolWatch:
    """
    Count what a connection pool hands out and takes back, and who holds what.

    It listens to the pool events of *engine* (of its ``sync_engine`` for an
    ``AsyncEngine``) from its creation until `close`
    (or the end of its ``with`` block), and records, for each connection
    checked out, the user and request whose context was bound at checkout.
    At the end of a test or a load run, `assert_no_leaks` says which requests
    kept a connection.

    >>> from sqlalchemy import create_engine, text
    >>> from usercontext.sqlalchemy import PoolWatch
    >>> engine = create_engine("sqlite://")
    >>> with PoolWatch(engine) as watch:
    ...     with engine.connect() as conn:
    ...         _ = conn.execute(text("select 1"))
    ...         watch.checked_out
    ...     watch.assert_no_leaks()
    1
    >>> watch.checkouts, watch.checkins
    (1, 1)
    >>> engine.dispose()

    Args:
        engine: The engine whose pool to watch.

    Raises:
        TypeError: If *engine* is not an ``Engine`` or an
            ``AsyncEngine``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, engine: Engine | AsyncEngine) -> None:
        sync_engine: object = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if not isinstance(sync_engine, Engine):
            msg = (
                "PoolWatch() takes a sqlalchemy Engine or AsyncEngine, got "
                f"{type(engine).__name__}."
            )
            raise TypeError(msg)
        self._engine = sync_engine
        self._url = sync_engine.url.render_as_string(hide_password=True)
        self._lock = threading.Lock()
        self._held: dict[ConnectionPoolEntry, tuple[str | None, str | None, float]] = {}
        self._checkouts = self._checkins = self._connects = self._closes = 0
        self._invalidations = 0
        listeners: tuple[tuple[str, Callable[..., None]], ...] = (
            ("connect", self._on_connect),
            ("checkout", self._on_checkout),
            ("checkin", self._on_checkin),
            ("detach", self._on_checkin),
            ("invalidate", self._on_invalidate),
            ("close", self._on_close),
            ("close_detached", self._on_close),
        )
        self._listeners = listeners
        for event_name, listener in listeners:
            event.listen(sync_engine, event_name, listener)
        self._listening = True

    # -- pool events; they may come from any thread --

    def _on_connect(self, _dbapi_connection: object, _record: ConnectionPoolEntry) -> None:
        with self._lock:
            self._connects += 1

    def _on_checkout(
        self, _dbapi_connection: object, record: ConnectionPoolEntry, _proxy: object
    ) -> None:
        ctx = current_or_none()
        user, request = (None, None) if ctx is None else (ctx.user_id, ctx.request_id)
        with self._lock:
            self._checkouts += 1
            self._held[record] = (user, request, time.monotonic())

    def _on_checkin(self, _dbapi_connection: object, record: ConnectionPoolEntry) -> None:
        with self._lock:
            self._checkins += 1
            self._held.pop(record, None)

    def _on_invalidate(
        self, _dbapi_connection: object, _record: ConnectionPoolEntry, _exc: object
    ) -> None:
        with self._lock:
            self._invalidations += 1

    def _on_close(self, *_args: object) -> None:
        with self._lock:
            self._closes += 1

    # -- figures --

    @property
    def checked_out(self) -> int:
        """
        Connections checked out while watching and not yet returned.
        """
        return len(self._held)

    @property
    def checkouts(self) -> int:
        """
        Connections handed out by the pool while watching.
        """
        return self._checkouts

    @property
    def checkins(self) -> int:
        """
        Connections returned to the pool (or detached from it) while watching.
        """
        return self._checkins

    @property
    def connects(self) -> int:
        """
        Database connections the pool opened while watching.
        """
        return self._connects

    @property
    def closes(self) -> int:
        """
        Database connections closed while watching (invalidated, recycled,
        detached or disposed of).
        """
        return self._closes

    @property
    def invalidations(self) -> int:
        """
        Connections invalidated while watching, such as after a query was
        cancelled or the database went away.
        """
        return self._invalidations

    def held(self) -> tuple[Checkout, ...]:
        """
        Return the connections checked out now, longest held first.
        """
        now = time.monotonic()
        with self._lock:
            held = list(self._held.values())
        return tuple(
            Checkout(user_id, request_id, now - since)
            for user_id, request_id, since in sorted(held, key=lambda h: h[2])
        )

    def assert_no_leaks(self) -> None:
        """
        Check that every connection checked out while watching was returned.

        Raises:
            AssertionError: If some are still checked out; the message lists
                which request of which user holds each, and for how long.
        """
        held = self.held()
        if held:
            lines = "\n".join(f"  - {checkout}" for checkout in held)
            msg = (
                f"{len(held)} connection(s) are still checked out of the pool of {self._url}:\n"
                f"{lines}\nClose every session and connection when its request ends: open "
                "sessions through a registry scope with usercontext.sqlalchemy.session_provider, "
                "and connections with `with engine.connect():` (or `async with`)."
            )
            raise AssertionError(msg)

    # -- lifetime --

    def close(self) -> None:
        """
        Stop watching: remove the listeners. The figures stay as they are.
        """
        if self._listening:
            self._listening = False
            for event_name, listener in self._listeners:
                event.remove(self._engine, event_name, listener)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<usercontext.sqlalchemy.PoolWatch(checked_out={self.checked_out}, "
            f"checkouts={self._checkouts}, checkins={self._checkins})>"
        )

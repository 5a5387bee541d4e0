"""
`RedisQuota`: the `usercontext.Quota` protocol on Redis, so that per-user and
global limits hold across processes and hosts.

The scripts are in `_quota_scripts`, the lease and the stats in
`_quota_lease`, and the background work of a process (renewal, fallback
poll, wake-ups, probing Redis after an outage) in `_quota_keeper`.
"""

# redis-py's asyncio client types Redis.from_url with untyped **kwargs.
# pyright: reportUnknownMemberType=false

from __future__ import annotations

import asyncio
import itertools
import math
import secrets

from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio import Redis
from redis.exceptions import MaxConnectionsError, NoScriptError

from usercontext import _checks
from usercontext._local_quota import LocalQuota
from usercontext._quota import QuotaStats, snapshot
from usercontext.exceptions import (
    BackendUnavailableError,
    LeaseReleasedError,
    QuotaError,
    QuotaExceededError,
    QuotaTimeoutError,
)

from . import _client, _quota_scripts
from ._quota_keeper import DOWN, Down, Keeper, Waiter, within
from ._quota_lease import RedisLease, RedisQuotaStats, new_lease


if TYPE_CHECKING:
    from collections.abc import Coroutine
    from types import TracebackType

    from redis.commands.core import AsyncScript
    from typing_extensions import Self

    from usercontext._quota import Lease


__all__ = ["RedisQuota"]

_POLICIES = ("fail_closed", "fail_open")


class RedisQuota:
    """
    Per-key and global limits on concurrent work, shared through Redis by
    every process and host that uses the same Redis and *prefix*.

    It implements the `usercontext.Quota` protocol (and passes its
    conformance suite), so ``EngineFactory(create, quota=RedisQuota(...))``
    works as with `usercontext.LocalQuota`: at most *per_key* leases per key
    and *total* overall, waiters served FIFO per key across processes and
    round-robin across keys under *total*, a timeout or a cancellation leaves
    nothing held or waiting, and a key with nothing held or waiting leaves no
    key in Redis once its last lease or waiter expired.

    **The guarantee is an efficiency limit, not a lock for correctness.**
    Each slot is a lease in Redis that expires *ttl* seconds after it was
    last renewed, on the Redis server's clock. One task per quota object
    renews every lease it holds in one round trip every *ttl* / 3, so while
    holders are alive nothing is over-admitted, and the slot of a crashed
    process comes back within *ttl*. A holder that stalls past its *ttl* (a
    paused process, a partition) loses its lease: its slot may be granted to
    another, so that until its renewal notices, at most one extra slot is in
    use per stalled holder. When it notices, the body holding the lease is
    cancelled and `usercontext.exceptions.LeaseLostError` is raised in its
    place (`RedisQuotaStats.lost` counts it). Work that must never run twice
    at once uses the lease's `RedisLease.fence`, a fencing token that grows
    with every grant, and has the protected resource refuse older tokens.

    Waiting needs no polling storm: a release grants the slot to the next
    waiter in its script and publishes one wake-up to that waiter's process
    (one Pub/Sub connection per quota object), so one release wakes one
    waiter. Each process also polls for its waiters every *poll_interval*
    seconds, for wake-ups lost with a connection. Waiters carry their own
    expiry, renewed like leases, so a crashed waiter does not block its queue;
    a slot handed to a waiter that died meanwhile comes back within *ttl*.

    **Redis Cluster.** Every script touches keys of one hash slot. With
    *total* `None`, a user's keys share the hash tag ``{<prefix>:<user>}``,
    so users spread over the cluster. With *total* set, all keys share the
    tag ``{<prefix>}``, so the whole quota lives in one slot on one node:
    that is what makes the global cap atomic, and it also means one node
    serves every request of the quota.

    **When Redis is unavailable** (no answer within *backend_timeout*:
    stopped, paused, unreachable), *on_unavailable* decides. With
    ``"fail_closed"`` (the default) ``acquire`` raises
    `usercontext.exceptions.BackendUnavailableError` (web adapters answer
    503 with ``Retry-After``), and waiting requests raise it at their next
    poll. With ``"fail_open"`` the quota logs a warning once, then serves
    requests from a process-local `usercontext.LocalQuota` with the same
    limits (per process, so the limits then hold per process only), counts
    them in `RedisQuotaStats.fallbacks`, and goes back to Redis within a
    second of it answering again. Leases granted by the fallback are
    released to it. A release that cannot reach Redis is counted and
    logged, never raised: the slot comes back when its lease expires.

    Use the same *ttl*, *per_key*, *total* and *prefix* in every process
    sharing a quota. Close it with ``async with`` or `aclose`; it starts its
    background tasks on first use, on the running event loop (asyncio only:
    redis-py's asyncio client does not run on trio).

    Args:
        redis: A ``redis.asyncio.Redis`` client (yours: it is not closed by
            the quota), or a URL such as ``"redis://localhost:6379/0"`` (the
            quota makes the client and closes it in `aclose`).
        per_key: The limit per key (usually per user).
        total: The global limit, or `None` for none.
        ttl: Seconds a lease lives without renewal (renewed every *ttl* / 3).
        prefix: The prefix of every key and channel of the quota.
        on_unavailable: ``"fail_closed"`` or ``"fail_open"``, as above.
        backend_timeout: Seconds each command may take before Redis counts
            as unavailable.
        poll_interval: Seconds between the fallback polls of a process with
            waiters.

    Raises:
        TypeError: If *redis* is not a client or a URL, or an argument has
            the wrong type.
        ValueError: If a number is out of range, *prefix* is empty or holds
            a brace, or *on_unavailable* is not one of the two policies.

    .. versionadded:: 0.1.0
    """

    def __init__(  # noqa: PLR0913, PLR0915  # keyword-only settings, each checked and documented
        self,
        redis: Redis | str,
        *,
        per_key: int = 2,
        total: int | None = None,
        ttl: float = 10.0,
        prefix: str = "usercontext",
        on_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed",
        backend_timeout: float = 0.25,
        poll_interval: float = 0.5,
    ) -> None:
        if callable(per_key):
            msg = (
                "per_key of a RedisQuota must be an int: every process must apply the same "
                "limit to every key, and a callable cannot be shared through Redis. Pass "
                "an int, such as per_key=2."
            )
            raise TypeError(msg)
        _checks.limit("per_key", per_key, allow_none=False)
        _checks.limit("total", total, allow_none=True)
        _checks.seconds("ttl", ttl)
        _checks.seconds("backend_timeout", backend_timeout)
        _checks.seconds("poll_interval", poll_interval)
        if math.isinf(ttl) or ttl < 0.01:  # noqa: PLR2004  # 10 ms: Redis keeps milliseconds
            msg = f"ttl must be a finite number of seconds of at least 0.01, got {ttl!r}."
            raise ValueError(msg)
        if not isinstance(prefix, str):
            msg = f"prefix must be a str, got {prefix!r}."  # type: ignore[unreachable]
            raise TypeError(msg)
        if not prefix or "{" in prefix or "}" in prefix:
            msg = (
                f"prefix must be a non-empty str without braces (they make Redis Cluster "
                f"hash tags), got {prefix!r}."
            )
            raise ValueError(msg)
        if on_unavailable not in _POLICIES:
            msg = f"on_unavailable must be 'fail_closed' or 'fail_open', got {on_unavailable!r}."
            raise ValueError(msg)
        if isinstance(redis, str):
            # Each command bounded by the client itself (see _client.bounded).
            client: Redis = _client.from_url(redis, backend_timeout)
            self._owned = True
        elif isinstance(redis, Redis):
            client = redis
            self._owned = False
        else:
            msg = (  # type: ignore[unreachable]  # checked for untyped callers
                "redis must be a redis.asyncio.Redis client or a URL such as "
                f"'redis://localhost:6379/0', got {redis!r}."
            )
            raise TypeError(msg)
        self._client = client
        self._bounded = _client.bounded(client, backend_timeout)
        self._per_key = per_key
        self._total = total
        self._ttl = ttl
        self._ttl_ms = max(10, round(ttl * 1000))
        self._prefix = prefix
        self._fail_open = on_unavailable == "fail_open"
        self._policy = on_unavailable
        self._timeout = backend_timeout
        self._proc = secrets.token_hex(6)
        self._channel_prefix = f"{prefix}:wake:"
        texts = _quota_scripts.build(
            prefix=prefix,
            per_key=per_key,
            total=total,
            ttl_ms=self._ttl_ms,
            channel=self._channel_prefix,
        )
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(text) for name, text in texts.items()
        }
        # The start of each script's command, encoded once.
        self._heads: dict[str, tuple[bytes, ...]] = {
            name: (b"EVALSHA", script.sha.encode(), b"1") for name, script in self._scripts.items()
        }
        # The start of every lease key: the user's name completes it.
        self._key_head = f"{{{prefix}:" if total is None else f"{{{prefix}}}:h:"
        self._key_tail = "}:h" if total is None else ""
        self._ids = itertools.count(1)
        # Local bookkeeping: what this object holds and waits for.
        self._in_use: dict[str, int] = {}
        self._n_in_use = 0
        self._waiting: dict[str, int] = {}
        self._n_waiting = 0
        self._granted = 0
        self._rejected = 0
        self._timed_out = 0
        self._cancelled = 0
        self._peak = 0
        self._fallback: LocalQuota | None = None
        self._available = True
        self._lost = 0
        self._fallbacks = 0
        self._outages = 0
        self._script_loads = 0
        self._acquire_errors = 0
        self._release_errors = 0
        self._keeper = Keeper(self, poll_interval)
        self._closed = False

    # -- the protocol ---------------------------------------------------------

    async def acquire(self, key: str, *, timeout: float | None = None) -> Lease:  # noqa: C901  # one frame on the hot path
        """
        Wait for a slot of *key* and return its `RedisLease`, which is also an
        async context manager: ``async with await quota.acquire(key):``.

        *timeout* `None` waits as long as it takes, a positive number waits
        at most that many seconds (round trips included) and then raises
        `usercontext.exceptions.QuotaTimeoutError`, and ``0`` raises
        `usercontext.exceptions.QuotaExceededError` after one round trip when
        no slot is free. A request cancelled while it waits, even right after
        being granted, leaves no slot taken.

        Raises:
            usercontext.exceptions.QuotaExceededError: If *timeout* is 0 and
                no slot is free.
            usercontext.exceptions.QuotaTimeoutError: If no slot was free
                within *timeout*.
            usercontext.exceptions.BackendUnavailableError: If Redis did not
                answer within *backend_timeout* and *on_unavailable* is
                ``"fail_closed"``.
            usercontext.exceptions.QuotaError: If the quota was closed.
        """
        if self._closed:
            self._refuse_closed()
        if not self._available:
            return await self._acquire_local(key, timeout)
        # The clock is read only for a timeout; one coroutine less: the
        # uncontended acquire is a round trip and little else.
        start = 0.0 if timeout is None else asyncio.get_running_loop().time()
        lease_id = f"{self._proc}:{next(self._ids)}"
        keeper = self._keeper
        wait = timeout is None or timeout > 0
        try:
            if wait and not keeper.subscribed:
                await keeper.listening()
            # Known before the round trip: the wake-up may come before its reply.
            waiter = Waiter(key)
            keeper.waiters[lease_id] = waiter
            try:
                if wait:
                    reply = await self._eval("ACQUIRE", key, lease_id)
                else:
                    reply = await self._eval("ACQUIRE", key, lease_id, "0")
            except BaseException as e:
                del keeper.waiters[lease_id]
                # Cut mid-flight: the script may have run (or run later, if the
                # server was only paused), so leave.
                if isinstance(e, Down):
                    keeper.spawn(self._leave_later(key, lease_id))
                else:
                    self._cancelled += 1
                    await _finish(self._leave_quietly(key, lease_id))
                raise
            # A grant is its fencing token alone, the cheapest reply to read.
            if type(reply) is int:
                del keeper.waiters[lease_id]
                return self._grant(key, lease_id, reply)
            if reply[0] == 0:
                del keeper.waiters[lease_id]
                self._rejected += 1
                raise self._full(
                    QuotaExceededError, key, int(reply[1]), int(reply[2]), 0.0, timeout
                )
            return await self._wait(key, lease_id, waiter, timeout, start)
        except Down as e:
            if not self._fail_open:
                self._acquire_errors += 1
                raise self._unavailable(e) from e.__cause__
            self._keeper.outage(e)
            left = (
                None if timeout is None else timeout - (asyncio.get_running_loop().time() - start)
            )
            return await self._acquire_local(key, left if left is None or left > 0 else 0)

    async def arelease(self, lease: Lease) -> None:
        """
        Hand the slot of *lease* back (a round trip) and grant it to the next
        waiter, in any process. A cancellation of the caller does not stop it:
        the round trip is finished, then the cancellation goes on.

        Raises:
            usercontext.exceptions.LeaseReleasedError: If *lease* was already
                handed back.
            ValueError: If *lease* is another quota's.
        """
        if lease._quota is not self or not isinstance(lease, RedisLease):
            if lease._quota is None:
                msg = (
                    f"{lease!r} was already released. Release each lease once; "
                    "Lease.arelease() and leaving `async with` are safe to repeat."
                )
                raise LeaseReleasedError(msg)
            msg = f"{lease!r} belongs to another quota; release it through that one."
            raise ValueError(msg)
        self._forget(lease)
        if lease._local is not None:
            lease._local.release()
            return
        try:
            await self._eval("RELEASE", lease._key, lease._id)
        except Down as e:
            self._release_errors += 1
            self._keeper.log_release_error(lease, e)
        except asyncio.CancelledError:
            # Cut mid-flight: run it again (it is idempotent) to its end.
            await _finish(self._release(lease))
            raise

    def stats(self, *, top: int = 10) -> QuotaStats:
        """
        Return a snapshot of the counters of the requests made through this
        object (in this process), with the *top* keys holding the most of its
        slots. It never waits.
        """
        return snapshot(self, self._n_in_use, self._in_use, self._waiting, top)

    def redis_stats(self) -> RedisQuotaStats:
        """
        Return what this object did with Redis: leases lost, fallbacks,
        wake-ups, renewals and errors. It never waits.
        """
        k = self._keeper
        return RedisQuotaStats(
            available=self._available,
            lost=self._lost,
            fallbacks=self._fallbacks,
            outages=self._outages,
            wakeups=k.wakeups,
            renewals=k.renewals,
            script_loads=self._script_loads,
            acquire_errors=self._acquire_errors,
            release_errors=self._release_errors,
            renew_errors=k.renew_errors,
        )

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, *, timeout: float | None = None) -> None:
        """
        Stop the background tasks and close the client if the quota made it
        (from a URL). Leases still held are not released: they expire after
        *ttl*. Further calls do nothing.

        Args:
            timeout: Seconds to wait for the tasks to stop, or `None` for
                *backend_timeout* per step.
        """
        _checks.seconds("timeout", timeout, allow_none=True, zero_ok=True)
        if self._closed:
            return
        self._closed = True
        await self._keeper.aclose(self._timeout if timeout is None else timeout)
        if self._owned:
            await self._client.aclose()

    def __repr__(self) -> str:
        return (
            f"<usercontext.redis.RedisQuota(per_key={self._per_key!r}, total={self._total!r}, "
            f"prefix={self._prefix!r}, in_use={self._n_in_use}, waiting={self._n_waiting})>"
        )

    # -- Redis ----------------------------------------------------------------

    def _lease_key(self, key: str) -> str:
        """
        The Redis key of the leases of *key*, which every script declares:
        a cluster routes the call by its hash tag.
        """
        return self._key_head + key + self._key_tail

    async def _eval(self, name: str, key: str, *args: str) -> Any:
        """
        Run script *name* for *key* by its SHA (loading it on ``NOSCRIPT``)
        within *backend_timeout*.

        Raises:
            Down: If Redis did not answer in time.
        """
        client = self._client
        command = (*self._heads[name], self._key_head + key + self._key_tail, *args)
        try:
            try:
                if self._bounded:
                    return await client.execute_command(*command)  # type: ignore[no-untyped-call]
                async with within(self._timeout):
                    return await client.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoScriptError:
                # Redis restarted, or its scripts were flushed: load it again.
                self._script_loads += 1
                async with within(self._timeout):
                    await client.script_load(self._scripts[name].script)
                    return await client.execute_command(*command)  # type: ignore[no-untyped-call]
        except MaxConnectionsError:
            raise  # the client's pool is too small for the load: not an outage
        except DOWN as e:
            raise Down(e) from e

    async def _wait(
        self, key: str, lease_id: str, waiter: Waiter, timeout: float | None, start: float
    ) -> Lease:
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self._n_waiting += 1
        waiter.queue()
        self._keeper.nudge()
        try:
            fence = await self._wait_for_grant(key, lease_id, waiter, timeout, start)
        except BaseException as e:
            self._unwait(key, lease_id)
            if isinstance(e, Down):
                # Leave once Redis answers, lest a release hand it a slot.
                self._keeper.spawn(self._leave_later(key, lease_id))
            else:
                self._cancelled += 1
                await _finish(self._leave_quietly(key, lease_id))
            raise
        self._unwait(key, lease_id)
        if fence is not None:
            return self._grant(key, lease_id, fence)
        # Timed out: leave, giving back a slot granted in the race.
        self._timed_out += 1
        reply = await _finish(self._leave_quietly(key, lease_id))
        waited = asyncio.get_running_loop().time() - start
        if reply is None or reply[0] != 0:
            n = all_n = self._per_key
        else:
            n, all_n = int(reply[1]), int(reply[2])
        raise self._full(QuotaTimeoutError, key, n, all_n, waited, timeout)

    async def _wait_for_grant(
        self, key: str, lease_id: str, waiter: Waiter, timeout: float | None, start: float
    ) -> int | None:
        """
        Wait for the grant of *waiter*; return its fencing token, or `None`
        at the timeout. Queue the waiter again if Redis forgot it.

        Raises:
            Down: If Redis became unavailable while it waited.
        """
        loop = asyncio.get_running_loop()
        while True:
            left = None if timeout is None else start + timeout - loop.time()
            # asyncio.wait returns at the timeout rather than throwing into
            # this frame, and leaves the future alone.
            future = waiter.future
            assert future is not None  # noqa: S101  # queued by _wait
            done, _ = await asyncio.wait((future,), timeout=left)
            if not done:
                return None
            outcome = future.result()
            if isinstance(outcome, int):
                return outcome
            if isinstance(outcome, Down):
                raise outcome
            # Redis forgot the waiter (restarted, or this process stalled past
            # the time to live): queue again, at the end.
            waiter.reset()
            reply = await self._eval("ACQUIRE", key, lease_id)
            if type(reply) is int:
                return reply

    def _unwait(self, key: str, lease_id: str) -> None:
        self._keeper.waiters.pop(lease_id, None)
        n = self._waiting[key] - 1
        if n:
            self._waiting[key] = n
        else:
            del self._waiting[key]
        self._n_waiting -= 1

    async def _leave_quietly(self, key: str, lease_id: str) -> Any:
        """
        Take *lease_id* off the queue of *key*, giving back a slot granted to
        it; return the script's reply, or `None` if Redis did not answer (the
        waiter and a slot granted to it then expire with the time to live).
        """
        try:
            return await self._eval("LEAVE", key, lease_id)
        except Down:
            return None

    async def _leave_later(self, key: str, lease_id: str) -> None:
        """
        Leave the queue of *key* once Redis answers again, for up to the time
        to live (the waiter expires by then).
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + self._ttl
        # The body runs (test_leaves_its_queue_once_redis_answers), but on
        # Python 3.11 a coroutine resumed by a cancellation sends no "call"
        # event, and coverage misses the arc into it
        # (https://github.com/python/cpython/issues/106749).
        while (  # pragma: no branch  # noqa: ASYNC110  # retries a round trip
            await self._leave_quietly(key, lease_id) is None and loop.time() < end
        ):
            await asyncio.sleep(0.1)

    def _grant(self, key: str, lease_id: str, fence: int) -> RedisLease:
        lease = new_lease(self, key, lease_id, fence)
        self._take(key)
        self._keeper.hold(lease)
        return lease

    def _take(self, key: str) -> None:
        self._in_use[key] = self._in_use.get(key, 0) + 1
        n = self._n_in_use = self._n_in_use + 1
        self._granted += 1
        self._peak = max(self._peak, n)

    def _forget(self, lease: RedisLease) -> None:
        """
        Mark *lease* released and count its slot out of this object's.
        """
        lease._quota = None
        key = lease._key
        n = self._in_use[key] - 1
        if n:
            self._in_use[key] = n
        else:
            del self._in_use[key]
        self._n_in_use -= 1
        self._keeper.held.pop(lease._id, None)

    async def _release(self, lease: RedisLease) -> None:
        try:
            await self._eval("RELEASE", lease._key, lease._id)
        except Down as e:
            self._release_errors += 1
            self._keeper.log_release_error(lease, e)

    def _give_back(self, lease: Lease) -> None:
        """
        `Lease.release` of a `RedisLease` still held, in sync code: the round
        trip runs in a task of its own (the slot comes back with its lease's
        expiry if it cannot).
        """
        assert isinstance(lease, RedisLease)  # noqa: S101  # only RedisQuota grants them
        self._forget(lease)
        if lease._local is not None:
            lease._local.release()
        else:
            self._keeper.spawn(self._release(lease))

    # -- failures -------------------------------------------------------------

    def _full(  # noqa: PLR0913, PLR0917  # the six fields of a QuotaError
        self,
        cls: type[QuotaError],
        key: str,
        n: int,
        all_n: int,
        waited: float,
        timeout: float | None,
    ) -> QuotaError:
        if n >= self._per_key or self._total is None:
            return cls(key, self._per_key, "key", n, waited, timeout)
        return cls(key, self._total, "total", all_n, waited, timeout)

    def _unavailable(self, e: Down) -> BackendUnavailableError:
        cause = e.__cause__
        what = (
            "no answer"
            if isinstance(cause, asyncio.TimeoutError)
            else f"{type(cause).__name__}: {cause}"
        )
        return BackendUnavailableError(
            f"Redis did not answer the quota within {self._timeout} s ({what}), and "
            "on_unavailable is 'fail_closed': the request was refused. Retry shortly, check "
            "that Redis is up, or pass on_unavailable='fail_open' to fall back to a "
            "per-process quota while it is unavailable."
        )

    def _refuse_closed(self) -> None:
        msg = (
            f"{self!r} was closed: it grants no more slots. Make a new RedisQuota, or "
            "close it only once the code using it has finished."
        )
        raise QuotaError(msg)

    async def _acquire_local(self, key: str, timeout: float | None) -> Lease:
        fallback = self._fallback
        if fallback is None:
            fallback = self._fallback = LocalQuota(per_key=self._per_key, total=self._total)
        try:
            inner = await fallback.acquire(key, timeout=timeout)
        except QuotaTimeoutError:
            self._timed_out += 1
            raise
        except QuotaExceededError:
            self._rejected += 1
            raise
        except BaseException:
            self._cancelled += 1
            raise
        lease = new_lease(self, key, "", None)
        lease._local = inner
        self._take(key)
        self._fallbacks += 1
        return lease


async def _finish(coro: Coroutine[Any, Any, Any]) -> Any:
    """
    Run *coro* to its end even if the caller is cancelled meanwhile, then
    raise the cancellation: a release or a leave is never cut half-way.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise  # the task itself was cancelled (the loop is closing)
            cancelled = True
            continue
        if cancelled:
            # Run by test_cancelled_while_redis_is_paused; on Python 3.11 a
            # coroutine resumed by a cancellation sends no "call" event, and
            # coverage misses it (https://github.com/python/cpython/issues/106749).
            raise asyncio.CancelledError  # pragma: no cover
        return result

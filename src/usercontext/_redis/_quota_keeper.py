"""
The background work of one `usercontext.redis.RedisQuota` in one process:
the renewal task (every lease and waiter of the process in one round trip,
which doubles as the fallback poll of waiters), the Pub/Sub listener that
receives the wake-ups of the process's waiters, and the probe that brings
the quota back to Redis after an outage.
"""

# redis-py's asyncio client types many methods with untyped **kwargs
# (pubsub, ping, from_url) and its pipeline's execute_command as `...`.
# pyright: reportUnknownMemberType=false

from __future__ import annotations

import asyncio
import logging
import sys

from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

    from ._quota import RedisQuota
    from ._quota_lease import RedisLease


if TYPE_CHECKING:
    # The type checkers run for Python 3.10, whose asyncio has no timeout:
    # the signature both implementations below share.
    from contextlib import AbstractAsyncContextManager

    def within(delay: float | None, /) -> AbstractAsyncContextManager[object]: ...

elif sys.version_info >= (3, 11):
    from asyncio import timeout as within
else:  # pragma: no cover  # Python 3.10 only (run there by CI, not by coverage)
    from async_timeout import timeout as within

if sys.version_info >= (3, 11):

    def _cancelled() -> bool:
        """
        Whether the running task was asked to stop, even if the cancellation
        never reached the loop: redis-py may turn it into an error of its own,
        which a loop survives, and ``asyncio.run`` would then wait for the loop
        forever at shutdown (of a quota never closed).
        """
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

else:  # pragma: no cover  # Python 3.10 only (run there by CI, not by coverage)

    def _cancelled() -> bool:
        # No Task.cancelling: a cancellation ends a loop where it reaches it.
        return False


__all__ = ["DOWN", "REQUEUE", "Down", "Keeper", "Waiter", "within"]

logger = logging.getLogger("usercontext")

#: What a command that did not reach Redis raises.
DOWN = (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError)


class Down(Exception):  # noqa: N818  # internal: a marker, never seen by users
    """
    Redis did not answer; the cause is the error of the command.
    """


#: What a waiter's future gets when Redis forgot it: queue again.
REQUEUE: Any = object()
# Seconds between the probes of Redis while the quota serves from its fallback.
_PROBE = 0.2
# Seconds before the listener subscribes again after its connection failed.
_RESUBSCRIBE = 0.1


class Waiter:
    """
    A request of this process waiting in a Redis queue: its future gets the
    fencing token of its grant, `REQUEUE`, or a `Down`. The future is made
    once the request is queued: most requests are granted at once, and a
    grant that comes before (its wake-up may overtake the reply) waits in
    *early*.
    """

    __slots__ = ("early", "future", "key", "queued")

    def __init__(self, key: str) -> None:
        self.key = key
        self.future: asyncio.Future[Any] | None = None
        self.early: object = None
        self.queued = False

    def queue(self) -> None:
        """
        The request was queued: wait from now on.
        """
        self.queued = True
        self.future = asyncio.get_running_loop().create_future()
        if self.early is not None:
            self.future.set_result(self.early)

    def reset(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def settle(self, outcome: object) -> None:
        future = self.future
        if future is None:
            if self.early is None:  # pragma: no branch  # a second grant is the same
                self.early = outcome
        # A grant may come twice: by its wake-up and by a renewal round.
        elif not future.done():  # pragma: no branch
            future.set_result(outcome)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Keeper:
    """
    The tasks of one quota object: renewal and poll, wake-ups, probe.
    """

    def __init__(self, quota: RedisQuota, poll_interval: float) -> None:
        self.quota = quota
        self.poll = poll_interval
        self.every = quota._ttl / 3
        self.held: dict[str, RedisLease] = {}
        self.waiters: dict[str, Waiter] = {}
        self.subscribed = False
        self.wakeups = 0
        self.renewals = 0
        self.renew_errors = 0
        self._renewer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._spawned: set[asyncio.Task[Any]] = set()
        self._nudged = asyncio.Event()
        self._ready = asyncio.Event()
        self._poll_now = False
        # Checked by every loop, with the cancellation of its task: redis-py
        # may turn a cancellation into an error of its own, which a loop would
        # otherwise survive.
        self.closed = False

    # -- called by the quota --------------------------------------------------

    def hold(self, lease: RedisLease) -> None:
        """
        Renew *lease* from now on, until it is released.
        """
        self.held[lease._id] = lease
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    def nudge(self) -> None:
        """
        A waiter was queued: poll on its schedule from now on.
        """
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        self._nudged.set()

    async def listening(self) -> None:
        """
        Return once the wake-up channel of the process is subscribed.

        Raises:
            Down: If Redis did not confirm within *backend_timeout*.
        """
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            async with within(self.quota._timeout):
                await self._ready.wait()
        except asyncio.TimeoutError as e:
            raise Down(e) from e

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """
        Run *coro* in a task of its own, kept until it ends.
        """
        task = asyncio.get_running_loop().create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return task

    def outage(self, error: Down) -> None:
        """
        Switch the quota to its fallback (``fail_open``), log it once, and
        probe Redis until it answers again.
        """
        q = self.quota
        if not q._available:
            return
        q._available = False
        q._outages += 1
        logger.warning(
            "Redis did not answer the quota %r within %s s (%s): it serves requests from a "
            "per-process quota with the same limits until Redis answers again.",
            q,
            q._timeout,
            _describe(error),
        )
        self._prober = self.spawn(self._probe())

    def log_release_error(self, lease: RedisLease, error: Down) -> None:
        """
        Log a release that did not reach Redis: a warning the first time.
        """
        level = logging.WARNING if self.quota._release_errors == 1 else logging.DEBUG
        logger.log(
            level,
            "Releasing %r did not reach Redis (%s): its slot comes back when the lease "
            "expires, within %s s.",
            lease,
            _describe(error),
            self.quota._ttl,
        )

    async def aclose(self, timeout: float) -> None:
        """
        Let pending releases finish (for up to *timeout*), then stop every task.
        """
        if self._spawned:
            await asyncio.wait(set(self._spawned), timeout=timeout)
        self.closed = True
        self._nudged.set()
        tasks = [t for t in (self._renewer, self._listener, self._prober, *self._spawned) if t]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        closed = Down()
        closed.__cause__ = ConnectionError("the quota was closed")
        for waiter in self.waiters.values():
            waiter.settle(closed)

    # -- the renewal task -----------------------------------------------------

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        q = self.quota
        last = loop.time()
        # A lease is renewed at the first round after its grant, at most
        # *every* later: `hold` need not wake this task (that would cost a
        # task switch per grant), and a round with nothing to renew is free.
        while not (self.closed or _cancelled()):
            due = last + (self.poll if q._n_waiting else self.every)
            if self._poll_now or loop.time() >= due:
                self._poll_now = False
                last = loop.time()
                await self._round()
                continue
            self._nudged.clear()
            # A timer that sets the event, rather than a timeout thrown into
            # this frame: cheaper, and coverage keeps tracing the frame.
            timer = loop.call_at(due, self._nudged.set)
            try:
                await self._nudged.wait()
            finally:
                timer.cancel()

    async def _round(self) -> None:  # noqa: C901, PLR0912  # one round, in order
        """
        Renew every lease and waiter of the process, one script call per
        hash tag, in one pipeline; act on what Redis says was lost or granted.
        """
        q = self.quota
        groups: dict[str, tuple[list[str], list[str]]] = {}
        per_user = q._total is None
        for lease_id, lease in self.held.items():
            group = groups.setdefault(lease._key if per_user else "", ([], []))
            group[0].extend((lease._key, lease_id))
        for waiter_id, waiter in self.waiters.items():
            if waiter.queued:
                group = groups.setdefault(waiter.key if per_user else "", ([], []))
                group[1].extend((waiter.key, waiter_id))
        if not groups:
            return
        calls: list[tuple[str, tuple[str, ...]]] = []
        for leases, waiters in groups.values():
            user = leases[0] if leases else waiters[0]
            calls.append((q._lease_key(user), (str(len(leases) // 2), *leases, *waiters)))
        try:
            results = await self._pipeline(calls)
        except Down as e:
            self._failed(e)
            return
        except Exception:
            self.renew_errors += 1
            logger.exception("Renewing the leases of the quota %r failed", q)
            return
        self.renewals += 1
        for lost, granted, gone in results:
            for lease_id in lost:
                lost_lease = self.held.pop(_text(lease_id), None)
                if lost_lease is not None:
                    q._lost += 1
                    logger.warning(
                        "%r expired while it was held (the process was paused or cut off past "
                        "its time to live of %s s): its body is cancelled.",
                        lost_lease,
                        q._ttl,
                    )
                    lost_lease._lose()
            for i in range(0, len(granted), 2):
                found = self.waiters.get(_text(granted[i]))
                # A waiter may have given up since the round was sent.
                if found is not None:  # pragma: no branch
                    found.settle(int(granted[i + 1]))
            for waiter_id in gone:
                found = self.waiters.get(_text(waiter_id))
                if found is not None and found.queued:  # pragma: no branch  # as above
                    found.settle(REQUEUE)

    async def _pipeline(self, calls: list[tuple[str, tuple[str, ...]]]) -> list[Any]:
        q = self.quota
        script = q._scripts["RENEW"]
        results: list[Any] = []
        try:
            async with within(q._timeout):
                for _ in range(2):  # pragma: no branch  # the second run finds the script
                    pipe = q._client.pipeline(transaction=False)
                    for key, args in calls:
                        pipe.execute_command("EVALSHA", script.sha, 1, key, *args)
                    results = await pipe.execute(raise_on_error=False)
                    if not any(isinstance(r, NoScriptError) for r in results):
                        break
                    q._script_loads += 1
                    await q._client.script_load(script.script)
        except DOWN as e:
            raise Down(e) from e
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _failed(self, error: Down) -> None:
        """
        A round did not reach Redis: waiters learn it now (they raise, or
        fall back to the per-process quota with ``fail_open``).
        """
        self.renew_errors += 1
        q = self.quota
        if q._fail_open:
            self.outage(error)
        for waiter in self.waiters.values():
            if waiter.queued:  # pragma: no branch  # one not queued yet has its own round trip
                waiter.settle(error)

    # -- wake-ups ---------------------------------------------------------------

    async def _listen(self) -> None:
        q = self.quota
        channel = q._channel_prefix + q._proc
        # These loops end by cancellation (aclose), rarely by their test; and
        # on Python 3.11 coverage misses arcs of a coroutine resumed by a
        # cancellation (https://github.com/python/cpython/issues/106749).
        while not (self.closed or _cancelled()):  # pragma: no branch
            pubsub = q._client.pubsub()
            try:
                await pubsub.subscribe(channel)
                messages = cast("AsyncIterator[dict[str, Any]]", pubsub.listen())
                async for message in messages:  # pragma: no branch  # ends by an error
                    kind = _text(message["type"])
                    if kind == "message":
                        self._wake(_text(message["data"]))
                    elif kind == "subscribe":  # pragma: no branch  # nothing else comes
                        self.subscribed = True
                        self._ready.set()
                        # Wake-ups may have been lost while unsubscribed.
                        self._poll_now = True
                        self._nudged.set()
            except Exception as e:
                logger.debug("The wake-up channel of the quota %r failed: %s", q, _describe(e))
            finally:
                self.subscribed = False
                self._ready.clear()
                await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(_RESUBSCRIBE)

    def _wake(self, data: str) -> None:
        waiter_id, _, fence = data.partition(" ")
        self.wakeups += 1
        waiter = self.waiters.get(waiter_id)
        if waiter is not None:
            waiter.settle(int(fence))

    # -- the probe ---------------------------------------------------------------

    async def _probe(self) -> None:
        q = self.quota
        while not (self.closed or _cancelled()):  # pragma: no branch  # see _listen
            await asyncio.sleep(_PROBE)
            try:
                async with within(q._timeout):
                    await q._client.ping()
            except DOWN:
                continue
            q._available = True
            self._prober = None
            logger.warning("Redis answers the quota %r again: it uses Redis again.", q)
            return


def _describe(error: BaseException) -> str:
    cause = error.__cause__ if isinstance(error, Down) else error
    if cause is None or (isinstance(cause, asyncio.TimeoutError) and not str(cause)):
        return "no answer"
    return f"{type(cause).__name__}: {cause}"

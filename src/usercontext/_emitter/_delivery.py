"""
A sink's delivery task: it sends the sink's buffer in batches, one at a time,
retries a failing send, and gives the sink up to the dead-letter hook.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import math
import sys

from typing import TYPE_CHECKING, Any

import anyio

from usercontext._lifecycle import describe, logger, shielded
from usercontext.exceptions import SinkClosedError

from ._event import EVENTS_MISSED
from ._policies import DeadLetter
from ._sinks import CallbackSink
from ._state import Signal


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from ._event import Event
    from ._policies import Retry
    from ._state import _Attached
    from ._stats import Counters
    from ._streams import Streams


# Errors that mean the sink can never accept events again: retrying is useless.
_CLOSED = (SinkClosedError, anyio.ClosedResourceError, anyio.BrokenResourceError)

# On asyncio from Python 3.11, a send is bounded by a watchdog timer per sink
# instead of a cancel scope per send (an anyio `fail_after` costs more than
# delivering a small batch), and a detach or the close's deadline cuts a
# delivery task by a native cancellation instead of a cancel scope per task
# (which costs a third of an attach and detach): Task.uncancel() lets the task
# take back the cancellations sent to it. On trio and Python 3.10, cancel
# scopes.
_WATCHDOG = sys.version_info >= (3, 11)


class Delivery:
    """
    The delivery tasks of one hub's sinks, and what they share: the retry
    policy, the batch size, the dead-letter hook and the hub's counters.
    """

    def __init__(
        self,
        streams: Streams,
        counters: Counters,
        retry: Retry,
        max_batch: int,
        on_dead_letter: Callable[[DeadLetter], object] | None,
    ) -> None:
        self.streams = streams
        self.counters = counters
        self.retry = retry
        self.max_batch = max_batch
        self.on_dead_letter = on_dead_letter
        # The running loop on asyncio, where an idle task waits on a plain
        # future; None on trio. Set by `start`.
        self.loop: asyncio.AbstractEventLoop | None = None
        # Whether sends are bounded by a watchdog rather than by fail_after,
        # and whether tasks are cut natively rather than by cancel scopes.
        self.watch = False
        self.native = False
        self._all_ended: anyio.Event | None = None
        # Direct sinks kicked since the last flush, and whether one is due;
        # the flush runs in the hub's context, set by `start`.
        self._dirty: list[_Attached] = []
        self._flushing = False
        self.context: contextvars.Context | None = None
        # The flush's handle, made once, and the loop's queue of ready
        # handles to put it on; None where the loop keeps no such deque
        # (uvloop): then each flush is scheduled by call_soon.
        self._handle: asyncio.Handle | None = None
        self._ready: collections.deque[asyncio.Handle] | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """
        Deliver on *loop*, the running asyncio loop, or on trio if `None`.
        """
        self.loop = loop
        self.context = context = contextvars.copy_context()
        if loop is not None:
            self._handle = asyncio.Handle(self._flush, (), loop, context)
            # asyncio's own loops run what this deque holds, in order, on
            # their next turn: what call_soon does, without a handle per turn.
            ready = getattr(loop, "_ready", None)
            self._ready = ready if ready.__class__ is collections.deque else None
        self.native = loop is not None and _WATCHDOG
        self.watch = self.native and self.retry.timeout is not None

    async def run(self, a: _Attached) -> None:
        """
        Deliver to the sink of *a* until it is detached, given up, or drained.
        """
        error: BaseException | None = None
        try:
            scope = a.scope
            if scope is None:
                try:
                    await self._deliver(a)
                except asyncio.CancelledError:
                    # Cut by a detach or the close's deadline (see
                    # _Attached.cancel): ended as a cancel scope would end it.
                    if not self._cut(a):
                        raise
            else:
                with scope:
                    await self._deliver(a)
        except Exception as e:  # a bug here must not take the service down
            logger.exception("usercontext: the delivery task of %r failed", a.sink)
            error = e
        finally:
            await self._end(a, error)

    async def drain(self, deadline: float) -> None:
        """
        Let every attached sink get what is buffered for it until *deadline*,
        and wait until every delivery task ended.
        """
        self._all_ended = anyio.Event()
        for a in list(self.streams.attached.values()):
            a.draining = True
            if a.scope is not None:
                a.scope.deadline = deadline
            _wake_task(a)
        timer = None
        if self.native and math.isfinite(deadline):
            # anyio's clock on asyncio is the loop's.
            timer = self.loop.call_at(deadline, self._expire)  # type: ignore[union-attr]
        try:
            await self._all_ended.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self) -> None:
        """
        Stop every delivery at the close's deadline: no more sends, and the
        one in progress is cut.
        """
        for a in list(self.streams.attached.values()):
            a.halted = True
            a.cancel()

    async def _deliver(self, a: _Attached) -> None:
        q = a.queue
        max_batch = self.max_batch
        while True:
            first = a.handover
            if first is not None:
                # The loop turn's flush could not finish this batch itself.
                a.handover = None
                batch = a.batch
            elif not q:
                if a.draining:
                    return
                await self._sleep(a)
                if a.reason == "detached":
                    return  # woken by the detach (see Streams.detach)
                continue
            else:
                batch = _take(a, q, max_batch)
            if not await self._send(a, batch, first):
                return
            self._sent(a, batch)

    def _sent(self, a: _Attached, batch: tuple[Event, ...]) -> None:
        """
        Account for *batch*, delivered to *a*, and let a waiting producer in.
        """
        if a.timed_out or a.cuts:
            # The sink swallowed the cancellation and finished: delivered;
            # the task's count of cancellations is set right.
            self._cut(a)
        n = len(batch)
        depth = len(a.queue) + n
        a.peak = max(a.peak, depth)
        a.inflight = 0
        a.batch = ()
        if batch[0].type is EVENTS_MISSED:
            n -= 1  # a notice, not an event of the stream
        a.delivered += n
        self.counters.delivered += n
        s = a.stream
        if s.waiters:
            s.waiters[0].wake()

    async def _sleep(self, a: _Attached) -> None:
        loop = self.loop
        future = a.future = Signal() if loop is None else loop.create_future()
        # A direct sink is delivered to by the loop turn's flush while this
        # sleeps: an emit kicks the flush, not this task.
        a.waiter = future if a.kick is None else a.kick
        try:
            await future
        finally:
            a.waiter = a.future = None

    # -- sinks that cannot block, flushed once per loop turn

    def direct(self, a: _Attached) -> bool:
        """
        Deliver to *a* by the loop turn's flush if its sink cannot block: a
        `CallbackSink` of a plain function, on asyncio; return whether it is
        so. Its task is started only to retry, drain or end (see `_NoTask`):
        most such sinks never need one.
        """
        sink = a.sink
        if (
            self.loop is not None
            and isinstance(sink, CallbackSink)
            and type(sink).send is CallbackSink.send
            and not inspect.iscoroutinefunction(sink.callback)
        ):
            kick = a.kick = _Kick(self, a, sink.callback)
            a.future = _NoTask(self, a)
            if a.queue:
                kick.set_result(None)  # the replay: delivered by the next flush
            else:
                a.waiter = kick
            return True
        return False

    def _flush(self) -> None:  # noqa: C901  # the hot path, written out
        """
        Deliver to every direct sink kicked since the last flush, in the
        order they were kicked: the sink's callback is called here, with the
        same batches its task would send.
        """
        self._flushing = False
        dirty, self._dirty = self._dirty, []
        max_batch = self.max_batch
        counters = self.counters
        for a in dirty:
            future = a.future
            if future is None or future.done() or a.unlinked or a.draining:
                continue  # its task is awake: it delivers
            q = a.queue
            kick: _Kick = a.kick
            callback = kick.callback
            # Stop at a detach: by the callback, say, of its own sink.
            while q and not a.unlinked:
                n = len(q)
                if n <= max_batch:  # _take, written out
                    batch = tuple(q)
                    q.clear()
                else:
                    batch = tuple([q.popleft() for _ in range(max_batch)])
                    n = max_batch
                a.batch = batch
                a.inflight = n
                try:
                    result = callback(batch)
                except BaseException as e:  # raised in its task: retried, or ending it
                    a.handover = e
                else:
                    if result is None or not inspect.isawaitable(result):
                        # _sent, written out: this runs for every event.
                        depth = len(q) + n
                        if depth > a.peak:  # noqa: PLR1730  # a compare, not a max() call
                            a.peak = depth
                        a.inflight = 0
                        a.batch = ()
                        # A notice is not an event of the stream.
                        n -= batch[0].type is EVENTS_MISSED
                        a.delivered += n
                        counters.delivered += n
                        s = a.stream
                        if s.waiters:
                            s.waiters[0].wake()
                        continue
                    a.handover = result  # awaited by its task, under the timeout
                if not future.done():  # not cancelled meanwhile
                    future.set_result(None)
                break
            else:
                a.waiter = kick

    async def _send(  # noqa: C901, PLR0912  # every outcome of a try, in one loop
        self,
        a: _Attached,
        batch: tuple[Event, ...],
        first: Awaitable[object] | BaseException | None,
    ) -> bool:
        """
        Send *batch* to *a*, retried; return whether it was delivered. The
        first try is *first* when the flush made it: its error, or what the
        callback returned to await.
        """
        retry = self.retry
        counters = self.counters
        attempt = 1
        while True:
            if a.halted:
                return False
            error: Exception
            try:
                sent, first = (a.sink.send(batch) if first is None else first), None
                if isinstance(sent, BaseException):
                    raise sent  # noqa: TRY301  # the flush's failed try, handled as any
                a.cuttable = True
                try:
                    if self.watch:
                        await self._watched_send(a, sent)
                    elif retry.timeout is None:
                        await sent
                    else:
                        with anyio.fail_after(retry.timeout):
                            await sent
                finally:
                    a.cuttable = False
            except _CLOSED as e:
                a.send_errors += 1
                counters.send_errors += 1
                await self._dead_letter(a, "sink_closed", e)
                return False
            except Exception as e:  # any failure of a sink is retried
                error = e
            except asyncio.CancelledError:
                if not self._cut(a):
                    raise
                if a.halted:  # cut by a detach or the close's deadline
                    # mypy holds the loop's first check across the send's await.
                    return False  # type: ignore[unreachable]
                error = TimeoutError(f"the send took longer than {retry.timeout:g} s")
            else:
                return True
            a.send_errors += 1
            counters.send_errors += 1
            if attempt >= retry.attempts:
                await self._dead_letter(a, "failed", error)
                return False
            counters.retried += 1
            logger.debug("usercontext: retrying a send to %r after %s", a.sink, describe(error))
            a.cuttable = True
            try:
                await anyio.sleep(retry.delay(attempt))
            finally:
                a.cuttable = False
            attempt += 1

    async def _watched_send(self, a: _Attached, sent: Awaitable[object]) -> None:
        """
        Await *sent*, a send to *a*, under the sink's watchdog: one timer per
        sink, armed by the first send and re-armed only when it fires, so
        that a send costs a clock read.
        """
        loop = self.loop
        assert loop is not None  # noqa: S101  # watched on asyncio only
        a.sending = now = loop.time()
        if a.timer is None:
            a.timer = loop.call_at(now + self.retry.timeout, self._watch, a)  # type: ignore[operator]
        try:
            await sent
        finally:
            a.sending = None

    def _watch(self, a: _Attached) -> None:
        """
        The watchdog of *a*: cancel a send that has run past the timeout, or
        wait for the deadline of the send in progress.
        """
        a.timer = None
        started = a.sending
        if started is None:
            return  # idle: the next send arms it again
        loop, task = self.loop, a.task
        assert loop is not None  # noqa: S101  # watched on asyncio only
        assert task is not None  # noqa: S101  # set by run() when watched
        timeout = self.retry.timeout
        assert timeout is not None  # noqa: S101  # watched only with a timeout
        due = started + timeout
        if loop.time() < due:
            a.timer = loop.call_at(due, self._watch, a)
            return
        a.timed_out = True
        task.cancel()

    @staticmethod
    def _cut(a: _Attached) -> bool:
        """
        Take back the cancellations of *a*'s task that its watchdog and
        `_Attached.cancel` sent, if any; return whether no other cancellation
        is pending.
        """
        sent = a.cuts + a.timed_out
        if not sent:
            return False
        a.cuts = 0
        a.timed_out = False
        # Task.uncancel is Python 3.11's; only a native delivery is cut so.
        task: Any = a.task
        left: int = 0
        for _ in range(sent):
            left = task.uncancel()
        return left == 0

    def _take_undelivered(self, a: _Attached) -> list[Event]:
        """
        Empty the buffer of *a*, and return the events of the stream it held.
        """
        events = [*a.batch, *a.queue]
        a.peak = max(a.peak, len(events))
        a.batch = ()
        a.queue.clear()
        a.inflight = 0
        if events and events[0].type is EVENTS_MISSED:
            del events[0]  # a notice, not an event of the stream
        return events

    async def _dead_letter(self, a: _Attached, reason: str, error: BaseException | None) -> None:
        a.reason = a.reason or reason
        self.streams.unlink(a)
        events = self._take_undelivered(a)
        if not events:
            return  # only a notice was pending: nothing of the stream is lost
        self.counters.dead_lettered += len(events)
        letter = DeadLetter(a.stream.user_id, a.sink, tuple(events), reason, error)  # type: ignore[arg-type]
        hook = self.on_dead_letter
        if hook is None:
            logger.warning(
                "usercontext: %d event(s) of user %r could not be delivered to %r (%s%s); "
                "pass on_dead_letter to EmitterHub to handle them",
                len(events),
                a.stream.user_id,
                a.sink,
                reason,
                f": {describe(error)}" if error is not None else "",
            )
            return
        try:
            result = hook(letter)
            if inspect.isawaitable(result):
                limit = self.retry.timeout or 10.0
                with anyio.CancelScope(shield=True), anyio.move_on_after(limit) as scope:
                    await shielded(result)
                if scope.cancelled_caught:
                    logger.warning(
                        "usercontext: the on_dead_letter hook took longer than %g s for %d "
                        "event(s) of user %r and was cancelled; make it faster, or hand the "
                        "events to a task of your own",
                        limit,
                        len(events),
                        a.stream.user_id,
                    )
        except Exception:  # logged: the hook must not stop delivery
            logger.exception(
                "usercontext: the on_dead_letter hook failed for user %r", a.stream.user_id
            )

    async def _end(self, a: _Attached, error: BaseException | None) -> None:
        """
        Account for what *a* did not get once its delivery task ends, after
        *error* if it failed.
        """
        if a.timer is not None:
            a.timer.cancel()
            a.timer = None
        if a.reason == "detached":
            self.end_detached(a)
            return
        if a.batch or a.queue:
            # Cut by the close deadline, or by a bug in the delivery task.
            with anyio.CancelScope(shield=True):
                await self._dead_letter(a, "hub_closed" if error is None else "failed", error)
        elif error is not None:
            a.reason = a.reason or "failed"
        self._ended(a)

    def end_detached(self, a: _Attached) -> None:
        """
        End the delivery of *a*, detached: what it did not get is dropped.
        """
        self.counters.drop(a, "detached", len(self._take_undelivered(a)))
        self._ended(a)

    def _ended(self, a: _Attached) -> None:
        counters = self.counters
        self.streams.unlink(a)
        a.ended = True
        # A direct sink's kick refers to *a*: dropped, so that *a* is freed
        # without the cycle collector.
        a.kick = a.waiter = None
        counters.peak_pending = max(counters.peak_pending, a.peak)
        if a.done is not None:
            a.done.set()
        if self._all_ended is not None and not self.streams.attached:
            self._all_ended.set()


def _take(a: _Attached, q: collections.deque[Event], max_batch: int) -> tuple[Event, ...]:
    """
    Take the next batch of *a* from its queue *q*, as in flight.
    """
    if len(q) <= max_batch:
        batch = tuple(q)
        q.clear()
    else:
        batch = tuple([q.popleft() for _ in range(max_batch)])
    a.batch = batch
    a.inflight = len(batch)
    return batch


def _wake_task(a: _Attached) -> None:
    """
    Wake the delivery task of *a* if it sleeps, a direct sink's included.
    """
    a.waiter = None
    future = a.future
    if future is not None and not future.done():
        future.set_result(None)


class _Kick:
    """
    The waiter an emit wakes for a direct sink, shaped like a future: it
    kicks the loop turn's flush instead of a task.
    """

    __slots__ = ("_a", "_delivery", "callback")

    # Never done: `bool()` is False, called in C (a type is not bound as a
    # method), on the path of every event.
    done = bool

    def __init__(
        self, delivery: Delivery, a: _Attached, callback: Callable[[Sequence[Event]], object]
    ) -> None:
        self._delivery = delivery
        self._a = a
        self.callback = callback

    def set_result(self, _: None) -> None:
        d = self._delivery
        d._dirty.append(self._a)
        if not d._flushing:
            d._flushing = True
            if d._ready is not None:
                d._ready.append(d._handle)  # type: ignore[arg-type]  # made with the loop
            else:
                d.loop.call_soon(d._flush, context=d.context)  # type: ignore[union-attr]


class _NoTask:
    """
    The `future` of a direct sink whose delivery task is not started,
    shaped like the future its task would sleep on: what would wake the task
    starts it (a retry, an awaitable result, the close's drain), and a
    detach ends the delivery at once, without a task.
    """

    __slots__ = ("_a", "_delivery")

    # Never done: `bool()` is False, called in C (see _Kick).
    done = bool

    def __init__(self, delivery: Delivery, a: _Attached) -> None:
        self._delivery = delivery
        self._a = a

    def set_result(self, _: None) -> None:
        d, a = self._delivery, self._a
        a.future = None
        if a.reason == "detached":
            if a.inflight:
                # Detached by its own callback, during the flush: ended once
                # the flush accounted for the batch, as its task would be.
                d.loop.call_soon(d.end_detached, a, context=d.context)  # type: ignore[union-attr]  # direct on asyncio only
            else:
                d.end_detached(a)
        else:
            a.task = d.loop.create_task(d.run(a))  # type: ignore[union-attr]  # direct on asyncio only

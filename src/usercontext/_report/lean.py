"""
The lean reference of the "Concurrent HTTP requests" section: the example
service written by hand, without the library, with every guarantee the
library gives.

`usercontext._report.service.FloorService` is the least the scenario can
cost: it drops every guarantee. `LeanService` keeps them all, written out
for this one service with no generality, and so shows the least a library
giving them can cost, the physical limit the library's service is measured
against:

- a fresh `contextvars.Context` per request, with a new context value bound
  in it, and the client's request id taken only if it is 1 to 128 visible
  ASCII characters;
- an ordered, bounded stream of events per user, the event data validated
  and copied at emit time, each event numbered in its user's order;
- one consumer task per connected user, woken once per batch of events, the
  emitter blocking (first come, first served) while the user's buffer is full;
- a per-user quota of engines granted in arrival order (FIFO);
- cleanup in reverse order of acquisition (engine, quota slot, session), done
  before the response is sent, so that the client never sees a success whose
  cleanup failed (the response is held and becomes a 500);
- every resource closed on every path, cancellation included, and nothing
  kept for a user once the user has nothing in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import json
import os
import re
import time
import types

from typing import TYPE_CHECKING, Any

from usercontext import AGENT_COMPLETED, AGENT_STARTED

from .service import PER_USER, TOKENS, WORK_S, Agent, Session, _json_response, _lifespan


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping

    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
    LeanEvent = tuple[int, str, dict[str, Any], str, str, float]


__all__ = ["LeanContext", "LeanQuota", "LeanService", "LeanStream", "in_context"]

MAXSIZE = 1_000  # events buffered per user, as the hub's default

_JSON = (b"content-type", b"application/json")
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,128}").fullmatch
_SCALARS = (str, int, float, bool, type(None))

_COUNTS = (
    "requests",
    "sessions_opened",
    "sessions_closed",
    "engines_created",
    "engines_closed",
    "events_received",
    "events_wrong_user",
)

current_lean: contextvars.ContextVar[LeanContext] = contextvars.ContextVar("lean_context")


class LeanContext:
    """
    The context of one request: who it runs for, and its request id.
    """

    __slots__ = ("request_id", "run_id", "thread_id", "user_id")

    def __init__(self, user_id: str, thread_id: str, run_id: str, request_id: str) -> None:
        self.user_id = user_id
        self.thread_id = thread_id
        self.run_id = run_id
        self.request_id = request_id


@types.coroutine
def in_context(
    context: contextvars.Context, coro: Coroutine[Any, Any, Any]
) -> Generator[Any, Any, Any]:
    """
    Await *coro* with each of its steps run in *context*: the request's code
    sees only its own context variables, as in a task of its own, at the
    cost of one `contextvars.Context.run` per step instead of a task.
    """
    run, send, throw = context.run, coro.send, coro.throw
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = run(send, value) if error is None else run(throw, error)
        except StopIteration as stop:
            return stop.value
        error = None
        try:
            value = yield yielded
        except BaseException as exc:  # cancellation goes on into the request
            error, value = exc, None


class LeanQuota:
    """
    At most *limit* slots per key, granted in arrival order; a key is kept
    only while it has a slot held or a waiter.
    """

    __slots__ = ("_keys", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # key -> [slots held, waiters in arrival order]
        self._keys: dict[str, list[Any]] = {}

    async def acquire(self, key: str) -> None:
        """
        Take a slot of *key*, waiting behind every earlier waiter.
        """
        entry = self._keys.get(key)
        if entry is None:
            self._keys[key] = [1, collections.deque()]
            return
        if entry[0] < self.limit and not entry[1]:
            entry[0] += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        entry[1].append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.cancelled() or not waiter.done():
                with contextlib.suppress(ValueError):  # release may have dropped it
                    entry[1].remove(waiter)
                self._forget(key, entry)
            else:
                self.release(key)  # granted as it was cancelled: pass the slot on
            raise

    def release(self, key: str) -> None:
        """
        Give back a slot of *key*: to the first waiter, if any.
        """
        entry = self._keys[key]
        waiters = entry[1]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it, held all along
                return
        entry[0] -= 1
        self._forget(key, entry)

    def _forget(self, key: str, entry: list[Any]) -> None:
        if not entry[0] and not entry[1] and self._keys.get(key) is entry:
            del self._keys[key]

    def keys(self) -> int:
        """
        How many keys it keeps.
        """
        return len(self._keys)


class LeanStream:
    """
    One user's ordered, bounded buffer of events and its consumer task, which
    hands each batch to *sink* in one call.
    """

    __slots__ = (
        "_closing",
        "_consumer",
        "_events",
        "_reserved",
        "_room",
        "_wake",
        "delivered",
        "seq",
        "sink",
    )

    def __init__(self, sink: Callable[[list[LeanEvent]], None]) -> None:
        self.sink = sink
        self.seq = 0
        self.delivered = 0
        self._events: collections.deque[LeanEvent] = collections.deque()
        self._room: collections.deque[asyncio.Future[None]] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._closing = False
        self._reserved = 0  # places given to blocked emitters not yet back
        self._consumer = asyncio.ensure_future(self._consume())

    async def emit(self, ctx: LeanContext, type_: str, data: dict[str, Any]) -> None:
        """
        Validate and copy *data*, number the event in the user's order, and
        buffer it, waiting (first come, first served) while the buffer is full.
        """
        if type(data) is not dict or not all(
            type(k) is str and isinstance(v, _SCALARS) for k, v in data.items()
        ):
            msg = "Event data must be a dict of str keys and JSON scalar values."
            raise TypeError(msg)
        data = data.copy()
        events = self._events
        if len(events) + self._reserved >= MAXSIZE or self._room:
            room = asyncio.get_running_loop().create_future()
            self._room.append(room)
            try:
                await room
            except BaseException:
                if room.cancelled() or not room.done():
                    with contextlib.suppress(ValueError):  # the consumer may have dropped it
                        self._room.remove(room)
                else:
                    self._reserved -= 1  # granted as it was cancelled: the place is free
                raise
            self._reserved -= 1
        self.seq += 1
        events.append((self.seq, type_, data, ctx.user_id, ctx.request_id, time.time()))
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set_result(None)  # one wake-up for all the events up to the next turn

    async def _consume(self) -> None:
        events, room = self._events, self._room
        while True:
            if not events:
                if self._closing:
                    return
                self._wake = wake = asyncio.get_running_loop().create_future()
                await wake
            batch = list(events)
            events.clear()
            self.delivered += len(batch)
            self.sink(batch)
            # Places for the blocked emitters, in the order they came.
            while room and len(events) + self._reserved < MAXSIZE:
                waiter = room.popleft()
                if not waiter.done():
                    self._reserved += 1
                    waiter.set_result(None)

    async def aclose(self) -> None:
        """
        Deliver what is buffered, then end the consumer.
        """
        self._closing = True
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set_result(None)
        await self._consumer


class LeanService:
    """
    The example service written by hand with every guarantee the library
    gives (see the module); the same ASGI app, connections and checks as
    `usercontext._report.service.Service`.
    """

    def __init__(self, work_s: float = WORK_S) -> None:
        self.work_s = work_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.asgi: ASGIApp = self._app
        self.quota = LeanQuota(PER_USER)
        self.streams: dict[str, LeanStream] = {}
        self.counts = collections.Counter[str]()

    async def _app(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.loop = asyncio.get_running_loop()
            await _lifespan(receive, send, None)
            return
        await in_context(contextvars.copy_context(), self._request(scope, send))

    async def _request(self, scope: MutableMapping[str, Any], send: Send) -> None:
        token = incoming = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value
            elif name == b"x-request-id":
                incoming = value
        user_id = TOKENS.get(token) if token is not None else None
        request_id = (
            incoming.decode()
            if incoming is not None and _VALID_ID(incoming)
            else os.urandom(16).hex()
        )
        if user_id is None:
            await _json_response(send, 401, {"error": "unauthenticated"})
            return
        ctx = LeanContext(user_id, "web", "agent", request_id)
        current_lean.set(ctx)  # the request's own Context: nothing to reset
        self.counts["requests"] += 1
        try:
            payload = await self._work(ctx)
        except Exception:
            await _json_response(send, 500, {"error": "internal_error"})
            raise
        body = json.dumps(payload).encode()
        headers = [
            _JSON,
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _work(self, ctx: LeanContext) -> dict[str, Any]:
        """
        Run the agent; return the response once every resource is closed,
        last taken first closed.
        """
        counts = self.counts
        session = Session(ctx)  # type: ignore[arg-type]  # it reads user_id only
        counts["sessions_opened"] += 1
        try:
            await self.quota.acquire(ctx.user_id)
            try:
                agent = Agent(ctx)  # type: ignore[arg-type]  # it reads user_id only
                counts["engines_created"] += 1
                try:
                    stream = self.streams.get(ctx.user_id)
                    if stream is not None:
                        await stream.emit(ctx, AGENT_STARTED, {"agent": "triage"})
                    await asyncio.sleep(self.work_s)
                    if stream is not None:
                        await stream.emit(ctx, AGENT_COMPLETED, {"agent": "triage", "result": "ok"})
                finally:
                    counts["engines_closed"] += 1
            finally:
                self.quota.release(ctx.user_id)
        finally:
            session.closed = True
            counts["sessions_closed"] += 1
        return {
            "user_id": ctx.user_id,
            "request_id": ctx.request_id,
            "session_user_id": session.user_id,
            "engine_user_id": agent.user_id,
        }

    def connect(self) -> None:
        """
        Connect every user: a stream per user, whose sink checks that it
        gets only its user's events.
        """
        for user_id in TOKENS.values():
            self.streams[user_id] = LeanStream(self._sink(user_id))

    def _sink(self, user_id: str) -> Callable[[list[LeanEvent]], None]:
        counts = self.counts

        def receive(events: list[LeanEvent]) -> None:
            counts["events_received"] += len(events)
            counts["events_wrong_user"] += sum(e[3] != user_id for e in events)

        return receive

    async def settle(self) -> dict[str, Any]:
        """
        Deliver what is buffered, disconnect every user, and return what is
        left.
        """
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            await stream.aclose()
        emitted = sum(s.seq for s in streams)
        counts = self.counts
        return {
            **{key: counts[key] for key in _COUNTS},
            "events_emitted": emitted,
            "events_delivered": sum(s.delivered for s in streams),
            "streams": len(self.streams),
            "quota_keys": self.quota.keys(),
        }

"""
The example service that the "Concurrent HTTP requests" section of
``usercontext report`` drives, and its floor.

`Service` is built the way the library is meant to be used, as a pure ASGI
app: `usercontext.asgi.UserContextMiddleware` resolving each user from a
bearer token, a `usercontext.Registry` with a per-request session, an
`usercontext.EngineFactory` with two engines per user running a short fake
agent, and an `usercontext.EmitterHub` carrying the agent's events to one
connection per user. Each response echoes the user id and request id that the
request ran under. `FloorService` is the same service without the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

from typing import TYPE_CHECKING, Any

import attrs

from usercontext import (
    AGENT_COMPLETED,
    AGENT_STARTED,
    CallbackSink,
    EmitterHub,
    EngineFactory,
    Registry,
    UnauthenticatedError,
    UserContext,
    current,
)
from usercontext.asgi import UserContextMiddleware, request_state


if TYPE_CHECKING:
    from collections.abc import (
        Awaitable,
        Callable,
        Iterator,
        MutableMapping,
        Sequence,
    )

    from usercontext import Attachment, Event

    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


__all__ = ["TOKENS", "Agent", "FloorService", "Service", "Session", "Tally", "resolve"]

USERS = 100
PER_USER = 2
WORK_S = 0.01  # the legacy scenario's "~10ms simulated work"
IDLE_TTL = 0.02  # how long the hub keeps a user without connections
SETTLE_S = 5.0  # the most time given to deliveries and evictions after a run

_JSON = (b"content-type", b"application/json")
TOKENS = {f"Bearer tok-{u:03d}".encode(): f"user-{u:03d}" for u in range(USERS)}


class Session:
    """
    The per-request resource: stands for a database session.
    """

    __slots__ = ("closed", "user_id")

    def __init__(self, ctx: UserContext) -> None:
        self.user_id = ctx.user_id
        self.closed = False


class Agent:
    """
    The engine: a fake agent that works for a few milliseconds.
    """

    __slots__ = ("user_id",)

    def __init__(self, ctx: UserContext) -> None:
        self.user_id = ctx.user_id


@attrs.define
class Tally:
    """
    What a service made, closed and delivered, and what its sinks saw.
    """

    requests: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    engines_closed: int = 0
    events_received: int = 0
    events_wrong_user: int = 0


def resolve(scope: MutableMapping[str, Any]) -> UserContext:
    """
    The middleware's resolver: the user of the request's bearer token.
    """
    for name, value in scope["headers"]:
        if name == b"authorization":
            user_id = TOKENS.get(value)
            if user_id is not None:
                return UserContext(user_id=user_id, thread_id="web", run_id="agent")
    raise UnauthenticatedError("Send a known bearer token.")


async def _json_response(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send, hub: EmitterHub | None) -> None:
    """
    Run the ASGI lifespan protocol, with *hub* open from startup to shutdown.
    """
    await receive()  # lifespan.startup
    async with contextlib.AsyncExitStack() as stack:
        if hub is not None:
            await stack.enter_async_context(hub)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
    await send({"type": "lifespan.shutdown.complete"})


class Service:
    """
    The example service: the library's pieces wired as a real service would.

    Its ASGI app (`asgi`) serves ``GET /agent``: it takes the request's session
    from the registry scope, runs the fake agent on an engine from the factory
    (two per user at most), which emits ``agent_started`` and
    ``agent_completed`` to the user's stream, and answers with the user id and
    request id it ran under. Each user has one connection (a sink) attached
    to the hub while a run is on.
    """

    def __init__(self, work_s: float = WORK_S) -> None:
        self.work_s = work_s
        self.tally = Tally()
        self.registry = Registry()
        self.registry.register(Session, self._session)
        self.factory: EngineFactory[Agent] = EngineFactory(
            Agent, close=self._close_agent, per_user=PER_USER
        )
        self.hub = EmitterHub(idle_ttl=IDLE_TTL)
        self.asgi: ASGIApp = UserContextMiddleware(
            self._app, resolver=resolve, registry=self.registry, hub=self.hub
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self._attachments: list[Attachment] = []

    def _session(self, ctx: UserContext) -> Iterator[Session]:
        session = Session(ctx)
        self.tally.sessions_opened += 1
        try:
            yield session
        finally:
            session.closed = True
            self.tally.sessions_closed += 1

    def _close_agent(self, _agent: Agent) -> None:
        self.tally.engines_closed += 1

    async def _app(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.loop = asyncio.get_running_loop()
            await _lifespan(receive, send, self.hub)
            return
        self.tally.requests += 1
        state = request_state(scope)
        assert state.resources is not None  # noqa: S101  # the middleware has a registry
        session = await state.resources.aget(Session)
        async with self.factory.engine() as agent:
            emitter = state.emitter
            await emitter.emit(AGENT_STARTED, {"agent": "triage"})
            await asyncio.sleep(self.work_s)
            await emitter.emit(AGENT_COMPLETED, {"agent": "triage", "result": "ok"})
        ctx = current()
        payload = {
            "user_id": ctx.user_id,
            "request_id": ctx.request_id,
            "session_user_id": session.user_id,
            "engine_user_id": agent.user_id,
        }
        await _json_response(send, 200, payload)

    def connect(self) -> None:
        """
        Attach one connection per user to the hub, each checking that it gets
        only its user's events.
        """
        for user_id in TOKENS.values():
            self._attachments.append(self.hub.attach(user_id, CallbackSink(self._sink(user_id))))

    def _sink(self, user_id: str) -> Callable[[Sequence[Event]], None]:
        tally = self.tally

        def receive(events: Sequence[Event]) -> None:
            tally.events_received += len(events)
            tally.events_wrong_user += sum(e.user_id != user_id for e in events)

        return receive

    async def settle(self) -> dict[str, Any]:
        """
        Wait for the events to be delivered, disconnect every user, wait for
        the hub to forget them, and return what is left.
        """
        deadline = time.monotonic() + SETTLE_S
        stats = self.hub.stats()
        while stats.delivered < stats.emitted and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
            stats = self.hub.stats()
        for attachment in self._attachments:
            attachment.detach()
        self._attachments.clear()
        while self.hub.stats().users and time.monotonic() < deadline:  # noqa: ASYNC110  # no event to wait on
            await asyncio.sleep(IDLE_TTL / 4)
        return self.state()

    def state(self) -> dict[str, Any]:
        """
        Return the service's counters and the per-request state it holds now.
        """
        registry, factory, hub = self.registry.stats(), self.factory.stats(), self.hub.stats()
        quota = self.factory.quota.stats()
        return {
            **attrs.asdict(self.tally),
            "scopes": registry.scopes,
            "opened": registry.opened,
            "resources_open": registry.in_use,
            "engines_created": factory.created,
            "engines_active": factory.in_use,
            "peak_engines": factory.peak,
            "quota_in_use": quota.in_use,
            "quota_waiting": quota.waiting,
            "quota_keys": quota.keys,
            "hub_users": hub.users,
            "hub_attached": hub.attached,
            "events_emitted": hub.emitted,
            "events_delivered": hub.delivered,
        }


class FloorService:
    """
    The floor: the same service without the library. It takes the user from
    a dict of tokens, limits engines with one `asyncio.Semaphore` per user,
    makes and closes the session and the engine by hand, and appends the
    events to a list per user.
    """

    def __init__(self, work_s: float = WORK_S) -> None:
        self.work_s = work_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.asgi: ASGIApp = self._app
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._events: dict[str, list[tuple[str, str]]] = {}

    async def _app(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.loop = asyncio.get_running_loop()
            await _lifespan(receive, send, None)
            return
        headers = dict(scope["headers"])
        user_id = TOKENS.get(headers.get(b"authorization", b""))
        if user_id is None:
            await _json_response(send, 401, {"error": "unauthenticated"})
            return
        incoming = headers.get(b"x-request-id")
        request_id = os.urandom(16).hex() if incoming is None else incoming.decode("latin-1")
        session = Session(UserContext(user_id=user_id, thread_id="web", run_id="agent"))
        try:
            sem = self._sems.get(user_id)
            if sem is None:
                sem = self._sems[user_id] = asyncio.Semaphore(PER_USER)
            async with sem:
                events = self._events.setdefault(user_id, [])
                events.append((AGENT_STARTED, request_id))
                await asyncio.sleep(self.work_s)
                events.append((AGENT_COMPLETED, request_id))
        finally:
            session.closed = True
        payload = {
            "user_id": user_id,
            "request_id": request_id,
            "session_user_id": session.user_id,
            "engine_user_id": user_id,
        }
        body = json.dumps(payload).encode()
        start = [
            _JSON,
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        await send({"type": "http.response.body", "body": body})

    def connect(self) -> None:
        """
        Nothing to attach: the floor keeps its events in lists.
        """
        self._events.clear()

    async def settle(self) -> dict[str, Any]:
        """
        Return what the floor holds after a run.
        """
        return {
            "semaphores": len(self._sems),
            "event_lists": len(self._events),
            "events": sum(len(e) for e in self._events.values()),
        }

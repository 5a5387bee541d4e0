"""
The floors ``usercontext report`` compares against, and the harness that
``benchmarks/`` shares with it.

A floor is the least any code doing the same job must do: a frozen attrs class
in place of `usercontext.UserContext`, a bare `ContextVar` set and reset in
place of `usercontext.bind`, a dict of ints in place of a quota, events built
by hand and put on an `asyncio.Queue` in place of an emitter. The benchmarks
import them from here, so that both measure against the same floors; the
event harness (a counting sink, a hub running on a loop, a run over a local
socket) is here for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import socket
import time

from json.encoder import encode_basestring_ascii
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from usercontext import Emitter, EmitterHub, Event, UserContext


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from typing_extensions import Self


__all__ = [
    "BOUND",
    "CTX",
    "DATA",
    "TYPE",
    "CountingSink",
    "DictQuota",
    "Floor5",
    "Floor9",
    "FloorBind",
    "FloorEvent",
    "FloorEvents",
    "FloorScope",
    "RejectedError",
    "RunningHub",
    "floor_var",
    "socket_run",
]


# -- Contexts ----------------------------------------------------------------


@attrs.frozen
class Floor5:
    """
    The creation floor: a frozen attrs slots class with five str fields.
    """

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    connection_id: str


# The same fields as UserContext, in a plain frozen attrs slots class: the
# shape a context cannot be smaller than.
Floor9: type = attrs.make_class(
    "Floor9",
    [a.name for a in attrs.fields(UserContext)],
    frozen=True,
    slots=True,
    weakref_slot=False,
)

# The variable the `bind` and `current()` floors set and read.
floor_var: contextvars.ContextVar[object] = contextvars.ContextVar("usercontext_report_floor")


class FloorBind:
    """
    The `bind` floor: the least a class-based context manager can do.
    """

    __slots__ = ("_token", "_value")

    def __init__(self, value: object) -> None:
        self._value = value

    def __enter__(self) -> object:
        self._token = floor_var.set(self._value)
        return self._value

    def __exit__(self, *exc_info: object) -> None:
        floor_var.reset(self._token)


# -- Registry scopes ---------------------------------------------------------


class FloorScope:
    """
    The floor of a registry scope: the least a scope can do for a request. It
    binds the context with a bare `ContextVar` set and reset, calls the
    generator provider of a key, takes its first value, caches it in a dict,
    and on exit finishes the generators in reverse order. No isolation checks,
    no counters, no error collection, no warning for a scope never closed, and
    no shield or timeout around async cleanups.
    """

    __slots__ = ("_ctx", "_gens", "_providers", "_resources", "_token")

    def __init__(self, providers: dict[Any, Callable[[Any], Any]], ctx: object) -> None:
        self._providers = providers
        self._ctx = ctx
        self._resources: dict[Any, Any] = {}
        self._gens: list[Any] = []

    def __enter__(self) -> Self:
        self._token = floor_var.set(self._ctx)
        return self

    def get(self, key: Any) -> Any:
        """
        Return the value of *key*, made by its generator provider once.
        """
        resources = self._resources
        if key in resources:
            return resources[key]
        gen = self._providers[key](self._ctx)
        value = resources[key] = next(gen)
        self._gens.append(gen)
        return value

    def __exit__(self, *exc_info: object) -> None:
        gens = self._gens
        while gens:
            next(gens.pop(), None)
        floor_var.reset(self._token)

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def aget(self, key: Any) -> Any:
        """
        Return the value of *key*, made by its async generator provider once.
        """
        resources = self._resources
        if key in resources:
            return resources[key]
        agen = self._providers[key](self._ctx)
        value = resources[key] = await anext(agen)
        self._gens.append(agen)
        return value

    async def __aexit__(self, *exc_info: object) -> None:
        gens = self._gens
        while gens:
            await anext(gens.pop(), None)
        floor_var.reset(self._token)


# -- Quotas ------------------------------------------------------------------


class DictQuota:
    """
    The plain-Python floor of a quota: a dict of ints and a fixed limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def try_acquire(self, key: str) -> str | None:
        """
        Grant a slot of *key* and return *key*, or return `None` at the limit.
        """
        n = self.counts.get(key, 0)
        if n >= self.limit:
            return None
        self.counts[key] = n + 1
        return key

    def acquire_nowait(self, key: str) -> str:
        """
        Grant a slot of *key* and return *key*, or raise `RejectedError` at the
        limit.
        """
        lease = self.try_acquire(key)
        if lease is None:
            raise RejectedError(key)
        return lease

    async def acquire(self, key: str, *, timeout: float | None = None) -> str:  # noqa: ARG002  # as Quota.acquire
        """
        Grant a slot of *key* and return *key*, or raise `RejectedError` at the
        limit: the floor never waits.
        """
        lease = self.try_acquire(key)
        if lease is None:
            raise RejectedError(key)
        return lease


class RejectedError(Exception):
    """
    `DictQuota.acquire` refused a key at its limit.
    """


# -- Events ------------------------------------------------------------------

# The event every event scenario emits, and the bound of a user's buffer.
TYPE = "tool_executing"
DATA = {"tool": "search", "step": 3, "query": "weather in paris"}
BOUND = 1_000
# The context the event scenarios emit for.
CTX = UserContext(user_id="user-42", thread_id="thread-7", run_id="run-1")


@attrs.frozen
class FloorEvent:
    """
    The floor's event: a plain frozen attrs class with the fields of `Event`.
    """

    type: str
    data: Any
    seq: int
    event_id: str
    ts: float
    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    data_json: str


def _floor_encoder() -> Callable[[object], str]:
    """
    The fastest standard-library encoder, the one `Event` uses: a C encoder
    built once and reused (`json.dumps` builds one per call).
    """
    from _json import make_encoder as c_make_encoder

    # json.dumps's own refusal of what JSON cannot carry.
    default = json.JSONEncoder().default
    options = (None, default, encode_basestring_ascii, None, ":", ",", False, False, False)
    encoder = c_make_encoder(*options)
    return lambda value: "".join(encoder(value, 0))


class FloorEvents:
    """
    Makes the floor's events: what any emitter must do at least.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.encode = _floor_encoder()

    def make(self) -> FloorEvent:
        """
        Return the next event, as `usercontext.Emitter.emit` makes one.
        """
        seq = self.seq = self.seq + 1
        return FloorEvent(
            TYPE,
            MappingProxyType(dict(DATA)),
            seq,
            f"0123456789abcdef-{seq}",
            time.time(),
            "user-42",
            "thread-7",
            "run-1",
            "request",
            self.encode(DATA),
        )


class CountingSink:
    """
    An in-memory sink that counts, and wakes a waiter at a target.
    """

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.reached: asyncio.Event | None = None

    async def send(self, events: Sequence[Event]) -> None:
        """
        Count *events*, and wake the waiter if the target is reached.
        """
        self.count += len(events)
        if self.reached is not None and self.count >= self.target:
            self.reached.set()

    async def wait_for(self, target: int) -> None:
        """
        Return once *target* events in all have been sent.
        """
        if self.count < target:
            self.target = target
            self.reached = asyncio.Event()
            await self.reached.wait()
            self.reached = None


class RunningHub:
    """
    A hub running in a task of *loop* while batches run on the same loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, hub: EmitterHub) -> None:
        self.loop = loop
        self.hub = hub
        self.stop = asyncio.Event()
        self.started = asyncio.Event()

        async def run() -> None:
            async with hub:
                self.started.set()
                await self.stop.wait()

        self.task = loop.create_task(run())
        loop.run_until_complete(self.started.wait())

    def attach(self, sink: CountingSink) -> Emitter:
        """
        Attach *sink* for the user of `CTX`, and return an emitter of that user.
        """

        async def attach() -> Emitter:
            self.hub.attach("user-42", sink)
            return self.hub.emitter(CTX)

        return self.loop.run_until_complete(attach())

    def close(self) -> None:
        """
        Stop the hub, and close the loop.
        """
        self.stop.set()
        with contextlib.closing(self.loop):
            self.loop.run_until_complete(self.task)


class _SocketSink:
    """
    Writes each batch as JSON lines in one write, and waits for the drain.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def send(self, events: Sequence[Event]) -> None:
        self.writer.write(("\n".join([e.json for e in events]) + "\n").encode())
        await self.writer.drain()


async def _count_lines(reader: asyncio.StreamReader, n: int) -> None:
    seen = 0
    while seen < n:
        chunk = await reader.read(1 << 16)
        if not chunk:
            return
        seen += chunk.count(b"\n")


async def socket_run(n: int, ours: bool) -> float:  # noqa: FBT001  # positional, for the section's thread runner
    """
    Send *n* JSON events over a socketpair; return events per second.
    """
    a, b = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=a)
    reader, peer = await asyncio.open_connection(sock=b)
    try:
        started = time.perf_counter()
        counting = asyncio.ensure_future(_count_lines(reader, n))
        if ours:
            async with EmitterHub(maxsize=BOUND, overflow="block", timeout=None) as hub:
                hub.attach("user-42", _SocketSink(writer))
                emitter = hub.emitter(CTX)
                for _ in range(n):
                    await emitter.emit(TYPE, DATA)
                await counting
        else:
            floor = FloorEvents()
            for start in range(0, n, 256):
                batch = [floor.make() for _ in range(min(256, n - start))]
                writer.write(("\n".join([_floor_json(e) for e in batch]) + "\n").encode())
                await writer.drain()
            await counting
        return n / (time.perf_counter() - started)
    finally:
        for stream in (writer, peer):
            stream.close()
            await stream.wait_closed()


def _floor_json(e: FloorEvent) -> str:
    return (
        f'{{"type":"{e.type}","seq":{e.seq},"event_id":"{e.event_id}","ts":{e.ts!r},'
        f'"user_id":"{e.user_id}","thread_id":"{e.thread_id}","run_id":"{e.run_id}",'
        f'"request_id":"{e.request_id}","data":{e.data_json}}}'
    )

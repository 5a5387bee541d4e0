"""
`RedisBus`: the `usercontext.EventBus` on Redis. Each user has a Stream of its
last events, a hash with the stream's id and counter, and a pub/sub channel,
all under the hash tag ``{<prefix>:<user>}``; publishing is one Lua script.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from collections import deque
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import attrs

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from usercontext import _checks
from usercontext._lifecycle import describe, logger
from usercontext.exceptions import BackendUnavailableError

from . import _client


if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Sequence

    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript


# KEYS: the hash, the stream. ARGV: payload, maxlen, ttl (ms), a new stream id, channel.
# A hash that expired takes its stream along, so that a stream started anew
# numbers its entries from 1 again under a new id.
_PUBLISH = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  id = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'id', id)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'p', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[5], id .. ' ' .. seq .. ' ' .. ARGV[1])
return {id, seq}
"""

# KEYS: the hash, the stream. ARGV: a new stream id, ttl (ms), after, count.
_READ = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  id = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'id', id)
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local entries = {}
local after = tonumber(ARGV[3])
if tonumber(ARGV[4]) > 0 and seq > after then
  entries = redis.call('XRANGE', KEYS[2], (after + 1) .. '-0', '+', 'COUNT', ARGV[4])
end
return {id, seq, entries}
"""

# The pause between two tries to reach Redis again from the pub/sub connection.
_RECONNECT_S = 0.05
# Users whose position one pipeline reads.
_POLL_CHUNK = 1000
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


# Python 3.10 only, where asyncio has no timeout().
async def _fail_after(seconds: float) -> AsyncGenerator[None, None]:  # pragma: no cover
    with anyio.fail_after(seconds):
        yield


# asyncio.timeout costs a tenth of anyio.fail_after, on every command.
_timeout: Any = cast(
    "Any",
    asyncio.timeout if sys.version_info >= (3, 11) else contextlib.asynccontextmanager(_fail_after),
)


@attrs.frozen
class RedisBusStats:
    """
    What a `usercontext.redis.RedisBus` did with Redis, beside the
    `usercontext.EmitterStats` of its hub: a snapshot of `RedisBus.stats`.

    Attributes:
        connected: Whether the pub/sub connection is up right now (`False`
            from the moment it was lost until it is back).
        followed: Users whose channels this instance follows right now (the
            users it has connections of).
        published: Events stored in Redis by this instance's emits.
        publish_errors: Emits refused because Redis did not answer
            (`usercontext.exceptions.BackendUnavailableError`).
        received: Events of other instances (and its own) received as
            notifications.
        reads: Reads of a user's stream: replays, and catching up on a gap.
        polls: Rounds reading where the streams of followed users stand (every
            *poll_interval*, and after a reconnect).
        poll_errors: Such rounds that did not reach Redis.
        disconnects: Times the pub/sub connection was lost.

    .. versionadded:: 0.1.0
    """

    connected: bool
    followed: int
    published: int
    publish_errors: int
    received: int
    reads: int
    polls: int
    poll_errors: int
    disconnects: int


def _ignore(task: asyncio.Future[Any]) -> None:
    # Retrieved: a wake-up that failed is harmless.
    _ = task.cancelled() or task.exception()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBus:
    """
    The event bus of several `usercontext.EmitterHub` instances on Redis:
    ``EmitterHub(bus=RedisBus(redis))`` in every process, on every host, and
    each user's events reach all of that user's connections, wherever they
    are.

    What holds:

    - Order and once: the events of a user are numbered by Redis, one
      counter per user, in the order their emits reached it; every sink gets
      them in that order, each once (a hub drops repeats by ``seq``, and reads
      gaps back from the stream). Events of different users are not ordered.
    - Acknowledged means stored: `usercontext.Emitter.emit` returns once the
      event is in the user's Redis Stream; an instance that crashes then loses
      nothing. The event is as durable as Redis makes it (with
      ``appendonly yes`` and ``appendfsync always``, a Redis crash loses none).
    - Replay across instances: `usercontext.EmitterHub.aattach` resumes a
      connection on any instance from the ``seq`` or ``event_id`` it last got
      on any other. The window is the last *maxlen* events of the user (Redis
      trims the Stream by whole nodes, so it holds between *maxlen* and about
      *maxlen* + 100), kept *idle_ttl* seconds after the user's last event or
      connection; a connection that resumes from further back first gets an
      `usercontext.EVENTS_MISSED` notice.
    - Idle users cost nothing: a user's keys expire *idle_ttl* seconds after
      their last event, while no instance has a connection of theirs. A stream
      started anew gets a new stream id, so that an old ``event_id`` is not
      taken for a position in it.
    - When Redis is down (``on_unavailable="fail_closed"``, the only policy of
      the bus): `usercontext.Emitter.emit` and
      `usercontext.EmitterHub.aattach` raise
      `usercontext.exceptions.BackendUnavailableError` after at most
      *backend_timeout* seconds; such an emit may or may not have been stored.
      Connections stay attached, and get what they missed once Redis is back:
      the hub reconnects every 50 ms and reads every followed user's stream
      again. A Redis that lost its data comes back with new, empty streams;
      sinks then get an `usercontext.EVENTS_MISSED` notice with ``missed``
      `None`.

    Each user has three keys, ``{<prefix>:<user>}:m`` (a hash: the stream id
    and the counter), ``{<prefix>:<user>}:s`` (the Stream) and the channel
    ``{<prefix>:<user>}:c``; the hash tag puts them in one slot of a Redis
    Cluster, as every script needs. Each instance holds one pub/sub connection,
    subscribed to the channels of the users it has connections of, and reads
    their positions every *poll_interval* seconds (one pipeline), which also
    keeps their keys alive and catches a lost notification.

    Args:
        redis: A ``redis.asyncio.Redis`` client (yours: the bus does not
            close it), or a URL for a client that the bus makes and closes.
        prefix: The start of every key.
        maxlen: Events held per user for replay, at least.
        idle_ttl: How long a user's keys live after their last use, in seconds.
        poll_interval: How often the positions of followed users are read, in
            seconds.
        backend_timeout: How long a command may take before Redis is deemed
            unavailable, in seconds.
        on_unavailable: ``"fail_closed"``: refuse to emit while Redis is down.

    .. versionadded:: 0.1.0
    """

    def __init__(  # noqa: PLR0913  # every setting of the bus, by keyword
        self,
        redis: Redis | str,
        *,
        prefix: str = "usercontext",
        maxlen: int = 1000,
        idle_ttl: float = 3600.0,
        poll_interval: float = 1.0,
        backend_timeout: float = 0.25,
        on_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed",
    ) -> None:
        given: object = redis
        if not isinstance(given, (Redis, str)):
            msg = (
                f"redis must be a redis.asyncio.Redis client or a URL such as "
                f"'redis://localhost:6379/0', got {type(redis).__name__}."
            )
            raise TypeError(msg)
        given_prefix: object = prefix
        if (
            not isinstance(given_prefix, str)
            or not given_prefix
            or "{" in given_prefix
            or "}" in given_prefix
        ):
            msg = f"prefix must be a non-empty str without braces, got {prefix!r}."
            raise (TypeError if not isinstance(given_prefix, str) else ValueError)(msg)
        _checks.count("maxlen", maxlen, minimum=1)
        _checks.seconds("idle_ttl", idle_ttl, allow_none=False, zero_ok=False)
        _checks.seconds("poll_interval", poll_interval, allow_none=False, zero_ok=False)
        _checks.seconds("backend_timeout", backend_timeout, allow_none=False, zero_ok=False)
        if on_unavailable != "fail_closed":
            msg = (
                f"on_unavailable must be 'fail_closed' for RedisBus, got {on_unavailable!r}: "
                "an event bus has no local stand-in that keeps a user's events in order "
                "across instances. Emits raise BackendUnavailableError while Redis is down."
            )
            raise ValueError(msg)
        self._owned = isinstance(redis, str)
        # From a URL: a client that bounds each command itself (_client.bounded).
        self._client: Redis = (
            _client.from_url(redis, backend_timeout) if isinstance(redis, str) else redis
        )
        self._bounded = _client.bounded(self._client, backend_timeout)
        self._prefix = prefix
        self._maxlen = maxlen
        self._ttl_ms = max(1, round(idle_ttl * 1000))
        self._poll_interval = poll_interval
        self._timeout = backend_timeout
        self._publish = self._client.register_script(_PUBLISH)
        self._read = self._client.register_script(_READ)
        self._notify: Callable[[str, str, int, str | None], None] | None = None
        # Followed users by channel, and the subscriptions waiting for Redis's word.
        self._users: dict[str, str] = {}
        self._confirm: dict[str, list[asyncio.Future[None]]] = {}
        # (Un)subscriptions to send, in order, by the one task that owns the
        # pub/sub connection: redis-py's PubSub is not safe for two tasks at
        # once while it reconnects.
        self._commands: deque[tuple[str, str]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._recheck: set[str] = set()
        self._poke: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sub_pool: ConnectionPool | None = None
        self._pubsub: PubSub | None = None
        self._connected = True
        self._closed = False
        self._published = 0
        self._publish_errors = 0
        self._received = 0
        self._reads = 0
        self._polls = 0
        self._poll_errors = 0
        self._disconnects = 0

    # -- lifecycle

    async def start(self, notify: Callable[[str, str, int, str | None], None]) -> None:
        """
        Start serving the hub that *notify* belongs to: a hub calls it when
        it is entered.

        Raises:
            RuntimeError: If the bus serves a hub already, or was closed.
        """
        if self._notify is not None or self._closed:
            msg = (
                "This RedisBus serves a hub already, or was closed; a bus serves one "
                "EmitterHub. Create a RedisBus per hub."
            )
            raise RuntimeError(msg)
        self._notify = notify
        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        # The pub/sub connection reconnects on its own schedule: no retries
        # with backoff inside redis-py, which would delay the recovery.
        kwargs["retry"] = Retry(NoBackoff(), 0)
        kwargs["socket_connect_timeout"] = self._timeout
        self._sub_pool = ConnectionPool(connection_class=pool.connection_class, **kwargs)
        sub: Any = Redis(connection_pool=self._sub_pool)
        self._pubsub = sub.pubsub()
        self._wakeup = asyncio.Event()
        self._poke = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._poll())]

    async def aclose(self) -> None:
        """
        Stop following every user and close the pub/sub connection; close the
        client too if the bus made it from a URL. A hub calls it when it
        closes.
        """
        if self._closed:
            return
        self._closed = True
        # Cancelled until done: on Python 3.11, a cancel that comes as
        # redis-py's own read timeout expires can be swallowed by it.
        pending = list(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.05)
            pending = [task for task in pending if not task.done()]
        for task in self._tasks:
            _ignore(task)
        self._confirm.clear()
        self._users.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._sub_pool is not None:
            await self._sub_pool.aclose()
        if self._owned:
            await self._client.aclose()

    # -- the protocol

    def _keys(self, user_id: str) -> tuple[str, str, str]:
        tag = f"{{{self._prefix}:{user_id}}}"
        return f"{tag}:m", f"{tag}:s", f"{tag}:c"

    async def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            async with _timeout(self._timeout):
                return await call()
        except _UNAVAILABLE as e:
            raise self._unavailable(what, e) from e

    async def _eval(
        self, what: str, script: AsyncScript, meta: str, stream: str, args: tuple[object, ...]
    ) -> Any:
        """
        Run *script* on the keys of one user by its SHA (loading it on
        ``NOSCRIPT``), within *backend_timeout*: timed by the client itself
        if it bounds its commands, else by a timer of the bus.
        """
        client: Any = self._client
        command = ("EVALSHA", script.sha, 2, meta, stream, *args)
        try:
            try:
                if self._bounded:
                    return await client.execute_command(*command)
                async with _timeout(self._timeout):
                    return await client.execute_command(*command)
            except NoScriptError:
                # Redis restarted, or its scripts were flushed: load it again.
                async with _timeout(self._timeout):
                    await client.script_load(script.script)
                    return await client.execute_command(*command)
        except _UNAVAILABLE as e:
            raise self._unavailable(what, e) from e

    def _unavailable(self, what: str, e: BaseException) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"Redis did not answer within {self._timeout:g} s when {what} "
            f"({describe(e)}). Retry later; check that Redis runs and is reachable, "
            "or raise backend_timeout."
        )

    async def publish(self, user_id: str, payload: str) -> tuple[str, int]:
        """
        Store *payload* as the next event of *user_id*, and return the stream
        id and its number.

        Raises:
            usercontext.exceptions.BackendUnavailableError: If Redis did not
                answer within *backend_timeout* seconds.
        """
        meta, stream, channel = self._keys(user_id)
        args = (payload, self._maxlen, self._ttl_ms, os.urandom(8).hex(), channel)
        try:
            result = await self._eval("storing an event", self._publish, meta, stream, args)
        except BackendUnavailableError:
            self._publish_errors += 1
            raise
        self._published += 1
        return _str(result[0]), int(result[1])

    async def read(
        self, user_id: str, after: int, limit: int
    ) -> tuple[str, int, Sequence[tuple[int, str]]]:
        """
        Return the stream id of *user_id*, its last number, and at most *limit*
        held events numbered above *after*.

        Raises:
            usercontext.exceptions.BackendUnavailableError: If Redis did not
                answer within *backend_timeout* seconds.
        """
        meta, stream, _ = self._keys(user_id)
        args = (os.urandom(8).hex(), self._ttl_ms, after, limit)
        result = await self._eval("reading events", self._read, meta, stream, args)
        entries = [
            (int(_str(entry_id).partition("-")[0]), _str(fields[1]))
            for entry_id, fields in result[2]
        ]
        if limit:
            self._reads += 1
        return _str(result[0]), int(result[1]), entries

    async def follow(self, user_id: str) -> tuple[str, int]:
        """
        Subscribe to *user_id*'s channel, and return the stream id and last
        number once subscribed.

        Raises:
            usercontext.exceptions.BackendUnavailableError: If Redis did not
                answer within *backend_timeout* seconds.
            RuntimeError: If the bus was not started.
        """
        if self._wakeup is None or self._closed:
            msg = "This RedisBus is not running: pass it to an EmitterHub, which starts it."
            raise RuntimeError(msg)
        _, _, channel = self._keys(user_id)
        self._users[channel] = user_id
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(channel, []).append(future)
        self._command("subscribe", channel)
        try:
            await self._call("subscribing", lambda: asyncio.shield(future))
        except BaseException:
            waiting = self._confirm.get(channel, [])
            with contextlib.suppress(ValueError):
                waiting.remove(future)  # not confirmed in time
            if not waiting:
                self._confirm.pop(channel, None)
            raise
        stream_id, seq, _ = await self.read(user_id, 0, 0)
        return stream_id, seq

    def unfollow(self, user_id: str) -> None:
        """
        Unsubscribe from *user_id*'s channel, in the order of the calls.
        """
        _, _, channel = self._keys(user_id)
        self._users.pop(channel, None)
        if self._wakeup is not None:
            self._command("unsubscribe", channel)

    # -- the tasks

    def _command(self, command: str, channel: str) -> None:
        """
        Queue *command* for the pub/sub task, and wake it: it may be waiting
        for a message, and a PING makes Redis send one.
        """
        self._commands.append((command, channel))
        assert self._wakeup is not None  # noqa: S101  # made by start
        self._wakeup.set()
        connection: Any = None if self._pubsub is None else self._pubsub.connection
        if connection is not None and connection.is_connected:
            # A whole command written while the task reads: never interleaved.
            ping = asyncio.ensure_future(connection.send_command("PING", check_health=False))
            ping.add_done_callback(_ignore)

    async def _listen(self) -> None:
        """
        Own the pub/sub connection: send the (un)subscriptions in order,
        take the messages, and reconnect when Redis went away.
        """
        assert self._pubsub is not None  # noqa: S101  # made by start
        assert self._wakeup is not None  # noqa: S101  # made by start
        pubsub: Any = self._pubsub
        commands = self._commands
        while True:
            try:
                while commands:
                    command, channel = commands.popleft()
                    async with _timeout(self._timeout):
                        if command == "subscribe":
                            await pubsub.subscribe(channel)
                        else:
                            await pubsub.unsubscribe(channel)
                if pubsub.connection is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()  # nothing subscribed yet
                    continue
                message = await pubsub.get_message(timeout=self._poll_interval)
            except _UNAVAILABLE as e:
                # A subscription that failed is tried again by the hub; an
                # unsubscription stays in redis-py's channels, is subscribed
                # again on reconnect, and left then (see _positions).
                if self._connected:
                    self._connected = False
                    self._disconnects += 1
                    logger.warning(
                        "usercontext: the event bus lost Redis (%s); reconnecting", describe(e)
                    )
                await asyncio.sleep(_RECONNECT_S)
                continue
            if not self._connected:
                self._connected = True
                logger.warning("usercontext: the event bus reached Redis again")
            self._take(message)

    def _take(self, message: dict[str, Any] | None) -> None:
        if message is None:
            return  # nothing within a poll interval
        kind = message["type"]
        channel = _str(message["channel"])
        if kind == "message":
            # The user is in the channel's name: "{<prefix>:<user>}:c". The hub
            # ignores users it no longer follows.
            user_id = channel[len(self._prefix) + 2 : -3]
            stream_id, seq, payload = _str(message["data"]).split(" ", 2)
            self._received += 1
            assert self._notify is not None  # noqa: S101  # set by start
            self._notify(user_id, stream_id, int(seq), payload)
            return
        if kind != "subscribe":
            return  # the word of an unsubscription, or a PING's answer
        waiting = self._confirm.get(channel)
        if waiting:
            # follow() removes its future when it gives up: every one here waits.
            waiting.pop(0).set_result(None)
            if not waiting:
                del self._confirm[channel]
            return
        # Subscribed again after a reconnect: read where the stream stands.
        self._recheck.add(channel)
        assert self._poke is not None  # noqa: S101  # made by start
        self._poke.set()

    async def _poll(self) -> None:
        assert self._poke is not None  # noqa: S101  # made by start
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), self._poll_interval)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                channels = list(self._users)
            else:
                channels = list(self._recheck)
            self._poke.clear()
            self._recheck.clear()
            for start in range(0, len(channels), _POLL_CHUNK):
                await self._positions(channels[start : start + _POLL_CHUNK])

    async def _positions(self, channels: list[str]) -> None:
        """
        Tell the hub where the streams of the users of *channels* stand, and
        unsubscribe from the channels of users no longer followed.
        """
        users = [(channel, self._users.get(channel)) for channel in channels]
        for channel, user_id in users:
            if user_id is None:
                self._command("unsubscribe", channel)
        followed = [user_id for _, user_id in users if user_id is not None]
        if not followed:
            return

        async def positions() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in followed:
                    meta, stream, _ = self._keys(user_id)
                    args: list[str | int] = [os.urandom(8).hex(), self._ttl_ms, 0, 0]
                    await self._read(keys=[meta, stream], args=args, client=pipe)
                return await pipe.execute()

        try:
            results = await self._call("reading positions", positions)
        except BackendUnavailableError as e:
            self._poll_errors += 1
            logger.debug("usercontext: reading positions failed: %s", describe(e))
            return
        self._polls += 1
        assert self._notify is not None  # noqa: S101  # set by start
        for user_id, result in zip(followed, results, strict=True):
            self._notify(user_id, _str(result[0]), int(result[1]), None)

    def stats(self) -> RedisBusStats:
        """
        Return a snapshot of what this bus did with Redis: events stored and
        received, reads, polls and errors. It never waits.
        """
        return RedisBusStats(
            connected=self._connected,
            followed=len(self._users),
            published=self._published,
            publish_errors=self._publish_errors,
            received=self._received,
            reads=self._reads,
            polls=self._polls,
            poll_errors=self._poll_errors,
            disconnects=self._disconnects,
        )

    def __repr__(self) -> str:
        return (
            f"<usercontext.redis.RedisBus(prefix={self._prefix!r}, maxlen={self._maxlen}, "
            f"followed={len(self._users)})>"
        )

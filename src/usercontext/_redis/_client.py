"""
The redis-py clients of `usercontext.redis`: the one made from a URL, and
whether a client bounds each command by itself.
"""

# redis-py's asyncio client types Redis.from_url with untyped **kwargs.
# pyright: reportUnknownMemberType=false

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


__all__ = ["bounded", "from_url"]


def from_url(url: str, timeout: float) -> Redis:
    """
    A client for *url* that gives up on each command by itself after
    *timeout* seconds: read and connect timeouts, and no retries (which would
    multiply the wait). Options in the URL win.
    """
    return Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def bounded(client: Redis, timeout: float) -> bool:
    """
    Whether *client* gives up on every command within about *timeout* by
    itself: read and connect timeouts of at most *timeout*, no retries, and
    no wait for a free connection of a blocking pool. Its user then needs no
    timer of its own per command (a tenth of an uncontended quota acquire).
    """
    pool = client.connection_pool
    if isinstance(pool, BlockingConnectionPool):
        return False
    options = pool.connection_kwargs
    read = options.get("socket_timeout")
    connect = options.get("socket_connect_timeout") or read
    retry = options.get("retry")
    return (
        isinstance(read, (int, float))
        and isinstance(connect, (int, float))
        and 0 < read <= timeout
        and 0 < connect <= timeout
        and (retry is None or retry.get_retries() == 0)
    )

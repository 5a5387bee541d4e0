"""
Limits and events shared by every process and host through Redis.

Import it explicitly; it needs the ``redis`` extra (``pip install
usercontext[redis]``). It runs on asyncio: redis-py's asyncio client does not
run on trio.

- `RedisQuota` implements the `usercontext.Quota` protocol on Redis, so that
  per-user and global limits hold across workers and hosts: pass it to
  `usercontext.EngineFactory` as its *quota*.
- `RedisBus` is the event bus of `usercontext.EmitterHub` instances, so that a
  user's events reach all of that user's connections, wherever they are, in
  order and once, and a client resumes on any instance. `RedisBus.stats`
  (`RedisBusStats`) and `RedisQuota.redis_stats` (`RedisQuotaStats`) count
  what each did with Redis.
- `RedisRateLimiter` implements the `usercontext.RateLimiter` protocol on
  Redis (one Lua script, GCRA as in Redis Cell), so that a user's rate limit
  holds across workers and hosts: pass it to `usercontext.Admission` as its
  *rate*.

.. code-block:: python

    import usercontext as uc
    from usercontext.redis import RedisBus, RedisQuota

    quota = RedisQuota("redis://localhost:6379/0", per_key=2, total=100)
    factory = uc.EngineFactory(make_engine, quota=quota)

    async with quota, uc.EmitterHub(bus=RedisBus("redis://localhost:6379/0")) as hub:
        async with factory.engine(ctx) as engine:
            await hub.emitter(ctx).emit(uc.AGENT_STARTED)

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from ._redis._bus import RedisBus, RedisBusStats
from ._redis._quota import RedisQuota
from ._redis._quota_lease import RedisLease, RedisQuotaStats
from ._redis._rate import RedisRateLimiter


__all__ = [
    "RedisBus",
    "RedisBusStats",
    "RedisLease",
    "RedisQuota",
    "RedisQuotaStats",
    "RedisRateLimiter",
]

"""
Limits and events shared by every process and host through Redis.

`RedisQuota` implements the `usercontext.Quota` protocol on Redis, so that
per-user and global limits hold across workers and hosts: pass it to
`usercontext.EngineFactory` as its *quota*. Install the extra:
``pip install usercontext[redis]``. It runs on asyncio (redis-py's asyncio
client does not run on trio).

.. code-block:: python

    import usercontext as uc
    from usercontext.redis import RedisQuota

    quota = RedisQuota("redis://localhost:6379/0", per_key=2, total=100)
    factory = uc.EngineFactory(make_engine, quota=quota)

    async with quota:  # closes its background tasks and its client
        async with factory.engine(ctx) as engine:
            ...

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from ._redis._quota import RedisQuota
from ._redis._quota_lease import RedisLease, RedisQuotaStats


__all__ = ["RedisLease", "RedisQuota", "RedisQuotaStats"]

"""
Scale out on Redis: what several processes and hosts share through one Redis.

Import it explicitly; it needs the ``redis`` extra (``pip install
usercontext[redis]``), and redis-py's asyncio client, so it runs on asyncio.

- `RedisBus`: the event bus of `usercontext.EmitterHub` instances, so that a
  user's events reach all of that user's connections, wherever they are.
"""

from __future__ import annotations

from ._redis._bus import RedisBus


__all__ = ["RedisBus"]

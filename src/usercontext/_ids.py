"""
Fast random ids.

`os.urandom(16).hex()` costs a system call per id, and `uuid.uuid4().hex` several
times that. We read random bytes in batches and hand out 128-bit slices of them.
`list.pop` is atomic, so two threads never get the same id; a forked child drops
the batch it inherited so parent and child never share ids.
"""

from __future__ import annotations

import os

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["new_id"]

_BATCH = 256  # ids per system call
_pool: list[str] = []


def _refill() -> str:
    # hex() with a separator every 16 bytes, then split: both run in C.
    _pool.extend(os.urandom(16 * _BATCH).hex(" ", 16).split(" "))
    return _pool.pop()


def new_id() -> str:
    """
    Return a new id of 128 random bits as 32 lowercase hex characters.

    The bits come from `os.urandom`, like `uuid.uuid4` and `secrets`.
    """
    try:
        return _pool.pop()
    except IndexError:
        return _refill()


def _no_fork(**_: object) -> None:
    """
    Stand in for `os.register_at_fork` where there is no fork.
    """


# Windows has no fork, and no os.register_at_fork.
_register_at_fork: Callable[..., None] = getattr(os, "register_at_fork", _no_fork)
_register_at_fork(after_in_child=_pool.clear)

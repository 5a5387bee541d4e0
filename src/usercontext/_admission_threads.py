"""
The `Admission` policy on the threads' path: ``with factory.engine()``.

It checks what ``async with`` checks (the rate limit, the breaker, then load
shedding if no slot of the `ThreadQuota` is free), with the same errors and
into the same counters; the parts of the policy take a lock each, so
threads and an event loop may share them.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING, Any

from ._admission import limits
from .exceptions import QuotaTimeoutError


if TYPE_CHECKING:
    from ._admission import Admission
    from ._quota import Lease


__all__ = ["admit_thread"]


def _rate_nowait(gate: Admission, key: str) -> None:
    rate = gate.rate
    assert rate is not None  # noqa: S101  # called for a policy with a rate limit
    admit_nowait: Any = getattr(rate, "admit_nowait", None)
    if not callable(admit_nowait):
        msg = (
            f"The admission policy's rate limiter {rate!r} has no admit_nowait(key): it "
            "can only be checked from an event loop, in `async with factory.engine()`. "
            "In threads (`with factory.engine()`), use a usercontext.LocalRateLimiter, "
            "or a rate limiter with a sync admit_nowait(key)."
        )
        raise TypeError(msg)
    admit_nowait(key)


def admit_thread(factory: Any, gate: Admission, key: str) -> Lease:
    """
    Check the policy *gate* for a request of *key* of *factory* in a thread,
    then take a slot of the factory's `ThreadQuota`: return its lease.
    """
    if gate.rate is not None:
        _rate_nowait(gate, key)
    if gate.breaker is not None:
        gate.breaker._check(key)
    quota = factory._threads()
    timeout: float | None = factory._timeout
    # A request that may not wait is refused by the quota itself.
    shed = gate.shed if timeout is None or timeout > 0 else None
    if shed is None:
        return quota.acquire(key, timeout=timeout)  # type: ignore[no-any-return]
    free: Lease | None = quota._take(key)
    if free is not None:
        return free  # a free slot: never shed
    # A thread has no deadline but the factory's timeout: it cannot be
    # cancelled.
    ticket = shed._enter(key, math.inf if timeout is None else timeout, *limits(quota, key))
    try:
        lease: Lease = quota.acquire(key, timeout=timeout)
    except QuotaTimeoutError:
        shed._leave(key, ticket, learn=True)
        raise
    except BaseException:
        shed._leave(key, ticket, learn=False)
        raise
    shed._leave(key, ticket, learn=True)
    return lease

"""
Types of the `Quota` protocol, of `LocalQuota`, `ThreadQuota` and `Lease`, checked by mypy.
"""

from __future__ import annotations

from typing_extensions import assert_type

import usercontext as uc


async def use_local_quota() -> None:
    quota = uc.LocalQuota(per_key=2, total=None)
    assert_type(await quota.acquire("u-42", timeout=1.0), uc.Lease)
    assert_type(quota.acquire_nowait("u-42"), uc.Lease)
    async with await quota.acquire("u-42") as lease:
        assert_type(lease, uc.Lease)
        assert_type(lease.key, str)
        assert_type(lease.released, bool)
    with quota.acquire_nowait("u-42") as held:
        assert_type(held, uc.Lease)
    quota.release(await quota.acquire("u-42"))
    await quota.arelease(await quota.acquire("u-42"))
    await quota.acquire_nowait("u-42").arelease()
    assert_type(quota.stats(), uc.QuotaStats)
    assert_type(quota.stats(top=3).top, tuple[tuple[str, int], ...])
    assert_type(quota.stats().total, int | None)
    quota.stats(3)  # type: ignore[call-arg]
    uc.LocalQuota(2)  # type: ignore[call-arg]


async def use_the_protocol(backend: uc.Quota) -> None:
    local: uc.Quota = uc.LocalQuota(per_key=2)
    assert_type(await local.acquire("u-42", timeout=0), uc.Lease)
    lease = await backend.acquire("u-42")
    assert_type(lease, uc.Lease)
    await backend.arelease(lease)
    assert_type(backend.stats(top=0), uc.QuotaStats)
    # The protocol has no sync release and no acquire_nowait: a network
    # backend needs a round trip for both.
    backend.release(lease)  # type: ignore[attr-defined]
    backend.acquire_nowait("u-42")  # type: ignore[attr-defined]


def use_thread_quota() -> None:
    quota = uc.ThreadQuota(per_key=lambda key: 5 if key.startswith("paid-") else 2)
    with quota.acquire("u-42", timeout=0) as lease:
        assert_type(lease, uc.Lease)
    assert_type(quota.acquire_nowait("u-42"), uc.Lease)
    quota.set_limits(per_key=3, total=None)
    quota.set_limits(3)  # type: ignore[call-arg]
    assert_type(quota.stats(top=1), uc.QuotaStats)


def thread_quota_is_not_a_quota() -> None:
    # Its acquire blocks a thread: it must not pass for the async protocol.
    backend: uc.Quota = uc.ThreadQuota()  # type: ignore[assignment]
    del backend

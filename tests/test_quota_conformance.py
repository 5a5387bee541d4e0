"""
The quota conformance suite, run against `LocalQuota`, and checked to catch a
backend that breaks the contract.
"""

from __future__ import annotations

import pytest

from usercontext import Lease, LocalQuota
from usercontext.testing import QuotaConformance


class TestLocalQuota(QuotaConformance):
    """
    `LocalQuota` passes the whole suite, on asyncio and trio.
    """

    async def make_quota(self, *, per_key, total):
        return LocalQuota(per_key=per_key, total=total)


class _Unlimited:
    """
    A broken backend: it grants every request, whatever the limits.
    """

    def __init__(self):
        self._quota = LocalQuota(per_key=10_000)
        self.closed = 0

    async def acquire(self, key, *, timeout=None):  # ignores it: the bug
        return await self._quota.acquire(key)

    async def arelease(self, lease):
        await self._quota.arelease(lease)

    def stats(self, *, top=10):
        return self._quota.stats(top=top)


class TestTheSuite:
    """
    The suite fails a backend that breaks the contract, and tells the author
    what to define.
    """

    async def test_catches_a_quota_without_limits(self):
        """
        A backend that ignores its limits fails with AssertionError, and the
        suite closes the quota it made.
        """
        made = []

        class Broken(QuotaConformance):
            async def make_quota(self, *, per_key, total):  # ignored: the bug
                made.append(_Unlimited())
                return made[-1]

            async def close_quota(self, quota):
                quota.closed += 1

        with pytest.raises(AssertionError, match="QuotaExceededError was not raised"):
            await Broken().test_per_key_limit()
        assert [quota.closed for quota in made] == [1]

    async def test_other_errors_go_through(self):
        """
        An error the suite did not expect reaches the test runner as it is,
        also where the suite expects a refusal.
        """

        class Failing(QuotaConformance):
            async def make_quota(self, *, per_key, total):
                quota = LocalQuota(per_key=per_key, total=total)
                acquire = quota.acquire

                async def flaky(key, *, timeout=None):
                    if quota.stats().in_use == per_key:
                        raise OSError("connection lost")
                    return await acquire(key, timeout=timeout)

                quota.acquire = flaky
                return quota

        with pytest.raises(OSError, match="connection lost"):
            await Failing().test_per_key_limit()

    async def test_make_quota_is_required(self):
        """
        A subclass that does not define make_quota is told to.
        """
        with pytest.raises(NotImplementedError, match=r"Bare must define `async def make_quota"):
            await type("Bare", (QuotaConformance,), {})().test_total_limit()

    def test_leases_are_real(self):
        """
        The leases the suite sees are the library's `Lease`.
        """
        assert issubclass(type(LocalQuota().acquire_nowait("a")), Lease)

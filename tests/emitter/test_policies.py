"""
Tests of `usercontext.Retry`, the policy of failing sends.
"""

from __future__ import annotations

import math

import pytest

import usercontext as uc


class TestRetry:
    def test_delay(self):
        """
        Waits double from *backoff* up to *max_backoff*; jitter takes 50-100%.
        """
        retry = uc.Retry(backoff=0.1, max_backoff=0.5, jitter=False)
        jittered = uc.Retry(backoff=0.1, max_backoff=0.5)

        assert [retry.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
        for n in (1, 2, 3, 4):
            assert 0.5 * retry.delay(n) <= jittered.delay(n) <= retry.delay(n)

    def test_delay_of_a_late_retry(self):
        """
        A late retry of a sink given many attempts waits *max_backoff*: the
        doubling does not overflow.
        """
        retry = uc.Retry(attempts=10_000, backoff=0.5, max_backoff=2.0, jitter=False)

        assert retry.delay(1_100) == 2.0
        assert retry.delay(9_999) == 2.0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"attempts": 0}, ValueError, "attempts must be at least 1"),
            ({"attempts": 1.5}, TypeError, "attempts must be an int"),
            ({"backoff": -1}, ValueError, "backoff must be >= 0"),
            ({"max_backoff": "1"}, TypeError, "max_backoff must be a number"),
            ({"timeout": 0}, ValueError, "timeout must be > 0"),
            ({"timeout": math.nan}, ValueError, "timeout must be > 0"),
            ({"jitter": 1}, TypeError, "jitter must be a bool"),
        ],
    )
    def test_rules(self, kwargs, error, match):
        """
        Bad retry settings are refused with the rule they break.
        """
        with pytest.raises(error, match=match):
            uc.Retry(**kwargs)

"""
Tests of the report's timing and formatting (`usercontext._report.timing`).
"""

from __future__ import annotations

import pytest

from usercontext._report.timing import (
    Comparison,
    Op,
    fmt_ns,
    fmt_pairs,
    fmt_ratio,
    paired_ratios,
    ratio_ok,
)


class TestFormatting:
    @pytest.mark.parametrize(
        ("ns", "text"),
        [(12.345, "12.3 ns"), (512.4, "512 ns"), (1_234.0, "1.23 µs"), (2_500_000.0, "2.50 ms")],
    )
    def test_fmt_ns(self, ns, text):
        """
        Times are shown in ns, µs or ms, with sensible precision.
        """
        assert fmt_ns(ns) == text

    @pytest.mark.parametrize(
        ("ours", "floor", "target", "status", "note"),
        [
            ([2.0, 2.0], [1.0, 1.0], 2.5, "PASS", False),
            ([3.0, 3.0], [1.0, 1.0], 2.5, "MISS", False),
            # Best 2.6x, median of pairs 2.3x: the estimates disagree.
            ([2.6, 3.0], [1.0, 1.5], 2.5, "PASS", True),
            # Best 2.0x, median of pairs 4.0x.
            ([2.0, 4.0, 4.0], [1.0, 1.0, 1.0], 2.5, "PASS", True),
            ([2.6, 2.6], [1.0, 1.0], None, "PASS", False),
        ],
    )
    def test_ratio(self, ours, floor, target, status, note):
        """
        A ratio misses only when both estimates are above the target, and the
        row says when they disagree.
        """
        op = Op("x", "pass", {})
        c = Comparison(op, op, ours, floor, 10, 10)

        text = fmt_ratio(c, target)

        assert text.startswith(f"{fmt_ns(min(ours))} vs ")
        assert ("within noise" in text) is note
        if target is not None:
            ok = ratio_ok(c.ratio, c.median_ratio, target)
            assert ("PASS" if ok else "MISS") == status

    def test_pairs_show_the_figures_their_ratios_divide(self):
        """
        The P50 and P99 ratios of paired runs are shown with the figures they
        divide: each side's best P50 and best P99, which may come from
        different runs; a median of pairs on the other side of the target is
        noted.
        """
        # Ours' best P50 (40) and best P99 (60) come from different runs.
        p50 = paired_ratios([40.0, 45.0, 42.0], [33.0, 30.0, 35.0])
        p99 = paired_ratios([66.0, 61.0, 60.0], [50.0, 52.0, 51.0])

        text = fmt_pairs(p50, p99, 1.3)

        assert text.startswith("40.0 / 60.0 ms vs 30.0 / 50.0 ms: **1.33x / 1.20x**")
        # P50: best 1.33x over the target, median of pairs 1.21x under it.
        assert "(P50 median of pairs 1.21x: within noise)" in text
        assert "P99 median" not in text
        assert "within noise" not in fmt_pairs(p50, p99, None)

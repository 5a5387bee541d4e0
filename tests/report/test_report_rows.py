"""
Tests of the report's rows, their kinds and the verdict
(`usercontext._report.rows`).
"""

from __future__ import annotations

import attrs
import pytest

from report_helpers import fake_row

from usercontext._report.rows import Quantity, counts, exit_code, verdict


class TestRows:
    @pytest.mark.parametrize(
        ("kind", "ok", "status"),
        [
            ("correctness", True, "PASS"),
            ("correctness", False, "FAIL"),
            ("performance", True, "PASS"),
            ("performance", False, "MISS"),
            ("info", None, "INFO"),
        ],
    )
    def test_status_follows_kind(self, kind, ok, status):
        """
        A correctness row is PASS or FAIL, a performance row PASS or MISS, an
        info row INFO.
        """
        assert fake_row("s", kind, ok).status == status

    @pytest.mark.parametrize(("kind", "ok"), [("info", True), ("correctness", None)])
    def test_ok_must_match_kind(self, kind, ok):
        """
        Only an info row goes without a verdict, and an info row has none.
        """
        with pytest.raises(ValueError, match=rf"Row 's.metric' of kind '{kind}' has ok={ok}"):
            fake_row("s", kind, ok)

    def test_json_is_plain(self):
        """
        A row's JSON has its id, kind and status, its metric without Markdown,
        and numbers with units.
        """
        row = attrs.evolve(
            fake_row("s", "performance", False), details={"floor": Quantity(3, "ns")}
        )

        assert row.to_json() == {
            "id": "s.metric",
            "kind": "performance",
            "status": "MISS",
            "metric": "s metric",
            "value": {"value": 2.0, "unit": "x"},
            "target": {"comparison": "<=", "value": 1.0, "unit": "x"},
            "details": {"floor": {"value": 3, "unit": "ns"}},
            "note": "",
        }


class TestVerdict:
    @pytest.mark.parametrize(
        ("rows", "code", "strict_code"),
        [
            ([], 0, 0),
            ([("info", None)], 0, 0),
            ([("correctness", True), ("performance", True)], 0, 0),
            # A timing that misses its target does not fail the run...
            ([("correctness", True), ("performance", False)], 0, 1),
            # ... a correctness row that fails does, whatever the timings say.
            ([("correctness", False), ("performance", True)], 1, 1),
            ([("correctness", False), ("performance", False), ("info", None)], 1, 1),
        ],
    )
    def test_exit_code(self, rows, code, strict_code):
        """
        The exit code is 1 exactly when a correctness row failed, or, when
        strict, a performance row missed.
        """
        made = [fake_row("s", kind, ok, f"m{i}") for i, (kind, ok) in enumerate(rows)]

        assert exit_code(made) == code
        assert exit_code(made, strict=True) == strict_code

    def test_counts(self):
        """
        Rows are counted per kind and status.
        """
        rows = [
            fake_row("s", "correctness", True, "a"),
            fake_row("s", "correctness", False, "b"),
            fake_row("s", "performance", False, "c"),
            fake_row("s", "performance", False, "d"),
            fake_row("s", "info", None, "e"),
        ]

        assert counts(rows) == {
            "correctness": {"pass": 1, "fail": 1},
            "performance": {"pass": 0, "miss": 2},
            "info": {"info": 1},
        }

    def test_text_names_failures_and_misses(self):
        """
        The verdict names the rows that failed and missed by id, and says
        whether performance was judged.
        """
        rows = [
            fake_row("s", "correctness", False, "leaks"),
            fake_row("s", "performance", False, "ratio"),
        ]

        assert verdict(rows, 1) == (
            "**Correctness: 0 PASS, 1 FAIL** (`s.leaks`). **Performance: 0 PASS, 1 MISS** "
            "(`s.ratio`); reported, not judged (without --strict). **Info: 0.** "
            "**Exit code 1.**"
        )
        assert verdict(rows[1:], 1, strict=True) == (
            "**Correctness: 0 PASS, 0 FAIL**; every check holds. **Performance: 0 PASS, 1 "
            "MISS** (`s.ratio`); judged (--strict). **Info: 0.** **Exit code 1.**"
        )

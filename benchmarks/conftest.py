"""
Shared set-up of the benchmarks: each starts from the default rules with no
context bound, and must leave none bound.
"""

from __future__ import annotations

import pytest

import usercontext


@pytest.fixture(name="clean_state", autouse=True)
def _clean_state():
    """
    Give each benchmark the default rules and no bound context, and check that
    it leaves no context bound behind it.
    """
    usercontext.configure(id_rules=usercontext.IdRules(), max_depth=32)
    assert usercontext.current_or_none() is None
    yield
    assert usercontext.current_or_none() is None, "a benchmark left a UserContext bound"

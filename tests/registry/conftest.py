"""
Fixtures of the tests of `Registry` and `Scope`.
"""

from __future__ import annotations

import pytest

from registry_helpers import (
    Tracker,
)

from usercontext import Registry


@pytest.fixture(name="registry")
def _registry():
    """
    An empty registry with the default cleanup timeout.
    """
    return Registry()


@pytest.fixture(name="tracker")
def _tracker(registry):
    """
    A tracker registering its providers in *registry*.
    """
    return Tracker(registry)

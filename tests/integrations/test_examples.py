"""
The tests of the example apps in ``docs/examples/``, run as part of the suite.

Each example ships its own tests next to its code, so that a reader can run
them from the example's folder. This module imports them (with pytest's
assertion rewriting, as for any test module) and puts their test classes and
fixtures here, where pytest collects them with this suite's configuration:
both anyio backends and a clean context for every test.

An example's tests are skipped when its framework is missing, unless
``CI=true``, where that fails the run.
"""

from __future__ import annotations

import importlib
import sys

from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _import_tests(folder: Path, module: str) -> dict[str, object]:
    """
    Import the test module *module* of the example in *folder*, and return
    what pytest should collect from it.
    """
    sys.path.insert(0, str(folder))
    try:
        tests = importlib.import_module(module)
    finally:
        sys.path.remove(str(folder))
    return {name: value for name, value in vars(tests).items() if not name.startswith("__")}


# The agent service (FastAPI, uvicorn, websockets, SQLAlchemy), under a real server.
globals().update(_import_tests(EXAMPLES / "agent_service", "test_agent_service"))

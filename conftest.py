"""
Collection rules for the whole repository.

`--doctest-modules` imports every module of the package; an adapter module
imports its framework at the top, so it is left out when that framework is not
installed (a run with the core only).
"""

from __future__ import annotations

import importlib.util


ADAPTERS = {
    "fastapi": "src/usercontext/fastapi.py",
    "sqlalchemy": "src/usercontext/sqlalchemy.py",
    "starlette": "src/usercontext/starlette.py",
    "structlog": "src/usercontext/structlog.py",
}

collect_ignore = [
    path for module, path in ADAPTERS.items() if importlib.util.find_spec(module) is None
]

"""
Sphinx configuration for the usercontext documentation.

Build with ``python -m sphinx -n -W --keep-going -b html docs docs/_build/html``.

The build must work offline, so there is no intersphinx. The few standard
library and third-party names that the API reference mentions therefore cannot
resolve, and are listed in ``nitpick_ignore``. Every other reference must resolve.
"""

from __future__ import annotations

import sys

from importlib.metadata import version as _version
from typing import TYPE_CHECKING

from sphinx.pycode import ModuleAnalyzer


if TYPE_CHECKING:
    from sphinx.application import Sphinx


project = "usercontext"
author = "The usercontext developers"
copyright = f"2026, {author}"  # noqa: A001  # the name Sphinx reads
release = _version("usercontext")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples"]

# In docstrings, `name` is a cross-reference to a Python object.
default_role = "py:obj"
nitpicky = True
nitpick_ignore = [
    # Standard library: without intersphinx there is nothing to link to.
    ("py:class", "collections.abc.Callable"),
    ("py:class", "collections.abc.MutableMapping"),
    ("py:class", "concurrent.futures._base.Executor"),
    ("py:class", "concurrent.futures._base.Future"),
    ("py:obj", "concurrent.futures.ProcessPoolExecutor"),
    ("py:obj", "True"),
    ("py:obj", "contextlib.contextmanager"),
    ("py:obj", "contextlib.asynccontextmanager"),
    ("py:obj", "False"),
    # redis-py, the redis extra's client: ditto.
    ("py:class", "redis.asyncio.client.Redis"),
    # anyio, a dependency: ditto.
    ("py:class", "anyio.CapacityLimiter"),
    ("py:obj", "anyio.to_thread.run_sync"),
    ("py:class", "AbstractAsyncContextManager"),
    ("py:class", "AbstractContextManager"),
    # The type variables of generic signatures (wrap, isolated, to_thread,
    # ContextExecutor.submit, EngineFactory), the type aliases and the base class
    # shared by the quotas are private to their modules and documented nowhere.
    ("py:class", "E"),
    ("py:class", "P"),
    ("py:class", "T"),
    ("py:class", "usercontext._current.T"),
    ("py:class", "usercontext._registry.T"),
    ("py:class", "usercontext._scope.T"),
    # SQLAlchemy, an optional dependency: no intersphinx either.
    ("py:class", "sqlalchemy.engine.base.Engine"),
    ("py:class", "sqlalchemy.ext.asyncio.engine.AsyncEngine"),
    ("py:class", "sqlalchemy.ext.asyncio.session.async_sessionmaker"),
    ("py:class", "sqlalchemy.orm.session.sessionmaker"),
    ("py:class", "_AS"),
    ("py:class", "_S"),
    ("py:class", "usercontext.sqlalchemy._AS"),
    ("py:class", "usercontext.sqlalchemy._S"),
    ("py:class", "Hashable"),
    ("py:class", "Makes"),
    ("py:class", "PerKey"),
    ("py:class", "usercontext._local_quota._Core"),
    # FastAPI, an optional dependency: no intersphinx. The aliases of
    # usercontext.fastapi show their Depends marker and its private function.
    ("py:class", "fastapi.params.Depends"),
    ("py:class", "usercontext.fastapi._current_context"),
    ("py:class", "usercontext.fastapi._current_emitter"),
    # Celery, an optional dependency: no intersphinx.
    ("py:class", "celery.app.base.Celery"),
    # OpenTelemetry, the otel extra: no intersphinx either. Some of its
    # annotations are names imported only for type checking.
    ("py:class", "collections.abc.Mapping"),
    ("py:class", "opentelemetry.propagators.textmap.CarrierT"),
    ("py:class", "opentelemetry.propagators.textmap.Getter"),
    ("py:class", "opentelemetry.metrics.MeterProvider"),
    ("py:class", "AttributeValue"),
    ("py:class", "CarrierT"),
    ("py:class", "Context"),
    ("py:class", "ReadableSpan"),
    ("py:class", "Setter"),
    ("py:class", "Span"),
]

myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Show defaults as written in the source (a sentinel's name, not its repr).
autodoc_preserve_defaults = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"usercontext {release}"


def _reexported_data_doc(
    _app: Sphinx,
    what: str,
    name: str,
    _obj: object,
    _options: object,
    lines: list[str],
) -> None:
    """
    Document a constant re-exported by `usercontext` with the docstring written
    under its definition in a private module.

    A constant such as a frozenset has no ``__module__``, so autodoc cannot find
    where it was defined and would show the docstring of its type instead.
    """
    if what != "data" or not name.startswith("usercontext."):
        return
    attr = name.rpartition(".")[2]
    for modname in sorted(sys.modules):
        if modname.startswith("usercontext._"):
            doc = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", attr))
            if doc:
                lines[:] = list(doc)
                return


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-docstring", _reexported_data_doc)

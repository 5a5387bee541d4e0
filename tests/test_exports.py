"""
Tests of the public surface: every public module (each ``usercontext.*``
module without a leading underscore, found by walking the package) lists in
``__all__`` exactly the names it defines, sorted, each documented; each
adapter imports when its extra is installed. What `import usercontext`
imports is tested in test_import_graph.py.
"""

from __future__ import annotations
import __future__

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import re
import sys
import types

import pytest

import usercontext
import usercontext.exceptions


def isort_key(name):
    """
    The order of ruff's RUF022 ("isort-style"), which lints __all__ here:
    SCREAMING_SNAKE_CASE first, then CamelCase, then the rest, each in
    natural order.
    """
    if len(name) > 1 and name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return group, natural


def public_module_names():
    """
    Return the names of the public modules of the package: ``usercontext``
    and every module below it with no name part that starts with an
    underscore. Private packages are not entered, and nothing is imported
    but the public packages, to find their modules.
    """
    names = ["usercontext"]

    def walk(path, prefix):
        for module in pkgutil.iter_modules(path, prefix):
            if module.name.rpartition(".")[2].startswith("_"):
                continue
            names.append(module.name)
            if module.ispkg:
                walk(importlib.import_module(module.name).__path__, f"{module.name}.")

    walk(usercontext.__path__, "usercontext.")
    return names


PUBLIC_MODULES = public_module_names()
#: The kinds of type variables: a module defines them for its annotations only.
TYPE_VARIABLES = {"TypeVar", "ParamSpec", "TypeVarTuple"}
#: The public modules that are no adapter: they need no extra (pytest loads
#: its plugin itself, where it runs).
NOT_ADAPTERS = {
    "usercontext",
    "usercontext.exceptions",
    "usercontext.pytest_plugin",
    "usercontext.testing",
}


def extras():
    """
    Return the extras of the installed distribution, each with the names of
    the distributions it requires; ``all`` (every adapter) and ``report`` (the
    charts of ``usercontext report``'s HTML, no module of its own) are left out.
    """
    required = {
        name: []
        for name in importlib.metadata.metadata("usercontext").get_all("Provides-Extra") or []
    }
    for requirement in importlib.metadata.requires("usercontext") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra is not None:
            required[extra.group(1)].append(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
    required.pop("all", None)
    required.pop("report", None)
    return required


EXTRAS = extras()


def missing_distributions(extra):
    """
    Return the distributions of *extra* that are not installed.
    """
    return [name for name in EXTRAS[extra] if not installed(name)]


def installed(distribution):
    """
    Tell whether *distribution* is installed.
    """
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def import_public(name):
    """
    Import the public module *name*; skip when it is an adapter whose extra
    is not installed.
    """
    extra = name.rpartition(".")[2]
    if name not in NOT_ADAPTERS and extra in EXTRAS and missing_distributions(extra):
        pytest.skip(f"the {extra} extra is not installed: pip install usercontext[{extra}]")
    return importlib.import_module(name)


def defined_public_names(module):
    """
    Return the public names *module* defines.

    For a package's face (an ``__init__`` module), that is every public name
    it holds but modules, __future__ features, and classes or functions from
    outside usercontext: it re-exports what private modules define. For any
    other module, it is every public class, function and variable its own
    source defines at the top level, and what it imports from a private
    module to be its face (other imports and type variables are not
    definitions).
    """
    if hasattr(module, "__path__"):
        names = set()
        for name in dir(module):
            if name.startswith("_"):
                continue
            value = getattr(module, name)
            if isinstance(value, (types.ModuleType, __future__._Feature)):
                continue
            if (inspect.isclass(value) or callable(value)) and not getattr(
                value, "__module__", ""
            ).startswith("usercontext"):
                continue
            names.add(name)
        return names
    body = ast.parse(inspect.getsource(module)).body
    # A public module may be the face of a private one, as the package is.
    faced = {
        alias.asname or alias.name
        for node in body
        if isinstance(node, ast.ImportFrom) and node.level and (node.module or "").startswith("_")
        for alias in node.names
    }
    return {
        name
        for name in (top_level_definitions(body) | faced)
        if not name.startswith("_")
        and type(getattr(module, name, None)).__name__ not in TYPE_VARIABLES
    }


def top_level_definitions(body):
    """
    Return the names that the statements *body* define at the top level of
    a module, in ``if`` and ``try`` blocks too.
    """
    names = set()
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.If):
            if ast.unparse(node.test) != "TYPE_CHECKING":  # not there when the module runs
                names |= top_level_definitions(node.body)
            names |= top_level_definitions(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                names |= top_level_definitions(block)
    return names


def attribute_docstrings(module):
    """
    Return the names of module-level assignments in *module*'s source that are
    followed by a docstring, or follow a ``#:`` comment (as Sphinx reads them).
    """
    source = inspect.getsource(module)
    lines = source.splitlines()
    tree = ast.parse(source)
    documented = set()
    for node in tree.body:
        # Sphinx's other form: a comment of "#:" lines just above.
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and lines[node.lineno - 2].startswith(
            "#:"
        ):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            documented |= {t.id for t in targets if isinstance(t, ast.Name)}
    for node, following in zip(tree.body, tree.body[1:], strict=False):
        if (
            isinstance(node, (ast.Assign, ast.AnnAssign))
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
            and following.value.value.strip()
        ):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            documented |= {t.id for t in targets if isinstance(t, ast.Name)}
    return documented


def has_docstring(module, name):
    """
    Whether the public name *name* of *module* is documented: classes and
    functions by their own docstring, constants and type aliases by an
    attribute docstring in the module that defines them.
    """
    value = getattr(module, name)
    if (inspect.isclass(value) or callable(value)) and getattr(value, "__module__", "").startswith(
        "usercontext"
    ):
        return bool(inspect.getdoc(value)) and value.__doc__ is not None
    sources = [
        m
        for m_name, m in sorted(sys.modules.items())
        if m_name.startswith("usercontext") and m is not None and getattr(m, name, None) is value
    ]
    return any(name in attribute_docstrings(m) for m in sources)


@pytest.fixture(name="module", params=PUBLIC_MODULES)
def _module(request):
    """
    Each public module.
    """
    return import_public(request.param)


class TestPublicModules:
    def test_found_by_walking(self):
        """
        The walk finds the package's face, the exceptions and the adapters,
        and no private module.
        """
        assert {"usercontext", "usercontext.exceptions", "usercontext.asgi"} <= set(PUBLIC_MODULES)
        assert not [name for name in PUBLIC_MODULES if "._" in name]

    def test_every_adapter_has_its_extra(self):
        """
        Each public module but the face, the exceptions and the test helpers
        is an adapter, with an extra of the same name, and each extra names an
        adapter.
        """
        adapters = {name.rpartition(".")[2] for name in PUBLIC_MODULES if name not in NOT_ADAPTERS}

        assert adapters == set(EXTRAS)

    @pytest.mark.parametrize("extra", sorted(EXTRAS))
    def test_adapter_imports_with_its_extra(self, extra):
        """
        With its extra installed, an adapter imports.
        """
        missing = missing_distributions(extra)
        if missing:
            pytest.skip(f"the {extra} extra is not installed ({', '.join(missing)} missing)")

        assert importlib.import_module(f"usercontext.{extra}").__name__ == f"usercontext.{extra}"


class TestAll:
    def test_sorted(self, module):
        """
        __all__ is sorted (constants, then classes, then functions, as ruff's
        RUF022 sorts it) and has no duplicates.
        """
        assert module.__all__ == sorted(set(module.__all__), key=isort_key)

    def test_matches_public_names(self, module):
        """
        __all__ lists exactly the public names the module defines.
        """
        assert set(module.__all__) == defined_public_names(module)

    def test_names_exist(self, module):
        """
        Every name in __all__ can be imported.
        """
        namespace: dict[str, object] = {}
        exec(f"from {module.__name__} import *", namespace)  # noqa: S102

        assert set(module.__all__) <= set(namespace)

    def test_docstrings(self, module):
        """
        Every exported name has a docstring.
        """
        undocumented = [name for name in module.__all__ if not has_docstring(module, name)]

        assert undocumented == []


class TestExceptions:
    def test_exceptions_exported(self):
        """
        Every public exception is importable from the top-level package too.
        """
        missing = [
            name for name in usercontext.exceptions.__all__ if not hasattr(usercontext, name)
        ]

        assert missing == []

    @pytest.mark.parametrize("name", usercontext.exceptions.__all__)
    def test_hierarchy(self, name):
        """
        Every public exception derives from UserContextError, and each one
        that is raised (not a base of others) from a fitting builtin too.
        """
        cls = getattr(usercontext.exceptions, name)
        exported = [getattr(usercontext.exceptions, n) for n in usercontext.exceptions.__all__]

        assert issubclass(cls, usercontext.UserContextError)
        if not any(other is not cls and issubclass(other, cls) for other in exported):
            builtin = [
                base
                for base in cls.__mro__[1:]
                if base.__module__ == "builtins" and base not in (Exception, BaseException, object)
            ]
            assert builtin, f"{name} subclasses no fitting builtin"


class TestVersion:
    def test_version(self):
        """
        __version__ is the installed distribution's version.
        """
        assert isinstance(usercontext.__version__, str)
        assert usercontext.__version__ == importlib.metadata.version("usercontext")

    def test_unknown_attribute(self):
        """
        Unknown attributes raise AttributeError naming them.
        """
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            usercontext.nope  # noqa: B018

from __future__ import annotations
import __future__

import ast
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import types

import pytest

import usercontext
import usercontext.exceptions


ALLOWED_DEPENDENCIES = {
    "usercontext",
    "attr",
    "attrs",
    "typing_extensions",
    "anyio",
    "exceptiongroup",
}
# anyio imports sniffio when it is installed (trio requires it), though anyio
# itself no longer requires it: see anyio/_core/_eventloop.py.
ANYIO_OPTIONAL = {"sniffio"}
FORBIDDEN = {
    "starlette",
    "fastapi",
    "sqlalchemy",
    "redis",
    "structlog",
    "trio",
    "pytest",
    "hypothesis",
}


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


def defined_public_names(module):
    """
    Return the public names of *module* that usercontext defines: no modules,
    no __future__ features, and no classes or functions imported from
    elsewhere.
    """
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


def attribute_docstrings(module):
    """
    Return the names of module-level assignments in *module*'s source that are
    followed by a docstring.
    """
    tree = ast.parse(inspect.getsource(module))
    documented = set()
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
    functions by their own docstring, constants by an attribute docstring in
    the module that defines them.
    """
    value = getattr(module, name)
    if inspect.isclass(value) or callable(value):
        return bool(inspect.getdoc(value)) and value.__doc__ is not None
    sources = [
        m
        for m_name, m in sorted(sys.modules.items())
        if m_name.startswith("usercontext") and m is not None and getattr(m, name, None) is value
    ]
    return any(name in attribute_docstrings(m) for m in sources)


def anyio_requirements():
    """
    Return the import names of anyio's unconditional requirements.
    """
    names = set()
    for requirement in importlib.metadata.requires("anyio") or []:
        if "extra ==" in requirement.replace(" ", "").replace("extra==", "extra =="):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        names.add(re.sub(r"[-.]+", "_", name).lower())
    return names


@pytest.mark.parametrize("module", [usercontext, usercontext.exceptions], ids=lambda m: m.__name__)
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


class TestImportIsLight:
    def test_no_framework_imported(self):
        """
        `import usercontext` imports only the standard library, attrs,
        typing-extensions, anyio and anyio's own requirements.
        """
        code = (
            "import json, sys\n"
            "before = set(sys.modules)\n"
            "import usercontext\n"
            "print(json.dumps({'new': sorted(set(sys.modules) - before),"
            " 'all': sorted(sys.modules)}))\n"
        )
        out = subprocess.run(  # noqa: S603  # our own interpreter and code
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        modules = json.loads(out)
        new_top_level = {name.partition(".")[0] for name in modules["new"]}
        all_top_level = {name.partition(".")[0] for name in modules["all"]}
        allowed = (
            set(sys.stdlib_module_names)
            | ALLOWED_DEPENDENCIES
            | anyio_requirements()
            | ANYIO_OPTIONAL
        )

        assert "usercontext" in new_top_level
        assert "anyio" in new_top_level
        assert new_top_level - allowed == set()
        assert all_top_level & FORBIDDEN == set()

    def test_anyio_requirements_parsed(self):
        """
        anyio's requirements are read from its metadata, without extras.
        """
        names = anyio_requirements()

        assert "idna" in names
        assert "trio" not in names
        assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)

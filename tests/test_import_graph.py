"""
Tests of the shape of the source: the graph of the package's imports of its
own modules has no circle, no module is longer than `MAX_LINES`, and
`import usercontext` imports no framework and no part of the report.

The graph is read from the source with `ast`; no module is imported. It holds
the imports that run when a module is imported: those at its top level,
in ``if``, ``try`` and ``with`` blocks too, but not those inside functions or
classes (they run later, on a call), and not those under
``if TYPE_CHECKING:``, which never run: they are for the type checkers, and a
circle through them costs nothing at run time. A second, stricter graph adds
the imports inside functions, for the layering of the modules.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import re
import subprocess
import sys

from pathlib import Path

import pytest

import usercontext


SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "usercontext"

#: The most lines a module of the package may have.
MAX_LINES = 750
#: The modules above `MAX_LINES` today, each to be split: their test is an
#: expected failure until then, and an entry that no longer names a module, or
#: names one that fits, fails the run so that it is taken off the list.
TOO_LONG: frozenset[str] = frozenset()
#: What `import usercontext` may import beside the standard library.
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
#: What `import usercontext` must not import: frameworks, test tools, and the
#: report, which only the command line imports, when it runs.
FORBIDDEN = (
    "celery",
    "fastapi",
    "hypothesis",
    "opentelemetry",
    "pytest",
    "redis",
    "sqlalchemy",
    "starlette",
    "structlog",
    "trio",
)
#: What `import usercontext` leaves to first use: the private modules behind
#: the names `usercontext.__getattr__` loads (PEP 562), and the heavy standard
#: modules only they, or a call, need.
LAZY = (
    "anyio",
    "asyncio",
    "concurrent.futures",
    "hashlib",
    "hmac",
    "json",
    "logging",
    "ssl",
    "subprocess",
    "urllib.parse",
    "usercontext._emitter",
    "usercontext._engine_use",
    "usercontext._executor",
    "usercontext._factory",
    "usercontext._lifecycle",
    "usercontext._local_quota",
    "usercontext._quota",
    "usercontext._registry",
    "usercontext._scope",
    "usercontext._signing",
)


def module_files():
    """
    Return each module of the package, by its dotted name, with its file.
    """
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def runtime_imports(body):
    """
    Yield the import statements of *body* that run when the module is
    imported (see the module's docstring).
    """
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from runtime_imports(node.body)
            yield from runtime_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from runtime_imports(block)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            yield from runtime_imports(node.body)


def is_type_checking(test):
    """
    Tell whether the condition *test* is ``TYPE_CHECKING`` (or
    ``typing.TYPE_CHECKING``).
    """
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(name, node):
    """
    Return the modules of the package that the import *node* of the module
    *name* imports: a name imported from a package is its submodule when it
    is one, else the package itself.
    """
    is_package = MODULES[name].name == "__init__.py"
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        targets = [
            f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
            for alias in node.names
        ]
    found = set()
    for target in targets:
        # The package of a name that is no module of ours (`usercontext.x.y`
        # with y a class) is what is imported; other packages are left out.
        module = target
        while module not in MODULES and "." in module:
            module = module.rpartition(".")[0]
        if module in MODULES:
            found.add(module)
    return found


def deferred_too(body):
    """
    Yield every import statement of *body* but those under
    ``if TYPE_CHECKING:``: those inside functions and classes too.
    """
    type_only = {
        id(inner)
        for node in ast.walk(ast.Module(body=body, type_ignores=[]))
        if isinstance(node, ast.If) and is_type_checking(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_only:
            yield node


def import_graph(imports=runtime_imports):
    """
    Return the package's graph: each module with the modules of the package
    that the statements *imports* finds in its source import.
    """
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = set()
        for node in imports(tree.body):
            graph[name] |= imported_modules(name, node)
        graph[name].discard(name)
    return graph


def reachable(graph, start):
    """
    Return the nodes of *graph* that a path from *start* reaches.
    """
    seen, todo = set(), [start]
    while todo:
        for successor in graph[todo.pop()]:
            if successor not in seen:
                seen.add(successor)
                todo.append(successor)
    return seen


def circles(graph):
    """
    Return the circles of *graph*: each set of more than one node that reach
    one another, sorted.
    """
    reach = {node: reachable(graph, node) for node in graph}
    components = {
        frozenset({node} | {other for other in reach[node] if node in reach[other]})
        for node in graph
    }
    return sorted(sorted(c) for c in components if len(c) > 1)


class TestGraph:
    def test_reads_the_imports(self):
        """
        The graph holds the package face's imports of its private modules,
        and an adapter's import of the face.
        """
        graph = import_graph()

        assert {"usercontext._context", "usercontext._current"} <= graph["usercontext"]
        assert "usercontext" in graph["usercontext.asgi"]

    def test_no_circle(self):
        """
        No module imports itself through others when it is imported.
        """
        assert circles(import_graph()) == []

    def test_no_circle_with_deferred_imports(self):
        """
        Nor through the imports inside functions, which run on a call: the
        modules form layers.
        """
        assert circles(import_graph(deferred_too)) == []


class TestReading:
    """
    The reading of the graph, on small examples.
    """

    def test_circles_found(self):
        """
        A circle of three modules is found once, and a module beside it is in
        none; a module importing only itself is no circle.
        """
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}

        assert circles(graph) == [["a", "b", "c"]]

    def test_what_runs_on_import(self):
        """
        Imports in ``if``, ``else``, ``try``, ``except`` and ``with`` blocks
        count; those in functions, classes and ``if TYPE_CHECKING:`` do not.
        """
        source = (
            "import a\n"
            "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
            "if typing.TYPE_CHECKING:\n    import d\n"
            "try:\n    import e\nexcept ImportError:\n    import f\n"
            "with x:\n    import g\n"
            "def h():\n    import i\n"
            "class J:\n    import k\n"
        )
        found = [
            alias.name for node in runtime_imports(ast.parse(source).body) for alias in node.names
        ]

        assert found == ["a", "c", "e", "f", "g"]
        assert sorted(a.name for n in deferred_too(ast.parse(source).body) for a in n.names) == [
            "a",
            "c",
            "e",
            "f",
            "g",
            "i",
            "k",
        ]

    @pytest.mark.parametrize(
        ("name", "source", "expected"),
        [
            ("usercontext.asgi", "from ._context import UserContext", {"usercontext._context"}),
            ("usercontext.asgi", "from . import exceptions", {"usercontext.exceptions"}),
            ("usercontext.asgi", "from . import UserContext", {"usercontext"}),
            ("usercontext", "from ._ids import new_id", {"usercontext._ids"}),
            ("usercontext", "from .exceptions import NoContextError", {"usercontext.exceptions"}),
            ("usercontext.asgi", "import usercontext.exceptions", {"usercontext.exceptions"}),
            ("usercontext.asgi", "import usercontext as uc", {"usercontext"}),
            ("usercontext.asgi", "from usercontext._codec import x", {"usercontext._codec"}),
            ("usercontext.asgi", "import anyio, json", set()),
        ],
    )
    def test_imports_resolved(self, name, source, expected):
        """
        Relative and absolute imports resolve to the package's modules: a
        name from a package is its submodule when it is one; other packages
        are left out.
        """
        (node,) = ast.parse(source).body

        assert imported_modules(name, node) == expected


def _length_param(name):
    if name in TOO_LONG:
        reason = f"longer than {MAX_LINES} lines; to be split"
        return pytest.param(name, marks=pytest.mark.xfail(reason=reason, strict=True))
    return name


class TestLength:
    @pytest.mark.parametrize("name", [_length_param(name) for name in MODULES])
    def test_short_enough(self, name):
        """
        No module is longer than `MAX_LINES` lines.
        """
        lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())

        assert lines <= MAX_LINES, f"{name} has {lines} lines"

    def test_expected_failures_are_modules(self):
        """
        Each module on the list of those too long still exists.
        """
        assert set(MODULES) >= TOO_LONG


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


class TestImportIsLight:
    def test_no_framework_imported(self):
        """
        `import usercontext`, in a fresh interpreter, imports only the
        standard library, attrs, typing-extensions, anyio and anyio's own
        requirements (anyio itself on first use only: see `LAZY`): no
        framework, and nothing of the report.
        """
        out = _after_import_usercontext(
            "print(json.dumps({'new': sorted(set(sys.modules) - before),"
            " 'all': sorted(sys.modules)}))\n"
        )
        modules = json.loads(out)
        new_top_level = {name.partition(".")[0] for name in modules["new"]}
        allowed = (
            set(sys.stdlib_module_names)
            | ALLOWED_DEPENDENCIES
            | anyio_requirements()
            | ANYIO_OPTIONAL
        )

        assert "usercontext" in new_top_level
        assert new_top_level - allowed == set()
        assert [
            m for m in modules["all"] if any(m == f or m.startswith(f"{f}.") for f in FORBIDDEN)
        ] == []

    def test_heavy_modules_left_to_first_use(self):
        """
        `import usercontext` imports none of `LAZY`: not anyio or asyncio,
        not the emitter, the factory, the quotas or the registry. The first read of a
        name they define imports its module, once, and later reads find the
        same object in the package's namespace.
        """
        out = _after_import_usercontext(
            "after_import = set(sys.modules) - before\n"
            "registry = usercontext.Registry\n"
            "print(json.dumps({'after_import': sorted(after_import),"
            " 'after_read': sorted(set(sys.modules) - before),"
            " 'cached': 'Registry' in vars(usercontext),"
            " 'same': usercontext.Registry is registry"
            " is sys.modules['usercontext._registry'].Registry}))\n"
        )
        found = json.loads(out)

        assert [m for m in LAZY if m in found["after_import"]] == []
        assert "usercontext._context" in found["after_import"]
        assert "usercontext._registry" in found["after_read"]
        assert (found["cached"], found["same"]) == (True, True)

    def test_lazy_names_listed(self):
        """
        The names loaded on first use are in ``dir(usercontext)`` and
        ``__all__``, and each is defined by the module the package names for
        it.
        """
        lazy = vars(usercontext)["_LAZY"]

        assert set(lazy) <= set(dir(usercontext))
        assert set(lazy) <= set(usercontext.__all__)
        for name, module in lazy.items():
            defined = importlib.import_module(f"usercontext.{module}")
            assert getattr(usercontext, name) is getattr(defined, name)

    def test_anyio_requirements_parsed(self):
        """
        anyio's requirements are read from its metadata, without extras.
        """
        names = anyio_requirements()

        assert "idna" in names
        assert "trio" not in names
        assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)


def _after_import_usercontext(code: str) -> str:
    """
    Run *code* in a fresh interpreter right after ``import usercontext``, with
    ``json``, ``sys`` and ``before`` (the modules loaded before it) at hand,
    and return what it printed.
    """
    script = (
        "import json, sys\n"
        # What attrs imports is the floor's, not ours: on Python 3.10 it
        # imports platform, and with it subprocess.
        "import attrs\n"
        "before = set(sys.modules)\n"
        "import usercontext\n" + code
    )
    return subprocess.run(  # noqa: S603  # our own interpreter and code
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout

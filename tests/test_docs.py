"""
The documentation's examples are tests: every ```python block of a page runs,
and the API reference documents every public name.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import symtable
import sys

from pathlib import Path

import pytest

import usercontext
import usercontext.exceptions
import usercontext.testing


DOCS = Path(__file__).resolve().parent.parent / "docs"
_FENCE = re.compile(r"^(`{3,})[ \t]*python[ \t]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_DOCUMENTED = re.compile(
    r"^\.\. auto(?:class|function|data|exception|attribute)::\s+([\w.]+)", re.MULTILINE
)


def python_blocks(page: Path) -> list[str]:
    """
    Return the bodies of the ```python fences of *page*, in order.
    """
    return [m.group(2) for m in _FENCE.finditer(page.read_text(encoding="utf-8"))]


PAGES = sorted(DOCS.glob("*.md"))
EXAMPLES = [page for page in PAGES if python_blocks(page)]


def _uses_redis(page: Path) -> bool:
    """
    Tell whether *page*'s examples use the Redis adapter.
    """
    return any("usercontext.redis" in block for block in python_blocks(page))


class TestExamples:
    def test_pages_found(self):
        """
        The docs have pages, and some of them have examples to run.
        """
        assert PAGES
        assert EXAMPLES

    @pytest.mark.parametrize(
        "page",
        [
            # A page that uses Redis needs the test Redis, which the mark says.
            pytest.param(page, marks=[pytest.mark.server("redis")] if _uses_redis(page) else [])
            for page in EXAMPLES
        ],
        ids=[page.name for page in EXAMPLES],
    )
    def test_page_examples_run(self, page, tmp_path, request):
        """
        A page's python blocks, concatenated in order, run as one script in a
        fresh interpreter and exit with 0, with warnings as errors. A page
        that uses Redis gets a database of the test Redis as ``REDIS_URL``.
        """
        blocks = python_blocks(page)
        script = tmp_path / f"{page.stem}_examples.py"
        script.write_text("\n".join(blocks), encoding="utf-8")
        env = dict(os.environ)
        if _uses_redis(page):
            env["REDIS_URL"] = request.getfixturevalue("redis_db")

        result = subprocess.run(  # noqa: S603  # our own interpreter on our own docs
            [sys.executable, "-W", "error", str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


class TestConformanceRecipe:
    def test_recipe_runs_the_suite(self, tmp_path):
        """
        The API reference's recipe for a quota backend, run by pytest as a
        user would, runs every conformance test on asyncio and trio against
        `LocalQuota`, and they pass.
        """
        (recipe,) = [b for b in python_blocks(DOCS / "api.md") if "QuotaConformance" in b]
        module = tmp_path / "test_my_quota.py"
        module.write_text(recipe, encoding="utf-8")
        cases = [name for name in dir(usercontext.testing.QuotaConformance) if name[:5] == "test_"]

        result = subprocess.run(  # noqa: S603  # our own interpreter on our own docs
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{2 * len(cases)} passed" in result.stdout


class TestAPIReference:
    def test_every_public_name_is_documented(self):
        """
        api.md has an autodoc directive for every name in `usercontext.__all__`,
        `usercontext.exceptions.__all__`, `usercontext.testing.__all__` and
        `usercontext.redis.__all__` (with the redis extra), and
        documents no other top-level name.
        """
        text = (DOCS / "api.md").read_text(encoding="utf-8")
        documented = {name.rpartition(".")[2] for name in _DOCUMENTED.findall(text)}
        public = set(usercontext.__all__) | set(usercontext.exceptions.__all__)
        public |= set(usercontext.testing.__all__)
        if importlib.util.find_spec("redis") is not None:
            redis_module = importlib.import_module("usercontext.redis")  # needs its extra
            public |= set(redis_module.__all__)
        else:  # pragma: no cover  # run without the redis extra
            documented -= {"RedisBus", "RedisQuota", "RedisLease", "RedisQuotaStats"}

        assert public - documented == set(), "public names missing from docs/api.md"
        assert documented - public == set(), "docs/api.md documents non-public names"


_TEST_REF = re.compile(r"`((?:tests|docs/examples)/[\w/]+\.py)::([\w:]+)`")
ROOT = DOCS.parent


class TestGuaranteesPage:
    def test_every_named_test_exists(self):
        """
        Every test that the guarantees page names is defined, in the class it
        names: the page cannot promise a proof that is not there.
        """
        refs = _TEST_REF.findall((DOCS / "guarantees.md").read_text(encoding="utf-8"))
        missing = []
        for path, node in refs:
            *classes, name = node.split("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            block = source
            for cls in classes:
                start = source.find(f"\nclass {cls}")
                end = source.find("\nclass ", start + 1)
                block = source[start : end if end != -1 else None] if start != -1 else ""
            if not re.search(rf"^\s*(?:async )?def {name}\(", block, re.MULTILINE):
                missing.append(f"{path}::{node}")

        assert len(refs) >= 20
        assert missing == []


DIAGRAMS = sorted((DOCS / "diagrams").glob("*.dot"))
_GENERATOR = re.compile(r"<!-- Generated by graphviz version ([\d.]+)")


class TestDiagrams:
    def test_every_source_has_its_picture_on_a_page(self):
        """
        Each Graphviz source has its rendered SVG beside it, and some page
        shows that SVG.
        """
        pages = "".join(page.read_text(encoding="utf-8") for page in PAGES)

        assert len(DIAGRAMS) >= 3
        for source in DIAGRAMS:
            assert source.with_suffix(".svg").is_file(), source.name
            assert f"diagrams/{source.stem}.svg" in pages, source.name

    @pytest.mark.parametrize("source", DIAGRAMS, ids=[d.stem for d in DIAGRAMS])
    def test_picture_is_the_rendering_of_its_source(self, source):
        """
        With the Graphviz version that rendered the committed SVG, rendering
        the source again gives the same SVG: nobody edited one without the
        other.
        """
        svg = source.with_suffix(".svg").read_text(encoding="utf-8")
        made_by = _GENERATOR.search(svg)
        assert made_by is not None
        dot = shutil.which("dot")
        if dot is None:
            pytest.skip("Graphviz's dot is not installed")
        version = subprocess.run(  # noqa: S603  # Graphviz
            [dot, "-V"], capture_output=True, text=True, check=True
        ).stderr
        if made_by.group(1) not in version:
            pytest.skip(f"dot is not Graphviz {made_by.group(1)}, which rendered the SVG")

        rendered = subprocess.run(  # noqa: S603  # Graphviz
            [dot, "-Tsvg", str(source)], capture_output=True, text=True, check=True
        ).stdout

        assert rendered == svg


_CONTINUES = re.compile(r"\A# Continues from the blocks above, which define: (.*)\.\n")
# The exception groups are builtins from Python 3.11 on; a block that runs on
# 3.10 too imports the backport itself.
_BUILTIN_NAMES = frozenset(dir(builtins)) | {
    "__name__",
    "__file__",
    "BaseExceptionGroup",
    "ExceptionGroup",
}


def _free_names(source: str) -> set[str]:
    """
    Return the global names that *source* reads, in any of its scopes, but
    never binds at its top level (nor imports), other than builtins: what it
    needs from the blocks before it. A function's parameters and locals are
    its own; a name a function reads that is global there is needed.
    """
    top = symtable.symtable(source, "<block>", "exec")
    made = _top_level_names(top)
    needed: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            if not symbol.is_referenced():
                continue
            read_globally = table is top or symbol.is_global()
            if read_globally and symbol.get_name() not in made:
                needed.add(symbol.get_name())
    return needed - _BUILTIN_NAMES


def _top_level_names(top: symtable.SymbolTable) -> set[str]:
    """
    Return the names the block of *top* binds at its top level.
    """
    return {
        symbol.get_name()
        for symbol in top.get_symbols()
        if symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace()
    }


def _made(source: str) -> set[str]:
    """
    Return the names *source* binds at its top level, for the blocks after it.
    """
    return _top_level_names(symtable.symtable(source, "<block>", "exec"))


class TestBlocksStandAlone:
    @pytest.mark.parametrize("page", EXAMPLES, ids=[page.name for page in EXAMPLES])
    def test_each_block_imports_what_it_uses_and_names_what_it_continues(self, page):
        """
        A reader can copy any block: it imports every module it uses, and a
        block that needs objects made by the blocks before it says so in its
        first line, naming exactly those objects.
        """
        wrong = []
        made: set[str] = set()
        for number, block in enumerate(python_blocks(page), start=1):
            needs = sorted(_free_names(block), key=str.lower)
            wrong += [
                f"block {number}: no block before it defines {n}" for n in needs if n not in made
            ]
            made |= _made(block)
            said = _CONTINUES.match(block)
            named = said.group(1).split(", ") if said else []
            if named != needs:
                wrong.append(
                    f"block {number}: start it with '# Continues from the blocks above, which "
                    f"define: {', '.join(needs)}.'"
                    if needs
                    else f"block {number}: it stands alone; drop its 'Continues from' line"
                )

        assert wrong == []

"""
The README's quick start and usage example are kept honest by these tests: the
test command is the one CI runs, the docs command installs what the build
imports, and the example runs as-is.
"""

from __future__ import annotations

import re
import subprocess
import sys

from importlib.metadata import entry_points
from pathlib import Path

import pytest


if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXAMPLE_README = ROOT / "docs" / "examples" / "agent_service" / "README.md"


def fenced_blocks(text: str, language: str) -> list[str]:
    """
    Return the bodies of the ```language fences in *text*, in order.
    """
    pattern = rf"^(`{{3,}})[ \t]*{re.escape(language)}[ \t]*\n(.*?)^\1[ \t]*$"
    return [m.group(2) for m in re.finditer(pattern, text, re.MULTILINE | re.DOTALL)]


def section(text: str, title: str) -> str:
    """
    Return the part of *text* under the level-2 heading *title*, up to the
    next level-2 heading.
    """
    heading = rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)"
    match = re.search(heading, text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


@pytest.fixture(name="commands", scope="module")
def _commands():
    """
    The shell commands of the README's quick start, in order.
    """
    blocks = fenced_blocks(section(README.read_text(encoding="utf-8"), "Quick start"), "sh")
    return [block.strip() for block in blocks]


class TestQuickStart:
    def test_two_single_line_commands(self, commands):
        """
        The quick start has exactly two shell commands, each on one line.
        """
        assert len(commands) == 2
        for command in commands:
            assert command
            assert "\n" not in command

    def test_ci_runs_the_test_command_verbatim(self, commands):
        """
        `.ci/run` runs the second command (the test suite) exactly as the
        README shows it, on a line of its own.
        """
        lines = [line.strip() for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines()]
        assert commands[1] in lines

    def test_test_command_runs_the_suite_with_coverage(self, commands):
        """
        The second command installs the package in editable mode with the
        tests group and runs pytest under coverage, then combines and reports.
        """
        steps = commands[1].split(" && ")
        assert steps[0] == "python3 -m venv .venv"
        assert ".venv/bin/python -m pip install --upgrade pip" in steps
        assert ".venv/bin/python -m pip install -e . --group tests" in steps
        assert steps[-3:] == [
            ".venv/bin/python -m coverage run -m pytest -n auto",
            ".venv/bin/python -m coverage combine -q",
            ".venv/bin/python -m coverage report",
        ]

    def test_first_command_installs_and_runs_the_report(self, commands):
        """
        The first command creates a fresh venv, upgrades pip, installs the
        package itself (not editable, no groups) and runs `usercontext report`,
        a console script the installed package provides.
        """
        steps = commands[0].split(" && ")
        assert steps == [
            "python3 -m venv .venv",
            ".venv/bin/python -m pip install --upgrade pip",
            ".venv/bin/python -m pip install .",
            ".venv/bin/usercontext report",
        ]
        (script,) = entry_points(group="console_scripts", name="usercontext")
        assert script.value == "usercontext.__main__:main"

    def test_pip_upgrade_precedes_dependency_groups(self, commands):
        """
        pip is upgraded before any `--group` install: older pips lack it.
        """
        for command in commands:
            steps = command.split(" && ")
            upgrade = steps.index(".venv/bin/python -m pip install --upgrade pip")
            groups = [i for i, step in enumerate(steps) if "--group" in step]
            assert all(upgrade < i for i in groups)


@pytest.fixture(name="docs_steps", scope="module")
def _docs_steps():
    """
    The steps of the one shell command of the README's documentation section.
    """
    blocks = fenced_blocks(section(README.read_text(encoding="utf-8"), "Documentation"), "sh")
    assert len(blocks) == 1
    (command,) = (block.strip() for block in blocks)
    assert "\n" not in command
    return command.split(" && ")


class TestDocsCommand:
    def test_installs_the_package_with_every_adapter_and_the_docs_group(self, docs_steps):
        """
        The command creates a venv, upgrades pip before using `--group`,
        installs the package itself with the `all` extra and the docs group
        (the API reference imports every adapter), and builds with -n -W.
        """
        assert docs_steps == [
            "python3 -m venv .venv",
            ".venv/bin/python -m pip install --upgrade pip",
            '.venv/bin/python -m pip install -e ".[all]" --group docs',
            ".venv/bin/python -m sphinx -n -W -b html docs docs/_build/html",
        ]

    def test_all_extra_has_every_adapter(self):
        """
        The `all` extra names every other extra, so the docs command installs
        every framework the API reference imports, greenlet included.
        """
        extras = PYPROJECT["project"]["optional-dependencies"]
        (everything,) = extras["all"]
        names = re.fullmatch(r"usercontext\[(.*)\]", everything).group(1).split(",")
        assert sorted(names) == sorted(set(extras) - {"all"})
        assert any(r.startswith("greenlet") for r in extras["sqlalchemy"])


class TestTestDependencies:
    def test_tests_group_brings_pgserver_where_it_ships(self):
        """
        The tests group installs pgserver (the throwaway PostgreSQL the README
        promises) only where it ships wheels: CPython below 3.13.
        """
        (pgserver,) = [r for r in PYPROJECT["dependency-groups"]["tests"] if "pgserver" in r]
        assert "python_version < '3.13'" in pgserver
        quick_start = section(README.read_text(encoding="utf-8"), "Quick start")
        assert "pgserver" in quick_start
        assert "USERCONTEXT_TEST_POSTGRES_URL" in quick_start

    def test_example_test_command_installs_the_tests_group(self):
        """
        The example service's test command installs the package with the
        extras the app imports and the library's tests group (pytest and the
        plugins its configuration names), from the example's folder.
        """
        blocks = fenced_blocks(section(EXAMPLE_README.read_text(encoding="utf-8"), "Tests"), "sh")
        assert blocks[-1].strip().splitlines() == [
            "python -m pip install --upgrade pip",
            (
                'python -m pip install -e "../../..[fastapi,sqlalchemy]" '
                "--group ../../../pyproject.toml:tests"
            ),
            "python -m pytest",
        ]
        tests = PYPROJECT["dependency-groups"]["tests"]
        for plugin in ("pytest-benchmark", "trio", "httpx2", "websockets", "uvicorn"):
            assert any(r.startswith(plugin) for r in tests), plugin


class TestUsage:
    def test_python_examples_run(self, tmp_path):
        """
        The README's python blocks, concatenated in order, run as a script in a
        fresh interpreter and exit with 0, with warnings as errors.
        """
        blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
        assert blocks, "README.md has no python example"
        script = tmp_path / "readme_example.py"
        script.write_text("\n".join(blocks), encoding="utf-8")

        result = subprocess.run(  # noqa: S603  # our own interpreter on our own README
            [sys.executable, "-W", "error", str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

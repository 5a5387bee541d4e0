"""
The README's quick start and usage example are kept honest by these tests: the
test command is the one CI runs, and the example runs as-is.
"""

from __future__ import annotations

import re
import subprocess
import sys

from importlib.metadata import entry_points
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"


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
            ".venv/bin/python -m coverage run -m pytest",
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

"""
Tests of the "Database sessions" section of ``usercontext report``
(`usercontext._report.db`).

Its timings depend on the machine, so these tests check the rows that must pass
on any machine (nothing leaked) and that every figure is sane. PostgreSQL comes
from ``USERCONTEXT_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``); when it cannot be reached its
test is skipped, unless ``CI=true``, where it fails.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from usercontext._report.db import INSTALL_HINT, POSTGRES_URL_VAR, STEPS, _sizes, db_section
from usercontext._report.frame import Progress, Section
from usercontext._report.rows import Row
from usercontext._report.scale import DEFAULT, QUICK, Scale


TINY = Scale(
    name="tiny",
    repeats=2,
    batch_ns=20_000,
    memory_contexts=50,
    users=2,
    tasks_per_user=1,
    rounds=1,
)
SECTION = Section("database", "Database sessions", STEPS, db_section)
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _run(scale=TINY):
    err = io.StringIO()
    result = db_section(scale, Progress(len(STEPS), err))
    return result, err.getvalue().splitlines()


def _row(result, metric):
    (row,) = [r for r in result.rows if r.metric.startswith(metric)]
    return row


@pytest.fixture(name="no_postgres")
def _no_postgres(monkeypatch):
    """
    No PostgreSQL to measure.
    """
    monkeypatch.delenv(POSTGRES_URL_VAR, raising=False)


@pytest.fixture(name="report_postgres_url")
def _report_postgres_url(monkeypatch, postgres_url):
    """
    The test PostgreSQL (see the root conftest.py) as the report's.
    """
    pytest.importorskip("asyncpg")
    monkeypatch.setenv(POSTGRES_URL_VAR, postgres_url)
    return postgres_url


def _check_backend(result, name, n):
    """
    Check the rows and figures of *name* that must hold on any machine.
    """
    throughput = _row(result, f"{name}: transaction throughput vs legacy")
    assert (throughput.kind, throughput.status in ("PASS", "MISS")) == ("performance", True)
    leaks = _row(result, f"{name}: {n} requests, {round(n * 0.3)} failing")
    assert (leaks.kind, leaks.status) == ("correctness", "PASS"), leaks
    assert leaks.achieved.startswith("**0 / 0**")
    assert _row(result, f"{name}: connections checked out at the end").status == "PASS"
    assert _row(result, f"{name}: connections opened / closed").status == "PASS"
    key = name.lower()
    overhead = result.figures[f"{key}_overhead"]
    assert overhead["ours"]["per_op_ns"] > 0
    assert overhead["floor"]["per_op_ns"] > 0
    assert overhead["target_ratio"] is None
    assert overhead["status"] == "INFO"
    assert result.figures[f"{key}_throughput"]["txn_per_s"] > 0
    requests = result.figures[f"{key}_requests"]
    assert requests["requests"] == n
    assert requests["failed"] == round(n * 0.3)
    assert requests["cancelled"] + requests["succeeded"] == n - requests["failed"]
    assert requests["rows"] == requests["succeeded"]
    assert requests["rows_of_failed_or_cancelled"] == requests["rows_of_successful_missing"] == 0
    assert requests["checked_out_at_end"] == 0
    assert requests["held_at_end"] == []
    assert requests["resources_open"] == []
    assert requests["close_errors"] == 0
    connections = result.figures[f"{key}_connections"]
    assert connections["opened"] == connections["closed"] > 0
    assert connections["checkouts"] == connections["checkins"] > n
    return requests, connections


class TestDatabaseSection:
    def test_sqlite(self, no_postgres):
        """
        On SQLite the section times transactions against the floor, and shows
        that failing and cancelled requests left no row, no connection checked
        out and no connection open; it announces each step once.
        """
        pytest.importorskip("aiosqlite")

        result, progress = _run()

        assert len(result.rows) == 5
        assert all(row.metric.startswith("SQLite: ") for row in result.rows)
        requests, connections = _check_backend(result, "SQLite", 60)
        assert requests["idle_in_transaction"] is None
        assert connections["invalidated"] == 0  # cancelled between queries
        assert [line.split("] ", 1)[1] for line in progress] == [
            f"database: {step} ..." for step in STEPS
        ]
        assert any("WAL mode" in note for note in result.notes)
        json.dumps(result.figures)

    def test_postgresql(self, report_postgres_url):
        """
        With USERCONTEXT_REPORT_POSTGRES_URL set, the section also measures
        PostgreSQL through asyncpg: its cancelled requests are cancelled in
        the middle of a query, and no backend stays idle in a transaction.
        """
        result, _ = _run()

        assert [row.metric.split(":")[0] for row in result.rows] == ["SQLite"] * 5 + [
            "PostgreSQL"
        ] * 5
        requests, connections = _check_backend(result, "PostgreSQL", 60)
        assert requests["idle_in_transaction"] == 0
        assert connections["invalidated"] >= requests["cancelled"] > 0

    @pytest.mark.parametrize(
        ("url", "achieved"),
        [
            ("postgresql://nobody@127.0.0.1:1/none", "not measured: could not use "),
            ("not a url", f"not measured: {POSTGRES_URL_VAR} is not a database URL"),
        ],
    )
    def test_postgresql_unusable(self, monkeypatch, url, achieved):
        """
        A PostgreSQL URL that cannot be used is a failing correctness row that
        says why: the user asked for the leak checks, which were not made.
        """
        pytest.importorskip("asyncpg")
        monkeypatch.setenv(POSTGRES_URL_VAR, url)

        result, _ = _run()

        row = result.rows[-1]
        assert (row.metric, row.target, row.status) == ("PostgreSQL", "measured", "FAIL")
        assert (row.id, row.kind) == ("db.postgresql_measured", "correctness")
        assert row.to_json()["note"].startswith(achieved)
        assert row.achieved.startswith(achieved)

    def test_postgresql_without_asyncpg(self, monkeypatch):
        """
        Without asyncpg, PostgreSQL is a FAIL row that says what to install.
        """
        pytest.importorskip("aiosqlite")
        monkeypatch.setenv(POSTGRES_URL_VAR, DEFAULT_POSTGRES_URL)
        monkeypatch.setitem(sys.modules, "asyncpg", None)

        result, _ = _run()

        assert result.rows[-1].achieved == (
            "not measured: install usercontext[sqlalchemy] (asyncpg)"
        )

    @pytest.mark.parametrize("module", ["sqlalchemy", "aiosqlite", "greenlet"])
    def test_not_installed(self, monkeypatch, module):
        """
        Without SQLAlchemy or its async drivers, the section is one INFO row
        that says what to install, and still announces its steps.
        """
        monkeypatch.setitem(sys.modules, module, None)

        result, progress = _run()

        assert result.rows == (
            Row(
                id="db.not_measured",
                kind="info",
                metric="Database sessions",
                target="none (info)",
                achieved=f"not measured: {INSTALL_HINT}",
                note=f"not measured: {INSTALL_HINT}",
            ),
        )
        assert result.figures == {"skipped": f"not installed: {module}"}
        assert len(progress) == len(STEPS)

    def test_core_only_in_a_subprocess(self):
        """
        In an interpreter where SQLAlchemy cannot be imported, the report with
        this section runs, prints its INFO row and exits with 0, and
        usercontext.sqlalchemy is never imported.
        """
        script = (
            "import sys\n"
            "sys.modules['sqlalchemy'] = None\n"
            "from usercontext._report.db import STEPS, db_section\n"
            "from usercontext._report.frame import Section, run_report\n"
            "from usercontext._report.scale import QUICK\n"
            "section = Section('database', 'Database sessions', STEPS, db_section)\n"
            "code = run_report(scale=QUICK, sections=[section])\n"
            "assert 'usercontext.sqlalchemy' not in sys.modules\n"
            "sys.exit(code)\n"
        )

        proc = subprocess.run(  # noqa: S603  # our own interpreter
            [sys.executable, "-W", "error", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert proc.returncode == 0, proc.stderr
        assert "## Database sessions" in proc.stdout
        assert (
            f"| Database sessions | info | none (info) | not measured: {INSTALL_HINT} | INFO |"
            in proc.stdout
        )

    def test_sizes(self):
        """
        The full report does more work than the quick one.
        """
        full, quick = _sizes(DEFAULT), _sizes(QUICK)

        assert full.requests > quick.requests >= 50
        assert full.pairs * full.txns > quick.pairs * quick.txns
        assert _sizes(TINY) == quick

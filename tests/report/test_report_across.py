"""
Tests of the "Across processes" section of ``usercontext report``
(`usercontext._report.across`).

It runs real processes on a real Redis: the test Redis (``redis_db``) as
``USERCONTEXT_REPORT_REDIS_URL``, or a ``redis-server`` it starts itself. Its
timings depend on the machine; these tests check that the correctness rows hold
and that every figure is sane.
"""

from __future__ import annotations

import importlib.util
import io

import pytest

from usercontext._report import across
from usercontext._report.across import REDIS_URL_VAR, STEPS, across_section
from usercontext._report.frame import Progress
from usercontext._report.scale import QUICK


pytest.importorskip("redis")


def _run(scale=QUICK):
    err = io.StringIO()
    result = across_section(scale, Progress(len(STEPS), err))
    return result, err.getvalue().splitlines()


def _rows(result):
    return {row.id: row for row in result.rows}


class TestNotMeasured:
    def test_without_redis_py(self, monkeypatch):
        """
        Without the redis extra, the section is one info row that says what
        to install, and its steps are still announced.
        """
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "redis" else find_spec(name, *a),
        )

        result, progress = _run()

        (row,) = result.rows
        assert row.kind == "info"
        assert row.achieved == f"not measured: {across.INSTALL_HINT}"
        assert len(progress) == len(STEPS)

    def test_without_a_redis(self, monkeypatch):
        """
        Without a URL and without a redis-server to start, it says both ways
        to get one.
        """
        monkeypatch.delenv(REDIS_URL_VAR, raising=False)
        monkeypatch.setattr(across, "redis_server_binary", lambda: None)
        monkeypatch.setattr(
            across.RedisServer,
            "start",
            classmethod(lambda cls: (_ for _ in ()).throw(across.NoRedisServerError("none"))),
        )

        result, progress = _run()

        (row,) = result.rows
        assert row.kind == "info"
        assert row.achieved == (
            f"not measured: set {REDIS_URL_VAR}, or put redis-server on PATH (none)"
        )
        assert len(progress) == len(STEPS)


class TestMeasured:
    def test_on_the_test_redis(self, monkeypatch, redis_db):
        """
        On a given Redis, every correctness row holds: the limit across 4
        processes, no key left, a killed holder's slot back within TTL +
        0.5 s, BackendUnavailableError within 0.5 s and recovery within 1 s,
        and every event delivered on the other instance in order.
        """
        monkeypatch.setenv(REDIS_URL_VAR, redis_db)

        result, progress = _run()

        rows = _rows(result)
        failed = [r.id for r in result.rows if r.kind == "correctness" and not r.ok]
        assert failed == []
        assert rows["across.quota_limit"].value.value <= across.PER_KEY
        assert rows["across.quota_keys_left"].value.value == 0
        assert 0 < rows["across.killed_holder"].value.value <= across.KILL_TTL_S + 0.5
        assert rows["across.unavailable"].value.value <= 0.5
        assert rows["across.recovered"].value.value <= 1.0
        assert result.figures["events"]["received"] == result.figures["events"]["sent"]
        assert [line.split("] ")[1] for line in progress] == [f"across: {s} ..." for s in STEPS]

    @pytest.mark.server("redis-server")
    def test_on_a_server_of_its_own(self, monkeypatch):
        """
        Without a URL it starts a redis-server and stops it at the end; with
        no binary for the fault scenario, that row says so.
        """
        monkeypatch.delenv(REDIS_URL_VAR, raising=False)
        started = []
        start = across.RedisServer.start.__func__

        def spy(cls, port=None):
            started.append(start(cls, port))
            return started[-1]

        monkeypatch.setattr(across.RedisServer, "start", classmethod(spy))
        monkeypatch.setattr(across, "redis_server_binary", lambda: None)

        result, _ = _run()

        rows = _rows(result)
        assert rows["across.killed_server"].kind == "info"
        assert [r.id for r in result.rows if r.kind == "correctness" and not r.ok] == []
        (server,) = started
        assert server.pid is None  # stopped

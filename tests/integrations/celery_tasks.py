"""
The Celery app of the tests of `usercontext.celery`: the worker process
imports it (``celery -A celery_tasks worker``), the tests make the same app
with `make_app`. Every task reports what it saw as a plain dict.
"""

from __future__ import annotations

import os
import random
import time

from typing import Any

import celery

import redis
import usercontext as uc
import usercontext.celery


URL_VAR = "USERCONTEXT_TEST_CELERY_URL"
WHO = "who"  # the registry's key: the user a scope's resource was made for


def make_app(url: str) -> celery.Celery:
    """
    Return the app on the Redis database *url* (broker and result backend),
    installed with a registry, and its tasks.
    """
    app = celery.Celery("celery_tasks", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    registry = uc.Registry()
    registry.register(WHO, lambda ctx: f"resource of {ctx.user_id}")
    usercontext.celery.install(app, registry=registry)
    client = redis.Redis.from_url(url)

    def seen() -> dict[str, Any] | None:
        ctx = uc.current_or_none()
        if ctx is None:
            return None
        return {
            "user_id": ctx.user_id,
            "request_id": ctx.request_id,
            "parent_request_id": ctx.parent_request_id,
            "depth": ctx.depth,
            "resource": usercontext.celery.scope().get(WHO),
            "open_scopes": registry.stats().scopes,
        }

    @app.task(name="uc.whoami", bind=True, shared=False)
    def whoami(self: Any, pause: float = 0.0) -> dict[str, Any] | None:
        client.rpush("ran", self.request.id)
        before = seen()
        time.sleep(pause * random.random())
        after = seen()
        # Seen at the start and after a pause while other tasks ran: the same
        # (but for the count of scopes open on the worker, which it shows).
        if before is not None and after is not None:
            before["open_scopes"] = after["open_scopes"]
        assert before == after, (before, after)
        return after

    @app.task(name="uc.fail", shared=False)
    def fail() -> None:
        ctx = uc.current()
        msg = f"failed as {ctx.user_id}"
        raise ValueError(msg)

    @app.task(name="uc.flaky", bind=True, max_retries=5, shared=False)
    def flaky(self: Any, retries: int) -> list[Any]:
        client.rpush(f"attempts:{self.request.id}", repr(seen()))
        if self.request.retries < retries:
            raise self.retry(countdown=0)
        return [eval(a) for a in client.lrange(f"attempts:{self.request.id}", 0, -1)]  # noqa: S307  # our own reprs

    return app


if URL_VAR in os.environ:  # in the worker process
    app = make_app(os.environ[URL_VAR])

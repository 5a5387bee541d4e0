"""
`usercontext.celery` in this process: eager mode, and Celery's own tracer
(what a worker runs for each message) on the in-memory transport.
"""

from __future__ import annotations

import uuid

import pytest


celery = pytest.importorskip("celery")

from celery.app.trace import trace_task  # noqa: E402

import usercontext as uc  # noqa: E402
import usercontext.celery  # noqa: E402


def _app(*, eager=False, registry=None):
    app = celery.Celery(
        "test_celery", broker="memory://", backend="cache+memory://", set_as_current=False
    )
    app.conf.update(task_always_eager=eager, task_store_eager_result=False)
    usercontext.celery.install(app, registry=registry)
    return app


def _seen():
    ctx = uc.current_or_none()
    return None if ctx is None else ctx


@pytest.fixture(name="published")
def _published():
    """
    The headers of every task published during the test, as the broker got them.
    """
    headers = []

    def record(headers=None, **_):
        headers_list.append(dict(headers))

    headers_list = headers
    celery.signals.before_task_publish.connect(record, weak=False)
    yield headers
    celery.signals.before_task_publish.disconnect(record)


def _run(task, headers, *args):
    """
    Run *task* as a worker runs a message with *headers*; return its state
    and its return value (or error).
    """
    task_id = str(uuid.uuid4())
    request = {"id": task_id, "task": task.name, **headers}
    info = trace_task(task, task_id, list(args), {}, request=request, app=task.app)
    result = task.AsyncResult(task_id)
    if result.state == "FAILURE":
        error = info.retval.exception
        # An error outside the body comes wrapped with its traceback.
        return result.state, getattr(error, "exc", error)
    return result.state, result.result


class TestInstall:
    def test_checks_its_arguments(self):
        with pytest.raises(TypeError, match=r"celery\.Celery application, got str"):
            usercontext.celery.install("app")  # type: ignore[arg-type]
        app = celery.Celery(set_as_current=False)
        with pytest.raises(TypeError, match=r"usercontext\.Registry or None, got dict"):
            usercontext.celery.install(app, registry={})  # type: ignore[arg-type]

    def test_twice_wraps_the_loader_once(self):
        """
        Installing again replaces the registry; the loader's hook is wrapped once.
        """
        app = _app()
        hook = app.loader.on_task_init
        registry = uc.Registry()
        usercontext.celery.install(app, registry=registry)
        assert app.loader.on_task_init is hook
        assert usercontext.celery._installed[app] is registry

    def test_scope_outside_a_task(self):
        with pytest.raises(RuntimeError, match=r"works in the body of a task"):
            usercontext.celery.scope()


class TestEager:
    def test_child_of_the_callers_context(self, ctx):
        """
        In eager mode the task runs under a child of the caller's context,
        with a scope of the registry; the caller's context is back after.
        """
        registry = uc.Registry()
        registry.register("who", lambda c: c.user_id)
        app = _app(eager=True, registry=registry)

        @app.task(shared=False)
        def whoami():
            return uc.current(), usercontext.celery.scope().get("who")

        with uc.bind(ctx):
            got, who = whoami.delay().get()
            assert uc.current() is ctx
        assert (got.user_id, got.depth, got.parent_request_id) == ("u-42", 1, ctx.request_id)
        assert who == "u-42"
        assert registry.stats().scopes == 0

    def test_no_context_runs_with_none(self):
        app = _app(eager=True)

        @app.task(shared=False)
        def whoami():
            return _seen()

        assert whoami.delay().get() is None

    def test_a_failing_task_closes_its_scope_with_the_error(self, ctx):
        """
        The scope's resources see the task's error; nothing stays bound.
        """
        closed = []

        def resource(c):
            try:
                yield c.user_id
            except ValueError as e:
                closed.append(repr(e))
                raise

        registry = uc.Registry()
        registry.register("who", resource)
        app = _app(eager=True, registry=registry)

        @app.task(shared=False)
        def fail():
            usercontext.celery.scope().get("who")
            raise ValueError("boom")

        with uc.bind(ctx):
            with pytest.raises(ValueError, match="boom"):
                fail.delay().get()
            assert uc.current() is ctx
        assert closed == ["ValueError('boom')"]
        assert registry.stats().scopes == 0

    def test_scope_without_a_registry(self, ctx):
        app = _app(eager=True)

        @app.task(shared=False)
        def scoped():
            return usercontext.celery.scope()

        with uc.bind(ctx), pytest.raises(RuntimeError, match=r"registry=\.\.\."):
            scoped.delay().get()

    def test_an_app_not_installed_is_left_alone(self, ctx):
        app = celery.Celery(set_as_current=False)
        app.conf.task_always_eager = True

        @app.task(shared=False)
        def whoami():
            return _seen()

        with uc.bind(ctx):
            assert whoami.delay().get() is ctx

    def test_too_deep_to_derive_fails_the_task(self, ctx):
        """
        A caller at the maximum depth has no child: the task fails before
        its body runs.
        """
        uc.configure(max_depth=1)
        app = _app(eager=True)
        ran = []

        @app.task(shared=False)
        def whoami():
            ran.append(1)

        with uc.bind(ctx.child()), pytest.raises(uc.InvalidContextError, match="maximum depth"):
            whoami.delay().get()
        assert ran == []


class TestPublish:
    def test_headers_carry_the_context(self, ctx, published):
        app = _app()

        @app.task(shared=False)
        def noop():
            pass

        with uc.bind(ctx):
            noop.delay()
        noop.delay()
        assert published[0]["usercontext"] == uc.to_job(ctx)
        assert "usercontext" not in published[1]

    def test_a_context_too_big_sends_the_reason(self, ctx, published):
        app = _app()

        @app.task(shared=False)
        def noop():
            pass

        with uc.bind(ctx.evolve(metadata={"blob": "x" * 9000})):
            noop.delay()
        (headers,) = published
        assert "over the limit of 8192" in headers["usercontext"]
        with pytest.warns(RuntimeWarning, match="Exception raised outside body"):
            state, error = _run(noop, {"usercontext": headers["usercontext"]})
        assert state == "FAILURE"
        assert isinstance(error, uc.InvalidContextError)
        assert "could not send its context" in str(error)


class TestWorkerTracer:
    def test_binds_a_child_of_the_header(self, ctx):
        app = _app()

        @app.task(shared=False)
        def whoami():
            return uc.current().to_dict()

        state, got = _run(whoami, {"usercontext": uc.to_job(ctx)})
        assert state == "SUCCESS"
        got = uc.UserContext.from_dict(got)
        assert (got.user_id, got.depth, got.parent_request_id) == ("u-42", 1, ctx.request_id)
        assert uc.current_or_none() is None

    @pytest.mark.parametrize(
        ("header", "match"),
        [
            ({"x-usercontext-user-id": "u-1"}, "thread-id is missing"),
            ("x-usercontext-user-id=u-1", "could not send its context"),
            (["x-usercontext-user-id", "u-1"], "not the dict usercontext.to_job"),
        ],
    )
    def test_a_tampered_header_fails_the_task(self, header, match):
        app = _app()
        ran = []

        @app.task(shared=False)
        def whoami():
            ran.append(1)

        with pytest.warns(RuntimeWarning, match="Exception raised outside body"):
            state, error = _run(whoami, {"usercontext": header})
        assert state == "FAILURE"
        assert isinstance(error, uc.InvalidContextError)
        assert match in str(error)
        assert ran == []
        # The next task runs normally.
        assert _run(whoami, {})[0] == "SUCCESS"

    def test_a_retry_carries_the_first_header(self, ctx, published):
        """
        The retry of a task keeps its header, so every attempt is a child of
        the publisher's context; a retry of a task published with none
        carries none.
        """
        app = _app()

        @app.task(bind=True, shared=False)
        def flaky(self):
            raise self.retry(countdown=60)

        header = uc.to_job(ctx)
        assert _run(flaky, {"usercontext": header})[0] == "RETRY"
        assert _run(flaky, {})[0] == "RETRY"
        assert published[0]["usercontext"] == header
        assert "usercontext" not in published[1]

    def test_a_task_published_from_a_task_is_a_grandchild(self, ctx, published):
        app = _app()

        @app.task(shared=False)
        def noop():
            pass

        @app.task(shared=False)
        def parent():
            noop.delay()
            return uc.current().request_id

        state, request_id = _run(parent, {"usercontext": uc.to_job(ctx)})
        assert state == "SUCCESS"
        sent = uc.UserContext.from_headers(published[0]["usercontext"])
        assert sent.request_id == request_id
        assert sent.parent_request_id == ctx.request_id

"""
Tests of `usercontext.asgi.in_child_scope`: work that outlives the response
runs in a child context with a scope of its own.
"""

from __future__ import annotations

import inspect

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware, in_child_scope, request_state

from asgi_helpers import Client, Session, http_scope, json_app, resolve, session_registry


class TestInChildScope:
    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    async def test_background_work_runs_under_a_child(self, is_async, with_registry):
        """
        Work wrapped while the request runs and called after its response (as
        Starlette runs BackgroundTasks: a sync function in a worker thread)
        runs under a child context: the same user, depth 1, the request as its
        parent; given a registry, in a scope of its own, opened after the
        request's scope was closed.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        def work(*args):
            *scope, label = args  # given a registry, the child's scope comes first
            ctx = uc.current()
            assert [s.ctx for s in scope] == ([ctx] if with_registry else [])
            log.append(
                (label, ctx.user_id, ctx.depth, ctx.parent_request_id, registry.stats().scopes)
            )
            return ctx

        async def awork(*args):
            await anyio.lowlevel.checkpoint()
            return work(*args)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            later = in_child_scope(
                awork if is_async else work, registry=registry if with_registry else None
            )
            await json_app(log)(scope, receive, send)
            if is_async:
                child = await later("later")
            else:
                child = await anyio.to_thread.run_sync(later, "later")
            log.append(child is not uc.current())

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(("x-request-id", "req-bg")), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "app sends",
            "commit depth=0",
            "sent http.response.start 200",
            f"sent body {client.body()!r}",
            ("later", "u-42", 1, "req-bg", 1 if with_registry else 0),
            True,  # the request's context is bound again afterwards
        ]
        stats = registry.stats()
        assert (stats.scopes, stats.opened) == (0, 2 if with_registry else 1)

    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    async def test_work_opens_resources_of_its_own(self, is_async):
        """
        The request's resources are closed when the work runs; the work opens
        a scope of the registry for its child context and gets a session of
        its own, committed when it is done.
        """
        log = []
        registry = session_registry(log)
        got = []

        def work():
            with registry.scope() as scope:
                got.append(scope.get(Session))

        async def awork(request_resources):
            with pytest.raises(uc.ScopeClosedError):
                await request_resources.aget(Session)
            async with registry.scope() as scope:
                got.append(await scope.aget(Session))

        async def app(scope, receive, send):
            resources = request_state(scope).resources
            got.append(await resources.aget(Session))
            later = in_child_scope(awork if is_async else work)
            await json_app()(scope, receive, send)
            if is_async:
                await later(resources)
            else:
                await anyio.to_thread.run_sync(later)

        client = Client()
        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        request_session, work_session = got
        assert work_session is not request_session
        assert work_session.ctx.parent_request_id == request_session.ctx.request_id
        assert log == [
            "open u-42 depth=0",
            "commit depth=0",
            "open u-42 depth=1",
            "commit depth=1",
        ]

    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    async def test_spawned_task(self, is_async, with_registry):
        """
        Work that a request spawns into a longer-lived task group, and that
        runs after the response, runs under a child context (in a scope of its
        own, given a registry), after the request's scope was closed.
        """
        log = []
        registry = session_registry(log)
        response_sent = anyio.Event()
        done = []

        def work(*scope):
            ctx = uc.current()
            assert [s.ctx for s in scope] == ([ctx] if with_registry else [])
            done.append((ctx.user_id, ctx.depth, ctx.parent_request_id, registry.stats().scopes))

        async def awork(*scope):
            await anyio.lowlevel.checkpoint()
            work(*scope)

        async def spawned(later):
            await response_sent.wait()
            if is_async:
                await later()
            else:
                await anyio.to_thread.run_sync(later)

        async with anyio.create_task_group() as server:

            async def app(scope, receive, send):
                await request_state(scope).resources.aget(Session)
                later = in_child_scope(
                    awork if is_async else work, registry=registry if with_registry else None
                )
                server.start_soon(spawned, later)
                await json_app()(scope, receive, send)

            client = Client()
            mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
            await mw(http_scope(("x-request-id", "req-t")), client.receive, client.send)
            assert log == ["open u-42 depth=0", "commit depth=0"]
            assert done == []
            response_sent.set()

        assert done == [("u-42", 1, "req-t", 1 if with_registry else 0)]
        stats = registry.stats()
        assert (stats.scopes, stats.opened) == (0, 2 if with_registry else 1)

    def test_each_call_is_a_new_child(self, ctx):
        """
        Each call of the wrapper runs under a new child of the context bound
        when it was wrapped, whatever is bound when it is called.
        """
        with uc.bind(ctx):
            later = in_child_scope(uc.current)
        first, second = later(), later()

        assert first.request_id != second.request_id
        assert first.parent_request_id == second.parent_request_id == ctx.request_id
        assert first.depth == second.depth == 1
        assert uc.current_or_none() is None

    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    def test_keeps_the_name_and_passes_arguments(self, ctx, with_registry):
        """
        The wrapper looks like the function it wraps, and passes its arguments
        and its result through.
        """

        registry = uc.Registry()
        registry.register("one", lambda _ctx: 1)

        def add(*args, b=0):
            """Add."""
            scope, a = args if with_registry else (None, *args)
            return a + b + (scope.get("one") if scope else 0)

        with uc.bind(ctx):
            later = in_child_scope(add, registry=registry if with_registry else None)

        assert later.__name__ == "add"
        assert later.__doc__ == "Add."
        assert later.__wrapped__ is add
        assert later(1, b=2) == (4 if with_registry else 3)

    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    async def test_async_callable_object(self, ctx, with_registry):
        """
        An object whose ``__call__`` is a coroutine function is wrapped by a
        coroutine function, so that the work runs under the child (Starlette
        then awaits it, instead of calling it in a thread and dropping the
        coroutine).
        """
        registry = uc.Registry()

        class Job:
            async def __call__(self, *args):
                *scope, n = args
                assert len(scope) == (1 if with_registry else 0)
                await anyio.lowlevel.checkpoint()
                return n, uc.current().depth, registry.stats().scopes

        with uc.bind(ctx):
            later = in_child_scope(Job(), registry=registry if with_registry else None)

        assert inspect.iscoroutinefunction(later)
        assert await later(5) == (5, 1, 1 if with_registry else 0)

    def test_needs_a_bound_context(self):
        """
        Wrapping outside a request raises NoContextError.
        """
        with pytest.raises(uc.NoContextError):
            in_child_scope(print)

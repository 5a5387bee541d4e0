"""
Tests of `usercontext.structlog` with real structlog pipelines.

Every event must carry the ids of the context bound where its log call ran,
under concurrency too: each concurrent test puts the ids it expects into the
event and checks every event against them.

They are skipped when structlog is missing, unless ``CI=true``, where that
fails the run (see the root conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import logging.config
import logging.handlers
import threading
import time

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import usercontext as uc

from helpers import make_ctx, switches


pytest.importorskip(
    "structlog", reason="structlog is not installed: pip install usercontext[structlog]"
)

import structlog
import structlog.testing

from usercontext.structlog import AddContext, add_context


asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

IDS = ("user_id", "thread_id", "run_id", "request_id")
TASKS, LOGS_PER_TASK = 200, 20
THREADS, LOGS_PER_THREAD = 8, 500


@pytest.fixture(name="capture")
def _capture():
    """
    A structlog logger processing with `AddContext` and capturing the events.
    """
    capture = structlog.testing.LogCapture()
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[structlog.contextvars.merge_contextvars, AddContext(), capture],
    )
    return log, capture.entries


def check_events(events, expected_total):
    """
    Check that each event carries the user and request ids its message names,
    and return the events per request.
    """
    assert len(events) == expected_total
    per_request = {}
    for event in events:
        user_id, request_id, _n = event["event"].split()
        assert (event["user_id"], event["request_id"]) == (user_id, request_id)
        per_request[request_id] = per_request.get(request_id, 0) + 1
    return per_request


class TestAddContextFunction:
    def test_ids_of_bound_context(self, ctx):
        """
        An event logged while a context is bound carries its four ids.
        """
        capture = structlog.testing.LogCapture()
        log = structlog.wrap_logger(None, processors=[add_context, capture])

        with uc.bind(ctx):
            log.info("hello")

        [event] = capture.entries
        assert [event[key] for key in IDS] == ["u-42", "t-7", "r-1", ctx.request_id]

    def test_default_without_context(self):
        """
        Without a bound context each id is "-".
        """
        event = add_context(None, "info", {"event": "idle"})

        assert event == {"event": "idle", **dict.fromkeys(IDS, "-")}

    def test_explicit_keys_win(self, ctx):
        """
        Keys the event has already, passed to the call, bound to the logger or
        merged from structlog's contextvars, are kept.
        """
        capture = structlog.testing.LogCapture()
        log = structlog.wrap_logger(
            None,
            processors=[structlog.contextvars.merge_contextvars, add_context, capture],
        )

        with uc.bind(ctx):
            log.info("call", user_id="admin")
            log.bind(run_id="r-bound").info("bound")
            with structlog.contextvars.bound_contextvars(thread_id="t-merged"):
                log.info("merged")
        add_context(None, "info", explicit := {"request_id": "req-x"})

        call, bound, merged = capture.entries
        assert (call["user_id"], call["run_id"]) == ("admin", "r-1")
        assert (bound["user_id"], bound["run_id"]) == ("u-42", "r-bound")
        assert (merged["thread_id"], merged["request_id"]) == ("t-merged", ctx.request_id)
        assert explicit == {"request_id": "req-x", "user_id": "-", "thread_id": "-", "run_id": "-"}

    async def test_refused_request_has_its_request_id(self):
        """
        While the ASGI middleware resolves and refuses a request, no context
        is bound, but events carry the request id the client gets back; the
        other ids stay "-".
        """
        from usercontext.asgi import UserContextMiddleware

        capture = structlog.testing.LogCapture()
        log = structlog.wrap_logger(None, processors=[add_context, capture])

        def resolver(scope):
            log.warning("bad_token")
            raise uc.UnauthenticatedError

        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        async def app(scope, receive, send):
            raise AssertionError  # never called

        scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
        await UserContextMiddleware(app, resolver=resolver)(scope, receive, send)
        log.info("after")

        request_id = dict(sent[0]["headers"])[b"x-request-id"].decode()
        before, after = capture.entries
        assert [before[key] for key in IDS] == ["-", "-", "-", request_id]
        assert [after[key] for key in IDS] == ["-", "-", "-", "-"]

    def test_no_metadata(self):
        """
        `add_context` adds the four ids and nothing from the metadata.
        """
        with uc.bind(make_ctx(1, metadata={"plan": "pro"})):
            event = add_context(None, "info", {})

        assert set(event) == set(IDS)


class TestAddContext:
    def test_metadata_allowlist(self):
        """
        Allowlisted metadata keys are added; a key the context lacks gets the
        default, and keys not allowlisted are not added.
        """
        processor = AddContext(metadata=("plan", "x-region"), default=None)
        ctx = make_ctx(1, metadata={"plan": "pro", "email": "a@example.com"})

        with uc.bind(ctx):
            bound = processor(None, "info", {"event": "billed"})
        unbound = processor(None, "info", {"event": "idle"})

        assert bound == {
            "event": "billed",
            "user_id": "u-1",
            "thread_id": "t-1",
            "run_id": "r-1",
            "request_id": ctx.request_id,
            "plan": "pro",
            "x-region": None,
        }
        assert unbound == {"event": "idle", **dict.fromkeys((*IDS, "plan", "x-region"))}

    def test_explicit_keys_win(self):
        """
        Keys the event has already are kept, for the ids and for metadata.
        """
        processor = AddContext(metadata=("plan",))

        with uc.bind(make_ctx(1, metadata={"plan": "pro"})):
            event = processor(None, "info", {"plan": "staff", "user_id": "admin"})

        assert (event["plan"], event["user_id"], event["run_id"]) == ("staff", "admin", "r-1")

    def test_no_metadata(self):
        """
        Without an allowlist it adds the four ids only, with its default.
        """
        processor = AddContext(default="?")

        with uc.bind(make_ctx(1, metadata={"plan": "pro"})):
            assert set(processor(None, "info", {})) == set(IDS)
        assert processor(None, "info", {}) == dict.fromkeys(IDS, "?")

    def test_properties_and_repr(self):
        """
        The allowlist keeps its order without repeats, and the repr shows it.
        """
        processor = AddContext(metadata=["tenant", "plan", "tenant"], default=None)

        assert processor.metadata == ("tenant", "plan")
        assert processor.default is None
        assert repr(processor) == (
            "<usercontext.structlog.AddContext(metadata=('tenant', 'plan'), default=None)>"
        )

    @pytest.mark.parametrize(
        ("metadata", "error", "match"),
        [
            ("plan", TypeError, r"takes an iterable of metadata keys.*metadata=\('plan',\)"),
            (None, TypeError, r"takes an iterable of metadata keys.*got a NoneType"),
            ([1.5], TypeError, r"takes metadata keys as str, got a float"),
            ([""], ValueError, r"cannot allowlist '': a key must be a non-empty str"),
            (["user_id"], ValueError, r"'user_id': the event gets user_id"),
            (["parent_request_id"], ValueError, r"it names a field of usercontext.UserContext"),
            (["event"], ValueError, r"'event': every event has its own 'event'"),
            (["exc_info"], ValueError, r"'exc_info': every event has its own"),
            (["exception"], ValueError, r"'exception': every event has its own"),
        ],
    )
    def test_bad_metadata(self, metadata, error, match):
        """
        An allowlist that is not an iterable of str, or that names an id, a
        context field or a key structlog reads, is refused at construction
        with a message that names the argument and the fix.
        """
        with pytest.raises(error, match=match) as exc_info:
            AddContext(metadata=metadata)

        assert str(exc_info.value).startswith("AddContext(metadata=...)")


class TestStructlogConcurrency:
    async def test_tasks(self, capture):
        """
        200 concurrent tasks, each with its own context, log 20 times each
        with checkpoints in between: all 4,000 events carry the ids of the
        task that logged them.
        """
        log, events = capture

        async def request(i):
            ctx = make_ctx(i)
            async with uc.bind(ctx):
                for n in range(LOGS_PER_TASK):
                    log.info("%s %s %d", ctx.user_id, ctx.request_id, n)
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(TASKS):
                tg.start_soon(request, i)

        per_request = check_events(events, TASKS * LOGS_PER_TASK)
        assert len(per_request) == TASKS
        assert set(per_request.values()) == {LOGS_PER_TASK}
        assert switches([e["request_id"] for e in events]) > TASKS * (LOGS_PER_TASK - 1)

    def test_threads(self, capture):
        """
        8 threads, each binding its own context, log 500 times each at the
        same time: all 4,000 events carry the ids of the thread that logged
        them.
        """
        log, events = capture
        barrier = threading.Barrier(THREADS)

        def work(i):
            ctx = make_ctx(i)
            with uc.bind(ctx):
                barrier.wait()
                for n in range(LOGS_PER_THREAD):
                    log.info("%s %s %d", ctx.user_id, ctx.request_id, n)
                    time.sleep(0)

        with uc.ContextExecutor(concurrent.futures.ThreadPoolExecutor(THREADS)) as pool:
            list(pool.map(work, range(THREADS)))

        per_request = check_events(events, THREADS * LOGS_PER_THREAD)
        assert len(per_request) == THREADS
        assert set(per_request.values()) == {LOGS_PER_THREAD}

    @asyncio_only
    async def test_async_methods(self, capture):
        """
        structlog's async methods run the processors in a worker thread; the
        events still carry the ids of the task that logged, for 50
        concurrent tasks. (They need asyncio.)
        """
        log, events = capture

        async def request(i):
            ctx = make_ctx(i)
            async with uc.bind(ctx):
                for n in range(5):
                    await log.ainfo("%s %s %d", ctx.user_id, ctx.request_id, n)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(request, i)

        assert set(check_events(events, 250).values()) == {5}


class TestStructlogThroughLogging:
    @pytest.fixture(name="pipeline")
    def _pipeline(self, request):
        """
        structlog configured to render JSON through a standard library
        handler with `structlog.stdlib.ProcessorFormatter`, the usual
        production setup, and records of plain `logging` loggers through its
        foreign pre-chain.
        """
        name = f"usercontext.tests.{request.node.name}"
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        processor = AddContext(metadata=("plan",))
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(sort_keys=True),
                ],
                foreign_pre_chain=[structlog.stdlib.add_log_level, processor],
            )
        )
        stdlib_logger = logging.getLogger(name)
        stdlib_logger.setLevel(logging.INFO)
        stdlib_logger.propagate = False
        stdlib_logger.addHandler(handler)
        structlog.configure(
            processors=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.PositionalArgumentsFormatter(),
                processor,
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=False,
        )
        yield structlog.get_logger(name), stdlib_logger, stream
        structlog.reset_defaults()
        stdlib_logger.removeHandler(handler)

    async def test_tasks(self, pipeline):
        """
        200 concurrent tasks log through structlog and plain `logging` into
        one handler: every JSON line carries the ids (and the allowlisted
        metadata) of the task that logged it.
        """
        log, stdlib_logger, stream = pipeline

        async def request(i):
            ctx = make_ctx(i, metadata={"plan": f"plan-{i}"})
            async with uc.bind(ctx):
                for n in range(LOGS_PER_TASK // 2):
                    log.info("%s %s %d", ctx.user_id, ctx.request_id, n)
                    await anyio.lowlevel.checkpoint()
                    stdlib_logger.info("%s %s %d", ctx.user_id, ctx.request_id, n)
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(TASKS):
                tg.start_soon(request, i)
        log.info("- - 0")

        events = [json.loads(line) for line in stream.getvalue().splitlines()]
        per_request = check_events(events, TASKS * LOGS_PER_TASK + 1)
        assert per_request.pop("-") == 1
        assert set(per_request.values()) == {LOGS_PER_TASK}
        for event in events:
            i = event["user_id"].removeprefix("u-")
            assert event["plan"] == ("-" if i == "-" else f"plan-{i}")
            assert event["level"] == "info"


def test_structlog_not_shadowed():
    """
    ``usercontext.structlog`` imports the real structlog, not itself.
    """
    import usercontext.stdlib
    import usercontext.structlog

    assert structlog.__name__ == "structlog"
    assert usercontext.structlog.__name__ == "usercontext.structlog"
    assert Path(structlog.__file__).parent != Path(usercontext.structlog.__file__).parent
    assert usercontext.structlog._add_fields is usercontext.stdlib._add_fields

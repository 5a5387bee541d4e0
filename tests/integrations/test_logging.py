"""
Tests of the logging adapters: `usercontext.stdlib.ContextFilter` with real
handlers of the standard library, and `usercontext.structlog` with real
structlog pipelines.

Every record must carry the ids of the context bound where its log call ran,
under concurrency too: each concurrent test puts the ids it expects into the
log message and checks every record against them.

The structlog tests are skipped when structlog is missing.
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import json
import logging
import logging.config
import logging.handlers
import queue
import threading
import time

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import usercontext as uc

from usercontext.stdlib import ContextFilter


try:
    import structlog
    import structlog.testing
except ImportError:
    structlog = None

if structlog is not None:
    from usercontext.structlog import AddContext, add_context

needs_structlog = pytest.mark.skipif(
    structlog is None,
    reason="structlog is not installed: pip install usercontext[structlog]",
)
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

IDS = ("user_id", "thread_id", "run_id", "request_id")
TASKS, LOGS_PER_TASK = 200, 20
THREADS, LOGS_PER_THREAD = 8, 500


class ListHandler(logging.Handler):
    """
    A handler that keeps each record it handles, and its formatted line.
    """

    def __init__(self, fmt="%(user_id)s %(request_id)s | %(message)s"):
        super().__init__()
        self.setFormatter(logging.Formatter(fmt))
        self.records = []
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))
        self.records.append(record)


def make_ctx(i, **kw):
    return uc.UserContext(user_id=f"u-{i}", thread_id=f"t-{i}", run_id=f"r-{i}", **kw)


def check_records(handler, expected_total):
    """
    Check that each record of *handler* carries the user and request ids its
    message names (the ids of the context its log call ran in), in its
    attributes and in its formatted line, and return the records per request.
    """
    assert len(handler.records) == expected_total
    per_request = {}
    for record, line in zip(handler.records, handler.lines, strict=True):
        user_id, request_id, _n = record.getMessage().split()
        assert (record.user_id, record.request_id) == (user_id, request_id)
        assert line == f"{user_id} {request_id} | {record.getMessage()}"
        if user_id != "-":
            i = user_id.removeprefix("u-")
            assert (record.thread_id, record.run_id) == (f"t-{i}", f"r-{i}")
        per_request[request_id] = per_request.get(request_id, 0) + 1
    return per_request


def switches(ids):
    """
    How often consecutive entries of *ids* differ: how interleaved they are.
    """
    return sum(a != b for a, b in itertools.pairwise(ids))


@pytest.fixture(name="handler")
def _handler():
    """
    A handler collecting records, with a `ContextFilter`.
    """
    handler = ListHandler()
    handler.addFilter(ContextFilter())
    return handler


@pytest.fixture(name="logger")
def _logger(request, handler):
    """
    A logger of this test alone that logs everything to *handler* only.
    """
    logger = logging.getLogger(f"usercontext.tests.{request.node.name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    yield logger
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for f in list(logger.filters):
        logger.removeFilter(f)


class TestContextFilter:
    def test_ids_of_bound_context(self, logger, handler, ctx):
        """
        A record logged while a context is bound carries its four ids, which
        a format string can name.
        """
        with uc.bind(ctx):
            logger.info("hello")

        [record] = handler.records
        assert [getattr(record, key) for key in IDS] == [
            "u-42",
            "t-7",
            "r-1",
            ctx.request_id,
        ]
        assert handler.lines == [f"u-42 {ctx.request_id} | hello"]

    def test_child_context(self, logger, handler, ctx):
        """
        A child context's ids are the ones a record gets, not its parent's.
        """
        sub = ctx.child(run_id="r-1.tool")
        with uc.bind(ctx), uc.bind(sub):
            logger.info("in the tool")

        [record] = handler.records
        assert (record.run_id, record.request_id) == ("r-1.tool", sub.request_id)

    def test_default_without_context(self, logger, handler):
        """
        Without a bound context each id is "-".
        """
        logger.warning("outside")

        [record] = handler.records
        assert [getattr(record, key) for key in IDS] == ["-"] * 4
        assert handler.lines == ["- - | outside"]

    @pytest.mark.parametrize("default", ["", "n/a", None])
    def test_configurable_default(self, logger, handler, default):
        """
        *default* is the value of each id, and of each allowlisted key, when
        no context is bound.
        """
        handler.filters.clear()
        handler.addFilter(ContextFilter(metadata=("plan",), default=default))

        logger.warning("outside")

        [record] = handler.records
        assert [getattr(record, key) for key in (*IDS, "plan")] == [default] * 5

    def test_metadata_allowlist(self, logger, handler):
        """
        Allowlisted metadata keys become attributes; a key the context lacks
        gets the default, and keys not allowlisted are not added.
        """
        handler.filters.clear()
        handler.addFilter(ContextFilter(metadata=("plan", "tenant", "region")))
        handler.setFormatter(logging.Formatter("%(plan)s %(tenant)s %(region)s %(message)s"))
        ctx = make_ctx(1, metadata={"plan": "pro", "tenant": "acme", "email": "a@example.com"})

        with uc.bind(ctx):
            logger.info("billed")
        logger.info("idle")

        bound, unbound = handler.records
        assert (bound.plan, bound.tenant, bound.region) == ("pro", "acme", "-")
        assert (unbound.plan, unbound.tenant, unbound.region) == ("-", "-", "-")
        assert not hasattr(bound, "email")
        assert handler.lines == ["pro acme - billed", "- - - idle"]

    def test_no_metadata_by_default(self, logger, handler):
        """
        Without an allowlist no metadata reaches the record.
        """
        with uc.bind(make_ctx(1, metadata={"plan": "pro"})):
            logger.info("billed")

        [record] = handler.records
        assert not hasattr(record, "plan")

    def test_existing_attributes_kept(self, logger, handler, ctx):
        """
        Attributes a record has already (from ``extra=``) are kept, for the
        ids and for allowlisted metadata.
        """
        handler.filters.clear()
        handler.addFilter(ContextFilter(metadata=("plan",)))

        with uc.bind(make_ctx(1, metadata={"plan": "pro"})):
            logger.info("as admin", extra={"user_id": "admin", "plan": "staff"})

        [record] = handler.records
        assert (record.user_id, record.plan, record.run_id) == ("admin", "staff", "r-1")

    def test_second_filter_keeps_first_values(self, logger, handler, ctx):
        """
        A record that meets a second filter (say, on a queue listener's
        handler, where no context is bound) keeps the ids the first one gave.
        """
        first = ContextFilter()
        record = logger.makeRecord(logger.name, logging.INFO, "f", 1, "m", (), None)
        with uc.bind(ctx):
            assert first.filter(record) is True

        logger.handle(record)

        [handled] = handler.records
        assert (handled.user_id, handled.request_id) == ("u-42", ctx.request_id)

    def test_never_drops(self, logger, handler):
        """
        Every record passes, at every level, with or without a context.
        """
        flt = ContextFilter()
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 60):
            logger.log(level, "x")
            record = logging.LogRecord("any", level, "f", 1, "x", (), None)
            assert flt.filter(record) is True

        assert len(handler.records) == 5

    def test_handler_sees_child_loggers(self, request, ctx):
        """
        A filter on a handler sees the records of child loggers; one on the
        parent logger does not, which is why the docs say to attach it to
        handlers.
        """
        parent = logging.getLogger(f"usercontext.tests.{request.node.name}")
        child = parent.getChild("db")
        parent.propagate = False
        on_handler = ListHandler()
        on_handler.addFilter(ContextFilter())
        on_logger = ListHandler("%(message)s")
        parent.addHandler(on_handler)
        try:
            with uc.bind(ctx):
                child.warning("from the child")
            parent.removeHandler(on_handler)
            parent.addFilter(ContextFilter())
            parent.addHandler(on_logger)
            with uc.bind(ctx):
                child.warning("from the child")
                parent.warning("from the parent")
        finally:
            parent.removeHandler(on_handler)
            parent.removeHandler(on_logger)
            parent.filters.clear()

        assert [r.user_id for r in on_handler.records] == ["u-42"]
        from_child, from_parent = on_logger.records
        assert not hasattr(from_child, "user_id")
        assert from_parent.user_id == "u-42"

    def test_exception_records(self, logger, handler, ctx):
        """
        Records with exception information carry the ids too.
        """
        with uc.bind(ctx):
            try:
                raise RuntimeError("boom")  # noqa: TRY301  # a real traceback
            except RuntimeError:
                logger.exception("failed")

        [record] = handler.records
        assert record.user_id == "u-42"
        assert "RuntimeError: boom" in handler.lines[0]

    def test_metadata_property_and_duplicates(self):
        """
        The allowlist accepts any iterable of keys, keeps their order and drops
        repeats.
        """
        flt = ContextFilter(metadata=(key for key in ["tenant", "plan", "tenant"]), default=0)

        assert flt.metadata == ("tenant", "plan")
        assert flt.default == 0
        assert ContextFilter(metadata=["plan"]).metadata == ("plan",)
        assert ContextFilter().metadata == ()

    def test_repr(self):
        """
        The repr shows the allowlist and the default.
        """
        assert repr(ContextFilter(metadata=("plan",))) == (
            "<usercontext.stdlib.ContextFilter(metadata=('plan',), default='-')>"
        )

    def test_is_a_logging_filter(self):
        """
        It is a `logging.Filter`, accepted wherever one is.
        """
        assert isinstance(ContextFilter(), logging.Filter)

    @pytest.mark.parametrize(
        ("metadata", "error", "match"),
        [
            ("plan", TypeError, r"metadata=\.\.\.\) takes an iterable.*metadata=\('plan',\)"),
            (b"plan", TypeError, r"takes an iterable of metadata keys.*got a bytes"),
            (3, TypeError, r"takes an iterable of metadata keys, such as.*got a int \(3\)"),
            (None, TypeError, r"takes an iterable of metadata keys.*got a NoneType"),
            ([1], TypeError, r"takes metadata keys as str, got a int \(1\)"),
            (["x-plan"], ValueError, r"cannot allowlist 'x-plan': a key must be a Python ident"),
            ([""], ValueError, r"cannot allowlist '': a key must be a Python identifier"),
            (["user_id"], ValueError, r"'user_id': the log record gets user_id.*Leave it out"),
            (["request_id"], ValueError, r"'request_id': the log record gets"),
            (["depth"], ValueError, r"'depth': it names a field of usercontext.UserContext"),
            (["metadata"], ValueError, r"'metadata': it names a field"),
            (["msg"], ValueError, r"'msg': every log record has its own 'msg'.*'ctx_msg'"),
            (["name"], ValueError, r"'name': every log record has its own"),
            (["args"], ValueError, r"'args': every log record has its own"),
            (["levelname"], ValueError, r"'levelname': every log record has its own"),
            (["message"], ValueError, r"'message': every log record has its own"),
            (["asctime"], ValueError, r"'asctime': every log record has its own"),
            (["taskName"], ValueError, r"'taskName': every log record has its own"),
            (["getMessage"], ValueError, r"'getMessage': every log record has its own"),
            (["__dict__"], ValueError, r"'__dict__'.*such as 'ctx_dict'"),
        ],
    )
    def test_bad_metadata(self, metadata, error, match):
        """
        An allowlist that is not an iterable of identifiers, or that names a
        record attribute, an id or a context field, is refused at construction
        with a message that names the argument and the fix.
        """
        with pytest.raises(error, match=match) as exc_info:
            ContextFilter(metadata=metadata)

        assert str(exc_info.value).startswith("ContextFilter(metadata=...)")

    def test_keyword_only(self):
        """
        The arguments are keyword-only: a positional one (the logger name of
        a plain `logging.Filter`) is refused.
        """
        with pytest.raises(TypeError):
            ContextFilter("app")


class TestContextFilterConcurrency:
    async def test_tasks(self, logger, handler):
        """
        200 concurrent tasks, each with its own context, log 20 times each
        with checkpoints in between: all 4,000 records carry the ids of the
        task that logged them, although the tasks interleave.
        """

        async def request(i):
            ctx = make_ctx(i)
            async with uc.bind(ctx):
                for n in range(LOGS_PER_TASK):
                    logger.info("%s %s %d", ctx.user_id, ctx.request_id, n)
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(TASKS):
                tg.start_soon(request, i)

        per_request = check_records(handler, TASKS * LOGS_PER_TASK)
        assert len(per_request) == TASKS
        assert set(per_request.values()) == {LOGS_PER_TASK}
        assert len({r.user_id for r in handler.records}) == TASKS
        assert switches([r.request_id for r in handler.records]) > TASKS * (LOGS_PER_TASK - 1)

    async def test_task_groups_inherit(self, logger, handler):
        """
        Tasks started inside a request inherit its context, also after the
        request's block has ended, and their records carry its ids; a task
        started outside any request logs "-".
        """
        ctx = make_ctx(42)

        async def log(user_id, request_id, n):
            await anyio.lowlevel.checkpoint()
            logger.info("%s %s %d", user_id, request_id, n)

        async with anyio.create_task_group() as tg:
            tg.start_soon(log, "-", "-", 0)
            async with uc.bind(ctx):
                for n in range(1, 10):
                    tg.start_soon(log, ctx.user_id, ctx.request_id, n)

        per_request = check_records(handler, 10)
        assert per_request == {ctx.request_id: 9, "-": 1}

    async def test_to_thread(self, logger, handler):
        """
        Work sent to a thread with `usercontext.to_thread` logs with the ids of
        the request that sent it, for 20 concurrent requests.
        """

        async def request(i):
            ctx = make_ctx(i)
            async with uc.bind(ctx):
                for n in range(5):
                    await uc.to_thread(logger.info, "%s %s %d", ctx.user_id, ctx.request_id, n)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(request, i)

        assert set(check_records(handler, 100).values()) == {5}

    def test_threads(self, logger, handler):
        """
        8 threads, each binding its own context, log 500 times each at the
        same time: all 4,000 records carry the ids of the thread that logged
        them.
        """
        barrier = threading.Barrier(THREADS)

        def work(i):
            ctx = make_ctx(i)
            with uc.bind(ctx):
                barrier.wait()
                for n in range(LOGS_PER_THREAD):
                    logger.info("%s %s %d", ctx.user_id, ctx.request_id, n)
                    time.sleep(0)
            return ctx.request_id

        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            request_ids = set(pool.map(work, range(THREADS)))

        per_request = check_records(handler, THREADS * LOGS_PER_THREAD)
        assert set(per_request) == request_ids
        assert set(per_request.values()) == {LOGS_PER_THREAD}

    def test_context_executor(self, logger, handler):
        """
        Through a `usercontext.ContextExecutor` with 8 threads, each of 4,000
        tasks logs with the ids of the request that submitted it, never those
        of the task its thread ran before; tasks submitted outside any request
        log "-".
        """
        contexts = [make_ctx(i) for i in range(THREADS)]

        def log(user_id, request_id, n):
            logger.info("%s %s %d", user_id, request_id, n)

        with uc.ContextExecutor(concurrent.futures.ThreadPoolExecutor(THREADS)) as pool:
            futures = []
            for n in range(LOGS_PER_THREAD):
                for ctx in contexts:
                    with uc.bind(ctx):
                        futures.append(pool.submit(log, ctx.user_id, ctx.request_id, n))
                futures.append(pool.submit(log, "-", "-", n))
            for future in futures:
                future.result()

        per_request = check_records(handler, (THREADS + 1) * LOGS_PER_THREAD)
        assert per_request == dict.fromkeys(
            [*(ctx.request_id for ctx in contexts), "-"], LOGS_PER_THREAD
        )

    def test_queue_handler(self, logger, handler):
        """
        With the filter on a `QueueHandler`, records carry the ids of the
        thread that logged them to the listener's thread, whose own
        `ContextFilter` (where no context is bound) keeps them; a filter only
        on the listener's handler would give "-".
        """
        logger.removeHandler(handler)
        records = queue.SimpleQueue()
        queue_handler = logging.handlers.QueueHandler(records)
        queue_handler.addFilter(ContextFilter())
        logger.addHandler(queue_handler)
        listener_only = ListHandler()
        listener_only.addFilter(ContextFilter())
        listener = logging.handlers.QueueListener(records, handler)
        barrier = threading.Barrier(THREADS)

        def work(i):
            ctx = make_ctx(i)
            with uc.bind(ctx):
                barrier.wait()
                for n in range(50):
                    logger.info("%s %s %d", ctx.user_id, ctx.request_id, n)
                    time.sleep(0)

        listener.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(work, range(THREADS)))
        finally:
            listener.stop()

        per_request = check_records(handler, THREADS * 50)
        assert set(per_request.values()) == {50}

        records.put(logging.makeLogRecord({"msg": "u-1 req-1 0"}))
        listener = logging.handlers.QueueListener(records, listener_only)
        listener.start()
        listener.stop()
        [record] = listener_only.records
        assert (record.user_id, record.request_id) == ("-", "-")


class TestDictConfig:
    @pytest.fixture(name="configured")
    def _configured(self, request):
        """
        Configure a logger of this test with `logging.config.dictConfig`,
        wiring the filter by its dotted path, and return it with its handler.
        """
        name = f"usercontext.tests.{request.node.name}"
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "filters": {
                    "usercontext": {
                        "()": "usercontext.stdlib.ContextFilter",
                        "metadata": ["plan"],
                        "default": "none",
                    },
                },
                "formatters": {
                    "ids": {"format": "%(levelname)s %(user_id)s %(plan)s %(message)s"},
                },
                "handlers": {
                    "console": {
                        "class": "logging.StreamHandler",
                        "filters": ["usercontext"],
                        "formatter": "ids",
                    },
                },
                "loggers": {
                    name: {"level": "INFO", "handlers": ["console"], "propagate": False},
                },
            }
        )
        logger = logging.getLogger(name)
        [handler] = logger.handlers
        handler.setStream(io.StringIO())
        yield logger, handler
        logger.removeHandler(handler)

    def test_dotted_path(self, configured):
        """
        A filter configured by its dotted path, with an allowlist and a
        default from the configuration, adds the ids to the handler's lines.
        """
        logger, handler = configured
        [flt] = handler.filters

        with uc.bind(make_ctx(1, metadata={"plan": "pro"})):
            logger.info("billed")
        logger.warning("idle")

        assert isinstance(flt, ContextFilter)
        assert flt.metadata == ("plan",)
        assert handler.stream.getvalue().splitlines() == [
            "INFO u-1 pro billed",
            "WARNING none none idle",
        ]

    def test_bad_configuration(self):
        """
        A bad allowlist in the configuration fails `dictConfig`, with our
        message as the cause.
        """
        config = {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"usercontext": {"()": ContextFilter, "metadata": ["msg"]}},
        }

        with pytest.raises(ValueError, match="Unable to configure filter 'usercontext'") as e:
            logging.config.dictConfig(config)

        assert "cannot allowlist 'msg'" in str(e.value.__cause__)


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


@needs_structlog
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


@needs_structlog
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


@needs_structlog
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


@needs_structlog
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


@needs_structlog
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

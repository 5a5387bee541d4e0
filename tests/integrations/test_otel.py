"""
usercontext.otel's spans and baggage, with the real OpenTelemetry SDK and its
in-memory span exporter.
"""

from __future__ import annotations

import importlib
import sys
import threading

import anyio
import pytest


pytest.importorskip("opentelemetry.sdk", reason="usercontext.otel's tests need the SDK")

import anyio.lowlevel

from opentelemetry import baggage, context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import usercontext as uc
import usercontext.otel

from usercontext._otel_baggage import MAX_MEMBER_BYTES
from usercontext.otel import (
    UserContextSpanProcessor,
    baggage_context,
    extract_baggage,
    inject_baggage,
)

from helpers import make_ctx


@pytest.fixture(name="traced")
def _traced():
    """
    A tracer whose provider runs a `UserContextSpanProcessor` allowlisting
    ``plan``, and the exporter that gets its finished spans.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(UserContextSpanProcessor(metadata=("plan",)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("tests"), exporter
    provider.shutdown()


def by_name(exporter):
    """
    The finished spans of *exporter*, by name (each name used once).
    """
    spans = {span.name: dict(span.attributes or {}) for span in exporter.get_finished_spans()}
    assert len(spans) == len(exporter.get_finished_spans())
    return spans


class TestSpanProcessor:
    def test_ids_and_allowlisted_metadata(self, traced):
        """
        A span started while a context is bound gets its ids, depth and the
        allowlisted metadata, and nothing else of the metadata; a span
        started with none bound gets no usercontext attribute.
        """
        tracer, exporter = traced
        root = uc.UserContext(
            user_id="u-1",
            thread_id="t-1",
            run_id="r-1",
            request_id="req-1",
            connection_id="conn-1",
            metadata={"plan": "pro", "email": "a@example.com"},
        )
        child = root.child(run_id="r-1.tool")
        with uc.bind(root), tracer.start_as_current_span("root"):
            pass
        with uc.bind(child), tracer.start_as_current_span("child"):
            pass
        with tracer.start_as_current_span("unbound"):
            pass

        spans = by_name(exporter)
        assert spans["root"] == {
            "enduser.id": "u-1",
            "usercontext.thread_id": "t-1",
            "usercontext.run_id": "r-1",
            "usercontext.request_id": "req-1",
            "usercontext.depth": 0,
            "usercontext.connection_id": "conn-1",
            "usercontext.metadata.plan": "pro",
        }
        assert spans["child"]["usercontext.parent_request_id"] == "req-1"
        assert spans["child"]["usercontext.depth"] == 1
        assert spans["child"]["usercontext.run_id"] == "r-1.tool"
        assert spans["child"]["usercontext.request_id"] == child.request_id != "req-1"
        assert spans["unbound"] == {}

    def test_span_attributes_set_by_the_code_win(self, traced):
        """
        The processor runs when the span starts: attributes the code sets
        afterwards replace its values, and the others stay.
        """
        tracer, exporter = traced
        with uc.bind(make_ctx(1)), tracer.start_as_current_span("s") as span:
            span.set_attribute("usercontext.run_id", "overridden")
        spans = by_name(exporter)
        assert spans["s"]["usercontext.run_id"] == "overridden"
        assert spans["s"]["enduser.id"] == "u-1"

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (3, 3),
            (2.5, 2.5),
            (True, True),
            (("a", "b"), ("a", "b")),
            ((1, 2), (1, 2)),
            ((1, "b"), '[1, "b"]'),
            ((), "[]"),
            ({"tier": "gold", "seats": 3}, '{"seats": 3, "tier": "gold"}'),
            (None, "null"),
            (b"\x00", "\"b'\\\\x00'\""),
        ],
    )
    def test_metadata_values(self, value, expected):
        """
        Metadata values that OpenTelemetry takes are set as they are; the
        others as JSON text (bytes by their repr).
        """
        processor = UserContextSpanProcessor(metadata=["plan"])
        ctx = make_ctx(1, metadata={"plan": value})
        assert processor.attributes(ctx)["usercontext.metadata.plan"] == expected

    def test_no_allowlist(self):
        """
        Without an allowlist, no metadata reaches a span, whatever the
        context holds.
        """
        attributes = UserContextSpanProcessor().attributes(make_ctx(1, metadata={"plan": "pro"}))
        assert sorted(attributes) == [
            "enduser.id",
            "usercontext.depth",
            "usercontext.request_id",
            "usercontext.run_id",
            "usercontext.thread_id",
        ]

    def test_allowlisted_key_missing(self):
        """
        An allowlisted key the context lacks gives no attribute.
        """
        processor = UserContextSpanProcessor(metadata=("plan", "tier"))
        attributes = processor.attributes(make_ctx(1, metadata={"tier": "gold"}))
        assert "usercontext.metadata.plan" not in attributes
        assert attributes["usercontext.metadata.tier"] == "gold"
        assert processor.metadata == ("plan", "tier")
        assert repr(processor) == (
            "<usercontext.otel.UserContextSpanProcessor(metadata=('plan', 'tier'))>"
        )

    @pytest.mark.parametrize(
        ("metadata", "error", "match"),
        [
            ("plan", TypeError, r"Wrap a single key in a tuple: metadata=\('plan',\)"),
            ([1], TypeError, "takes metadata keys as str"),
            ([""], ValueError, "a key must be a non-empty str"),
            (["user_id"], ValueError, "the span gets user_id, thread_id, run_id, request_id"),
            (["depth"], ValueError, "it names a field of usercontext.UserContext"),
        ],
    )
    def test_bad_allowlist(self, metadata, error, match):
        """
        A bad allowlist is refused with an error naming the key and the fix.
        """
        with pytest.raises(error, match=match):
            UserContextSpanProcessor(metadata=metadata)

    async def test_tasks_threads_and_many_users(self, traced, anyio_backend):
        """
        200 requests of 50 users run at once, each starting spans in its own
        task, in a child task of a task group and in a worker thread
        (`usercontext.to_thread`); all 600 spans carry the ids of the request
        that started them, and none those of another.
        """
        tracer, exporter = traced

        def in_thread(name):
            with tracer.start_as_current_span(name):
                pass

        async def request(i):
            ctx = make_ctx(i % 50, request_id=f"req-{i}", metadata={"plan": f"p{i}"})
            async with uc.bind(ctx):
                with tracer.start_as_current_span(f"{i}/task"):
                    await anyio.lowlevel.checkpoint()
                async with anyio.create_task_group() as tg:

                    async def child():
                        await anyio.lowlevel.checkpoint()
                        with tracer.start_as_current_span(f"{i}/child"):
                            await anyio.lowlevel.checkpoint()

                    tg.start_soon(child)
                await uc.to_thread(in_thread, f"{i}/thread")

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(request, i)

        spans = by_name(exporter)
        assert len(spans) == 600
        wrong = [
            name
            for name, attributes in spans.items()
            if attributes["usercontext.request_id"] != f"req-{name.split('/')[0]}"
            or attributes["enduser.id"] != f"u-{int(name.split('/')[0]) % 50}"
            or attributes["usercontext.metadata.plan"] != f"p{name.split('/')[0]}"
        ]
        assert wrong == []

    def test_threads_of_many_users(self, traced):
        """
        20 threads, one user each, start 50 spans each at once: every span
        has its own thread's user.
        """
        tracer, exporter = traced
        barrier = threading.Barrier(20)

        def work(i):
            with uc.bind(make_ctx(i)):
                barrier.wait()
                for n in range(50):
                    with tracer.start_as_current_span(f"{i}/{n}"):
                        pass

        threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        spans = by_name(exporter)
        assert len(spans) == 1_000
        assert all(a["enduser.id"] == f"u-{name.split('/')[0]}" for name, a in spans.items())

    def test_without_the_sdk(self, monkeypatch):
        """
        Without the SDK, usercontext.otel imports, its baggage and metrics
        work, and making the processor raises an ImportError that says what
        to install, with the SDK's own import error as its cause.
        """
        import usercontext._otel_spans as spans

        try:
            monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
            importlib.reload(spans)
            module = importlib.reload(usercontext.otel)
            assert callable(module.instrument)
            assert module.extract_baggage({}, trusted=True) is None
            with pytest.raises(ImportError, match="pip install opentelemetry-sdk") as info:
                module.UserContextSpanProcessor()
            assert isinstance(info.value.__cause__, ModuleNotFoundError)
        finally:
            monkeypatch.undo()
            importlib.reload(spans)
            importlib.reload(usercontext.otel)
        assert isinstance(usercontext.otel.UserContextSpanProcessor(), SpanProcessor)


class TestInjectBaggage:
    def test_round_trip(self):
        """
        A context injected as baggage comes back equal, field by field,
        through extract_baggage, with the allowlisted metadata only; the
        carrier's other members are kept.
        """
        ctx = make_ctx(
            1,
            request_id="req 1/ü",
            connection_id="c-1",
            metadata={"plan": "pro", "limits": {"rpm": 5}, "secret": "s3cr3t"},
        ).child()
        outer = baggage.set_baggage("tenant", "acme")
        carrier = {}
        inject_baggage(carrier, ctx, metadata=("plan", "limits", "absent"), context=outer)

        assert carrier["baggage"].startswith("tenant=acme,usercontext.user_id=u-1,")
        assert "s3cr3t" not in carrier["baggage"]
        got = extract_baggage(carrier, trusted=True)
        assert got is not None
        assert got.to_dict() == {
            **ctx.to_dict(),
            "metadata": {"plan": "pro", "limits": {"rpm": 5}},
        }

    def test_bound_context_and_stale_members(self, ctx, other_ctx):
        """
        Without a context argument, the bound one travels, replacing the
        usercontext members the OpenTelemetry context had (another user's
        included) and keeping the others.
        """
        stale = baggage_context(other_ctx, context=baggage.set_baggage("k", "v"))
        stale = baggage.set_baggage("UserContext.extra", "x", stale)
        with uc.bind(ctx):
            fresh = baggage_context(context=stale)
        members = baggage.get_all(fresh)
        assert members["usercontext.user_id"] == "u-42"
        assert members["k"] == "v"
        assert "UserContext.extra" not in members
        assert "usercontext.metadata" not in members
        with pytest.raises(uc.NoContextError):
            baggage_context()

    def test_current_opentelemetry_context(self, ctx):
        """
        By default the members join the current OpenTelemetry context's
        baggage, which instrumented clients send once attached.
        """
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            attached = context.attach(baggage_context(ctx))
            try:
                carrier = {}
                W3CBaggagePropagator().inject(carrier)
            finally:
                context.detach(attached)
        finally:
            context.detach(token)
        assert carrier["baggage"].split(",")[:2] == ["tenant=acme", "usercontext.user_id=u-42"]
        assert extract_baggage(carrier, trusted=True) == ctx

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"metadata": "plan"}, TypeError, "baggage_context"),
            ({"metadata": ["user_id"]}, ValueError, "the baggage gets user_id"),
            ({"ctx": "u-1"}, TypeError, "takes a usercontext.UserContext, got a str"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        """
        Bad arguments are refused with an error that names them.
        """
        with pytest.raises(error, match=match):
            inject_baggage({}, **kwargs)

    def test_metadata_not_json(self):
        """
        Allowlisted metadata that is not JSON is refused, naming the field.
        """
        ctx = make_ctx(1, metadata={"raw": b"\x00"})
        with pytest.raises(uc.InvalidContextError, match="cannot travel in baggage") as info:
            inject_baggage({}, ctx, metadata=("raw",))
        assert info.value.field == "metadata"

    def test_size_limits(self):
        """
        A member over W3C's 4096 bytes, or members over 8 KiB together, are
        refused at injection with an error naming the field, rather than
        dropped by the propagator.
        """
        big = make_ctx(1, metadata={"a": "x" * MAX_MEMBER_BYTES})
        with pytest.raises(uc.InvalidContextError, match=r"usercontext.metadata would take") as e:
            inject_baggage({}, big, metadata=("a",))
        assert e.value.field == "metadata"
        assert e.value.reason == "too large"

        uc.configure(id_rules=uc.IdRules(max_length=4000))
        wide = uc.UserContext(
            user_id="u" * 3000, thread_id="t" * 3000, run_id="r" * 3000, request_id="q-1"
        )
        with pytest.raises(uc.InvalidContextError, match="over the limit of 8192") as e:
            inject_baggage({}, wide)
        assert e.value.field == "baggage"


VALID = "usercontext.user_id=u-1,usercontext.thread_id=t-1,usercontext.run_id=r-1"


class TestExtractBaggage:
    def test_trust_is_explicit(self):
        """
        Extraction takes trusted=True only: False is refused with a pointer to
        the edge rule, a non-bool is a TypeError, and no default exists.
        """
        carrier = {"baggage": VALID}
        with pytest.raises(ValueError, match="strip_context_headers"):
            extract_baggage(carrier, trusted=False)
        with pytest.raises(TypeError, match="takes True or False, got 1"):
            extract_baggage(carrier, trusted=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="trusted"):
            extract_baggage(carrier)  # type: ignore[call-arg]

    def test_no_members(self):
        """
        No baggage header, or one without usercontext members, gives None.
        """
        assert extract_baggage({}, trusted=True) is None
        assert extract_baggage({"baggage": "tenant=acme, k=v;p=1"}, trusted=True) is None

    def test_header_details(self):
        """
        Whitespace, properties, '+' for space and several baggage headers
        are read as W3C Baggage and OpenTelemetry write them.
        """
        carrier = {
            "baggage": [
                " usercontext.user_id = u-1 ;prop=1, tenant=acme",
                "usercontext.thread_id=t%2F1,usercontext.run_id=r+1,usercontext.depth=0",
            ]
        }
        got = extract_baggage(carrier, trusted=True)
        assert got is not None
        assert (got.user_id, got.thread_id, got.run_id) == ("u-1", "t/1", "r 1")

    def test_edge_rule_removes_everything(self):
        """
        What strip_context_headers leaves of a baggage header carries no
        context.
        """
        headers = uc.strip_context_headers([(b"baggage", f"{VALID},tenant=acme".encode())])
        carrier = {name.decode(): value.decode() for name, value in headers}
        assert carrier == {"baggage": "tenant=acme"}
        assert extract_baggage(carrier, trusted=True) is None

    @pytest.mark.parametrize(
        ("header", "field", "match"),
        [
            ("usercontext.thread_id=t-1,usercontext.run_id=r-1", "user_id", "it is missing"),
            (f"{VALID},usercontext.user_id=u-2", "user_id", "it appears twice"),
            (f"{VALID},usercontext.admin=1", "admin", "not a member the library writes"),
            (f"{VALID},usercontext.User_Id=u-2", "User_Id", "not a member the library writes"),
            (f"{VALID},usercontext.depth", "depth", "it has no value"),
            (f"{VALID},usercontext.depth=-1", "depth", "is not a small decimal integer"),
            (f"{VALID},usercontext.depth=99999", "depth", "is not a small decimal integer"),
            (f"{VALID},usercontext.created_at=soon", "created_at", "is not a number"),
            (f"{VALID},usercontext.metadata=%5B1%5D", "metadata", "is not a JSON object"),
            (f"{VALID},usercontext.metadata={{", "metadata", "is not valid JSON"),
            (f"{VALID},usercontext.request_id=%FF", "request_id", "not percent-encoded UTF-8"),
            (
                "usercontext.user_id=u%0A1,usercontext.thread_id=t-1,usercontext.run_id=r-1",
                "user_id",
                "printable characters",
            ),
            (
                "usercontext.user_id=null,usercontext.thread_id=t-1,usercontext.run_id=r-1",
                "user_id",
                "placeholder",
            ),
            (f"{VALID},usercontext.depth=1", "depth", "parent_request_id"),
            (
                f"{VALID},usercontext.metadata=%7B%22user_id%22%3A1%7D",
                "metadata key",
                "it names a UserContext field",
            ),
        ],
    )
    def test_bad_members_refused(self, header, field, match):
        """
        A bad usercontext member is refused with an InvalidContextError whose
        field names it, and whose message names the member.
        """
        with pytest.raises(uc.InvalidContextError, match=match) as info:
            extract_baggage({"baggage": header}, trusted=True)
        assert info.value.field == field
        member = field.partition("[")[0].partition(" ")[0]
        assert f"baggage member usercontext.{member}:" in str(info.value)

    def test_oversized_members_refused(self):
        """
        usercontext members over 8 KiB in all are refused before any is
        decoded.
        """
        header = f"{VALID},usercontext.metadata={'x' * 9000}"
        with pytest.raises(uc.InvalidContextError, match="exceed 8192 bytes") as info:
            extract_baggage({"baggage": header}, trusted=True)
        assert info.value.field == "baggage"

    def test_custom_getter(self, ctx):
        """
        A getter reads carriers that are not dicts, as in OpenTelemetry's
        propagators: here ASGI's list of byte pairs; a getter that returns
        the header as one str, not a list, is read too.
        """

        class AsgiGetter:
            def get(self, carrier, key):
                return [v.decode() for k, v in carrier if k.decode() == key] or None

            def keys(self, carrier):
                return [k.decode() for k, _ in carrier]

        class StrGetter:
            def get(self, carrier, key):
                return carrier.get(key)

            def keys(self, carrier):
                return list(carrier)

        carrier = {}
        inject_baggage(carrier, ctx)
        assert extract_baggage(carrier, trusted=True, getter=StrGetter()) == ctx
        asgi = [(b"baggage", carrier["baggage"].encode()), (b"accept", b"*/*")]
        assert extract_baggage(asgi, trusted=True, getter=AsgiGetter()) == ctx
        assert extract_baggage([], trusted=True, getter=AsgiGetter()) is None

"""
usercontext.otel across two real services: an edge service and an internal
one, each served by uvicorn on its own port, tracing into one real SDK
tracer provider, the context carried between them as W3C Baggage over HTTP.
"""

from __future__ import annotations

import contextlib
import threading
import time

from typing import TYPE_CHECKING

import anyio
import pytest


pytest.importorskip("opentelemetry.sdk", reason="usercontext.otel's tests need the SDK")
pytest.importorskip("starlette", reason="starlette is not installed: pip install starlette")
pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")

import httpx2

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import usercontext as uc

from usercontext.asgi import UserContextMiddleware
from usercontext.otel import UserContextSpanProcessor, extract_baggage, inject_baggage


if TYPE_CHECKING:
    from starlette.requests import Request


pytestmark = pytest.mark.server("uvicorn")

TIMEOUT = 30.0  # a bound on every wait: the tests never hang
USERS = 20
PER_USER = 10


class Served:
    """
    *app* served by uvicorn (asyncio, h11) on a free port of 127.0.0.1 in a
    background thread, for a ``with`` block.
    """

    def __init__(self, app):
        import uvicorn

        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="on", log_config=None, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        (sock,) = self.server.servers[0].sockets
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]  # noqa: UP031  # one number
        return self

    def __exit__(self, *exc_info):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


class Edge:
    """
    The edge rule as a pure ASGI wrapper: clients' usercontext headers and
    baggage members are dropped before anything reads them.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "headers": uc.strip_context_headers(scope["headers"])}
        await self.app(scope, receive, send)


def headers_of(scope):
    headers = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
    return headers


@pytest.fixture(name="services", scope="module")
def _services():
    """
    The tracer's exporter and the URL of the edge service, whose ``/work``
    calls the internal service's ``/inner`` with the context as baggage.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(UserContextSpanProcessor(metadata=("plan",)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("services")

    def resolve_inner(scope):
        sent = extract_baggage(headers_of(scope), trusted=True)
        if sent is None:
            raise uc.UnauthenticatedError("Call with the caller's context as baggage.")
        return sent.child()

    async def inner(request: Request) -> JSONResponse:
        with tracer.start_as_current_span("inner"):
            await anyio.sleep(0.001)
            ctx = uc.current()
            return JSONResponse({"user": ctx.user_id, "parent": ctx.parent_request_id})

    internal = Starlette(routes=[Route("/inner", inner)])
    internal.add_middleware(UserContextMiddleware, resolver=resolve_inner)

    def resolve_edge(scope):
        token = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not token.startswith("Bearer u-"):
            raise uc.UnauthenticatedError("Send a bearer token.")
        user = token.removeprefix("Bearer ")
        return uc.UserContext(
            user_id=user, thread_id="t-1", run_id="r-1", metadata={"plan": f"plan-{user}"}
        )

    with Served(internal) as inner_service:
        clients = {}

        @contextlib.asynccontextmanager
        async def lifespan(app):
            # One client for the service's life, as a service keeps one.
            async with httpx2.AsyncClient(base_url=inner_service.url, timeout=TIMEOUT) as client:
                clients["inner"] = client
                yield

        async def work(request: Request) -> JSONResponse:
            with tracer.start_as_current_span("edge"):
                headers = {}
                inject_baggage(headers, metadata=("plan",))
                answer = await clients["inner"].get("/inner", headers=headers)
                ctx = uc.current()
                return JSONResponse(
                    {"user": ctx.user_id, "request": ctx.request_id, "inner": answer.json()}
                )

        edge = Starlette(routes=[Route("/work", work)], lifespan=lifespan)
        edge.add_middleware(UserContextMiddleware, resolver=resolve_edge)
        with Served(Edge(edge)) as edge_service:
            yield exporter, edge_service.url
    provider.shutdown()


async def test_many_users_across_two_services(services, anyio_backend):
    """
    20 users x 10 concurrent requests through the edge service, each calling
    the internal service with the context as baggage: all 200 answers and
    all 400 spans belong to the requests' own users (0 cross-user); each
    internal span is a child (depth 1) of its edge request, and carries the
    allowlisted metadata that travelled.
    """
    exporter, url = services
    exporter.clear()
    answers = []

    async with httpx2.AsyncClient(base_url=url, timeout=TIMEOUT) as client:

        async def call(user):
            response = await client.get("/work", headers={"authorization": f"Bearer {user}"})
            assert response.status_code == 200, response.text
            answers.append((user, response.json()))

        async with anyio.create_task_group() as tg:
            for i in range(USERS * PER_USER):
                tg.start_soon(call, f"u-{i % USERS}")

    assert len(answers) == USERS * PER_USER
    assert [a for user, a in answers if a["user"] != user or a["inner"]["user"] != user] == []
    requests = {a["request"]: user for user, a in answers}
    assert len(requests) == USERS * PER_USER
    assert [a for _, a in answers if a["inner"]["parent"] != a["request"]] == []

    spans = exporter.get_finished_spans()
    edge = [dict(s.attributes) for s in spans if s.name == "edge"]
    inner = [dict(s.attributes) for s in spans if s.name == "inner"]
    assert (len(edge), len(inner)) == (USERS * PER_USER, USERS * PER_USER)
    assert [a for a in edge if requests[a["usercontext.request_id"]] != a["enduser.id"]] == []
    assert [
        a
        for a in inner
        if requests[a["usercontext.parent_request_id"]] != a["enduser.id"]
        or a["usercontext.depth"] != 1
        or a["usercontext.metadata.plan"] != f"plan-{a['enduser.id']}"
    ] == []


async def test_forged_baggage_stripped_at_the_edge(services, anyio_backend):
    """
    A client that sends usercontext baggage claiming another user, beside its
    own token, is served as the token's user: the edge drops the members,
    and the internal service sees the context the edge sent.
    """
    exporter, url = services
    forged = "usercontext.user_id=u-admin,usercontext.thread_id=t-0,usercontext.run_id=r-0"
    async with httpx2.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
        response = await client.get(
            "/work",
            headers={"authorization": "Bearer u-7", "baggage": f"{forged},tenant=acme"},
        )
    assert response.status_code == 200
    assert response.json()["user"] == "u-7"
    assert response.json()["inner"]["user"] == "u-7"
    assert "u-admin" not in {s.attributes["enduser.id"] for s in exporter.get_finished_spans()}

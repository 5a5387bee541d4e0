"""
Signed context headers between two real services, each served by hypercorn
on a free port of 127.0.0.1, on the same event loop as the test's client:
asyncio, then trio.

The *edge* service faces clients: it drops every ``x-usercontext-*`` header
and ``usercontext.*`` baggage member they send, resolves the user from a
bearer token, and calls *billing* with its context's headers, signed.
*Billing* trusts only signed headers: it binds a child of the caller's
context, and answers anything else with 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time

import anyio
import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware


httpx2 = pytest.importorskip("httpx2", reason="pip install httpx2")

# Each test starts hypercorn: skipped without it, and failing under CI=true.
pytestmark = [pytest.mark.server("hypercorn"), pytest.mark.anyio]

KEY = secrets.token_bytes(32)
KEY_ID = "edge-2026-12"
USERS = 20
PER_USER = 5
TIMEOUT = 10.0
TOKENS = {f"token-{i}": f"u-{i}" for i in range(USERS)}
# Connections each client keeps open: 100 requests share them, 20 at a time,
# as a service's connection pool would.
LIMITS = httpx2.Limits(max_connections=20)


class Hypercorn:
    """
    *app* served by hypercorn on *loop* (``"asyncio"`` or ``"trio"``) on a
    free port of 127.0.0.1, in a thread, for a ``with`` block.

    The socket listens before the server starts, so requests sent at once
    wait in its backlog rather than fail.
    """

    def __init__(self, app, loop):
        self.loop = loop
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.error = None
        self._stop = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hypercorn-{loop}", daemon=True)

    def _config(self):
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"fd://{self.sock.detach()}"]  # hypercorn owns the socket now
        config.errorlog = logging.getLogger("hypercorn.error")
        config.accesslog = None
        config.graceful_timeout = 2
        return config

    def _run(self):
        try:
            if self.loop == "trio":
                import trio

                trio.run(self._trio)
            else:
                asyncio.run(self._asyncio())
        except BaseException as e:  # reported by __exit__
            self.error = e
            self._started.set()

    async def _asyncio(self):
        from hypercorn.asyncio import serve

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self._stop = lambda: loop.call_soon_threadsafe(stop.set)
        self._started.set()
        await serve(self.app, self._config(), shutdown_trigger=stop.wait)

    async def _trio(self):
        import trio

        from hypercorn.trio import serve

        token = trio.lowlevel.current_trio_token()
        stop = trio.Event()
        self._stop = lambda: token.run_sync_soon(stop.set)
        self._started.set()
        await serve(self.app, self._config(), shutdown_trigger=stop.wait)

    def __enter__(self):
        self._thread.start()
        assert self._started.wait(TIMEOUT), f"hypercorn-{self.loop} did not start"
        return self

    def __exit__(self, *exc_info):
        if self._stop is not None:
            self._stop()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), f"hypercorn-{self.loop} did not stop"
        assert self.error is None, f"hypercorn-{self.loop} failed: {self.error!r}"


def with_lifespan(app, shutdown=None):
    """
    *app*, with the lifespan protocol answered in front of it: *shutdown*,
    if given, is awaited when the server stops.
    """

    async def served(scope, receive, send):
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        if shutdown is not None:
            await shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    return served


async def send_json(send, data, status=200):
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def billing_app(verifier):
    """
    The internal service: it binds a child of a signed caller context, and
    answers 401 to anything else.
    """

    def resolve(scope):
        try:
            caller = uc.UserContext.from_headers(scope["headers"], verifier=verifier)
        except uc.InvalidSignatureError as e:
            raise uc.UnauthenticatedError(str(e), challenge="usercontext-signature") from e
        return caller.child()

    async def app(scope, receive, send):
        ctx = uc.current()
        await anyio.sleep(0.005)  # requests overlap, within the server
        assert uc.current() is ctx
        await send_json(
            send, {"user": ctx.user_id, "parent": ctx.parent_request_id, "depth": ctx.depth}
        )

    return with_lifespan(UserContextMiddleware(app, resolver=resolve))


def edge_app(billing_url, signer, seen):
    """
    The service clients reach: context headers and baggage are stripped as
    the request comes in, the user comes from a bearer token, and billing is
    called with the context's headers signed.
    """

    def resolve(scope):
        seen.append(
            [
                (n, v)
                for n, v in scope["headers"]
                if n.startswith(b"x-usercontext-") or n == b"baggage"
            ]
        )
        token = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        user = TOKENS.get(token.removeprefix("Bearer "))
        if user is None:
            raise uc.UnauthenticatedError("Send a valid bearer token.")
        return uc.UserContext(user_id=user, thread_id="t-1", run_id="r-1")

    clients = []  # one, made on the server's own loop at the first request

    async def app(scope, receive, send):
        ctx = uc.current()
        if not clients:
            clients.append(httpx2.AsyncClient(base_url=billing_url, timeout=TIMEOUT, limits=LIMITS))
        answer = await clients[0].get("/invoice", headers=ctx.to_headers(signer=signer))
        await send_json(
            send,
            {
                "user": ctx.user_id,
                "request_id": ctx.request_id,
                "billing_status": answer.status_code,
                "billing": answer.json(),
            },
        )

    middleware = UserContextMiddleware(app, resolver=resolve)

    async def strip_at_edge(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "headers": uc.strip_context_headers(scope["headers"])}
        await middleware(scope, receive, send)

    async def close_client():
        for client in clients:
            await client.aclose()

    return with_lifespan(strip_at_edge, close_client)


@pytest.fixture(name="services")
def _services(anyio_backend):
    """
    Billing and the edge, both served on the test's event loop kind.
    """
    signer = uc.HeaderSigner(KEY, key_id=KEY_ID, ttl=30)
    verifier = uc.HeaderVerifier({KEY_ID: KEY})
    seen = []
    with Hypercorn(billing_app(verifier), anyio_backend) as billing:  # noqa: SIM117  # one needs the other's url
        with Hypercorn(edge_app(billing.url, signer, seen), anyio_backend) as edge:
            yield billing, edge, seen


class TestBetweenServices:
    async def test_each_user_reaches_billing_as_itself(self, services):
        """
        20 users send 5 requests each at once through the edge, each forging
        another user in x-usercontext-* headers (signed with the real key,
        as if leaked) and in baggage: the edge sees none of those headers,
        and billing sees every request's own user, as a child of the edge's
        request. 100 answers, 0 cross-user observations.
        """
        _, edge, seen = services
        leaked = uc.UserContext(user_id="u-admin", thread_id="t", run_id="r").to_headers(
            signer=uc.HeaderSigner(KEY, key_id=KEY_ID)
        )
        answers = []

        async def call(client, token):
            headers = {
                **leaked,
                "authorization": f"Bearer {token}",
                "baggage": "usercontext.user_id=u-admin,tenant=acme",
            }
            answer = await client.get("/pay", headers=headers)
            answers.append((TOKENS[token], answer.status_code, answer.json()))

        async with (
            httpx2.AsyncClient(base_url=edge.url, timeout=TIMEOUT, limits=LIMITS) as client,
            anyio.create_task_group() as tg,
        ):
            for token in TOKENS:
                for _ in range(PER_USER):
                    tg.start_soon(call, client, token)

        assert len(answers) == USERS * PER_USER
        crossed = [
            (user, body)
            for user, status, body in answers
            if status != 200
            or body["user"] != user
            or body["billing_status"] != 200
            or body["billing"] != {"user": user, "parent": body["request_id"], "depth": 1}
        ]
        assert crossed == []
        assert len(seen) == USERS * PER_USER
        assert all(found == [(b"baggage", b"tenant=acme")] for found in seen)

    async def test_billing_refuses_what_edge_did_not_sign(self, services):
        """
        Billing answers 401, with a problem document naming the reason, to
        unsigned headers, a changed user, a stranger's key and an expired
        signature; the same headers signed now by the edge's key pass.
        """
        billing, _, _ = services
        ctx = uc.UserContext(user_id="u-3", thread_id="t-1", run_id="r-1")
        signer = uc.HeaderSigner(KEY, key_id=KEY_ID, ttl=30)
        stale = uc.HeaderSigner(KEY, key_id=KEY_ID, ttl=30, clock=lambda: time.time() - 60)
        stranger = uc.HeaderSigner(secrets.token_bytes(32), key_id="stranger")
        cases = {
            "missing": ctx.to_headers(),
            "mismatch": {**ctx.to_headers(signer=signer), "x-usercontext-user-id": "u-4"},
            "unknown key": ctx.to_headers(signer=stranger),
            "expired": ctx.to_headers(signer=stale),
        }
        details = {}
        async with httpx2.AsyncClient(base_url=billing.url, timeout=TIMEOUT) as client:
            for reason, headers in cases.items():
                answer = await client.get("/invoice", headers=headers)
                assert answer.status_code == 401, reason
                assert answer.headers["content-type"] == "application/problem+json"
                details[reason] = answer.json()["detail"]
            ok = await client.get("/invoice", headers=ctx.to_headers(signer=signer))

        assert "x-usercontext-signature header is missing" in details["missing"]
        assert "does not match the headers received" in details["mismatch"]
        assert "key id 'stranger', which is not one of" in details["unknown key"]
        assert "the signature expired" in details["expired"]
        assert (ok.status_code, ok.json()) == (
            200,
            {"user": "u-3", "parent": ctx.request_id, "depth": 1},
        )

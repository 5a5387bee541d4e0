"""
Tests of the request id `usercontext.asgi.UserContextMiddleware` gives each
request: taken from a trusted header or generated, and sent back with the
response.
"""

from __future__ import annotations

import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware

from asgi_helpers import Client, http_scope, json_app, resolve


# The middleware serves a request by one path or another, by whether a
# logging adapter reads the ids of requests being resolved: both are tested.
pytestmark = pytest.mark.usefixtures("both_request_paths")


class TestRequestIdPolicy:
    @pytest.mark.parametrize("incoming", ["null", "-", "undefined", "None"])
    async def test_refusal_replaces_what_an_accepted_request_replaces(self, incoming):
        """
        A refusal applies the same rules as an accepted request: an id that
        breaks the library's rules (placeholders such as ``null`` and ``-``)
        is replaced in both, never echoed.
        """
        accepted, refused = Client(), Client()
        mw = UserContextMiddleware(json_app(), resolver=resolve)
        await mw(http_scope(("x-request-id", incoming)), accepted.receive, accepted.send)
        await mw(http_scope(("x-request-id", incoming), user=None), refused.receive, refused.send)

        for client in (accepted, refused):
            (sent,) = client.header_values(b"x-request-id")
            assert sent != incoming.encode()
            assert len(sent) == 32
        assert refused.json()["request_id"] == refused.headers()[b"x-request-id"].decode()

    async def test_never_trust(self):
        """
        With ``trust_request_id=False`` the client's id is never taken: the
        accepted request keeps its context's id, a refusal gets a new one.
        """
        resolved = []

        def resolver(scope):
            resolved.append(resolve(scope))
            return resolved[-1]

        mw = UserContextMiddleware(json_app(), resolver=resolver, trust_request_id=False)
        accepted, refused = Client(), Client()
        await mw(http_scope(("x-request-id", "req-1")), accepted.receive, accepted.send)
        await mw(http_scope(("x-request-id", "req-2"), user=None), refused.receive, refused.send)

        assert accepted.json()["request_id"] == resolved[0].request_id
        assert accepted.header_values(b"x-request-id") == [resolved[0].request_id.encode()]
        assert refused.header_values(b"x-request-id") != [b"req-2"]
        assert mw.trust_request_id is False

    async def test_validate_with_a_callable(self):
        """
        A callable decides which valid ids to take, for accepted and refused
        requests alike; it sees only ids of 1 to 128 visible ASCII characters.
        """
        asked = []

        def ours(request_id):
            asked.append(request_id)
            return request_id.startswith("edge-")

        mw = UserContextMiddleware(json_app(), resolver=resolve, trust_request_id=ours)
        sent = {}
        for incoming, user in [
            ("edge-1", "u-1"),
            ("evil-1", "u-1"),
            ("edge-2", None),
            ("evil-2", None),
            ("edge 3", "u-1"),
        ]:
            client = Client()
            await mw(http_scope(("x-request-id", incoming), user=user), client.receive, client.send)
            sent[incoming] = client.header_values(b"x-request-id")[0].decode()

        assert sent["edge-1"] == "edge-1"
        assert sent["edge-2"] == "edge-2"
        assert sent["evil-1"] != "evil-1"
        assert sent["evil-2"] != "evil-2"
        assert sent["edge 3"] != "edge 3"
        assert asked == ["edge-1", "evil-1", "edge-2", "evil-2"]

    async def test_custom_generator(self):
        """
        *request_id_factory* makes the id of every request whose client sent
        none: accepted (the context takes it), refused and anonymous alike.
        """
        made = iter(f"gen-{n}" for n in range(10))
        mw = UserContextMiddleware(
            json_app(),
            resolver=resolve,
            request_id_factory=lambda: next(made),
            exempt=("/health",),
        )
        ids = []
        for scope in [
            http_scope(),
            http_scope(user=None),
            {**http_scope(), "path": "/health"},
            http_scope(("x-request-id", "req-client")),
        ]:
            client = Client()
            await mw(scope, client.receive, client.send)
            ids.append(client.header_values(b"x-request-id")[0].decode())

        assert ids == ["gen-0", "gen-1", "gen-2", "req-client"]

    async def test_generator_returning_a_bad_id(self):
        """
        A generated id goes into a header: one that is not 1 to 128 visible
        ASCII characters is a ValueError naming the factory.
        """

        def make_id():
            return "has space"

        mw = UserContextMiddleware(json_app(), resolver=resolve, request_id_factory=make_id)
        with pytest.raises(ValueError, match=r"request_id_factory 'TestRequestIdPolicy"):
            await mw(http_scope(), Client().receive, Client().send)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"trust_request_id": "yes"}, r"^trust_request_id must be True, False, or a function"),
            ({"request_id_factory": "uuid4"}, r"^request_id_factory must be a function"),
        ],
    )
    def test_bad_policy(self, kwargs, match):
        """
        The policy arguments are checked at construction.
        """
        with pytest.raises(TypeError, match=match):
            UserContextMiddleware(json_app(), resolver=resolve, **kwargs)


class TestRequestId:
    @pytest.mark.parametrize(
        ("incoming", "reused"),
        [
            (b"req-123", True),
            (b"01J9Z3K4-abc_DEF.~!", True),
            (b"r" * 128, True),
            (b"r" * 129, False),
            ("café".encode(), False),
            (b"a b", False),
            (b" req-1", False),
            (b"", False),
            (b"null", False),  # valid ASCII, but a placeholder under the library's rules
        ],
        ids=[
            "simple",
            "punctuation",
            "128",
            "too-long",
            "non-ascii",
            "space",
            "leading-space",
            "empty",
            "placeholder",
        ],
    )
    async def test_incoming_id_reused_when_valid(self, incoming, reused):
        """
        A request id the client sent is the context's request id when it is 1
        to 128 visible ASCII characters that the library accepts, and is
        replaced by the resolver's otherwise. The response carries the id in
        use, once.
        """
        resolved = []

        def resolver(scope):
            resolved.append(resolve(scope))
            return resolved[-1]

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        await mw(http_scope(("x-request-id", incoming)), client.receive, client.send)

        expected = incoming.decode() if reused else resolved[0].request_id
        assert client.json()["request_id"] == expected
        assert client.header_values(b"x-request-id") == [expected.encode()]

    async def test_id_the_resolver_already_uses(self):
        """
        A resolver may take the request id from the header itself; the context
        is then used as it is.
        """
        resolved = []

        def resolver(scope):
            ctx = resolve(scope).evolve(request_id=dict(scope["headers"])[b"x-request-id"].decode())
            resolved.append(ctx)
            return ctx

        seen = []

        async def app(scope, receive, send):
            seen.append(uc.current())
            await json_app()(scope, receive, send)

        client = Client()
        await UserContextMiddleware(app, resolver=resolver)(
            http_scope(("x-request-id", "req-5")), client.receive, client.send
        )

        assert seen == resolved
        assert seen[0] is resolved[0]
        assert client.header_values(b"x-request-id") == [b"req-5"]

    async def test_custom_header_both_ways(self):
        """
        *request_id_header* names the header read from the request and written
        to the response, in any case.
        """
        client = Client()
        mw = UserContextMiddleware(
            json_app(), resolver=resolve, request_id_header="X-Correlation-ID"
        )
        scope = http_scope(("x-request-id", "ignored"), ("x-correlation-id", "corr-1"))
        await mw(scope, client.receive, client.send)

        assert client.json()["request_id"] == "corr-1"
        assert client.header_values(b"x-correlation-id") == [b"corr-1"]
        assert client.header_values(b"x-request-id") == []

    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_header_not_duplicated_when_the_app_sets_it(self, with_registry):
        """
        When the application sets the header itself (in any case), its value
        is kept and not repeated.
        """

        async def app(scope, receive, send):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"X-Request-ID", b"app-chosen")],
                }
            )
            await send({"type": "http.response.body", "body": b"ok"})

        client = Client()
        registry = uc.Registry() if with_registry else None
        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert client.start()["headers"] == [(b"X-Request-ID", b"app-chosen")]

    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_header_added_to_any_headers(self, with_registry):
        """
        The header is added to a start message without headers, and to headers
        given as any iterable (a generator here), which are all kept.
        """
        starts = [
            {"type": "http.response.start", "status": 200},
            {
                "type": "http.response.start",
                "status": 200,
                "headers": (pair for pair in [(b"x-a", b"1"), (b"x-b", b"2")]),
            },
        ]
        results = []
        for start in starts:

            async def app(scope, receive, send, start=start):
                await send(start)
                await send({"type": "http.response.body", "body": b"ok"})

            client = Client()
            registry = uc.Registry() if with_registry else None
            mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
            await mw(http_scope(("x-request-id", "req-1")), client.receive, client.send)
            results.append(list(client.start()["headers"]))

        assert results == [
            [(b"x-request-id", b"req-1")],
            [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-request-id", b"req-1")],
        ]

    async def test_non_ascii_id_from_the_resolver(self):
        """
        A request id the resolver made with non-ASCII characters is sent
        backslash-escaped, as a header must be ASCII.
        """

        def resolver(scope):
            return resolve(scope).evolve(request_id="req-é")

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert client.header_values(b"x-request-id") == [b"req-\\xe9"]

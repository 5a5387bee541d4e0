from __future__ import annotations

import ast
import inspect
import json
import math

from types import MappingProxyType

import attrs
import pytest

from usercontext import (
    InvalidContextError,
    UserContext,
    _codec,
    _error_base,
    _messages,
    _refusals,
    exceptions,
)


REQUIRED = {"user_id": "u-42", "thread_id": "t-7", "run_id": "r-1"}
HEADER_NAMES = {
    "user_id": "x-usercontext-user-id",
    "thread_id": "x-usercontext-thread-id",
    "run_id": "x-usercontext-run-id",
    "request_id": "x-usercontext-request-id",
    "connection_id": "x-usercontext-connection-id",
    "parent_request_id": "x-usercontext-parent-request-id",
    "depth": "x-usercontext-depth",
    "created_at": "x-usercontext-created-at",
    "metadata": "x-usercontext-metadata",
}


@pytest.fixture(name="full")
def _full():
    """
    A child context with every field set, and JSON-friendly metadata.
    """
    root = UserContext(
        user_id="ü ser/42",
        thread_id="t%7",
        run_id="r-1:tool#2",
        connection_id="ws-1",
        metadata={"plan": "pro", "n": 3, "ratio": 0.25, "ok": True, "none": None},
    )
    return root.child(
        metadata={"tags": ["a", "b"], "nested": {"x": [1, {"y": "é\"'"}]}, "big": 10**30}
    )


class TestFields:
    def test_fields_are_the_class_fields(self):
        """
        The wire format's field list is UserContext's attributes, in order:
        nine fields, six of them ids.
        """
        assert tuple(a.name for a in attrs.fields(UserContext)) == _codec.FIELDS
        assert len(_codec.FIELDS) == 9
        assert _codec.FIELDS[:6] == _codec.ID_FIELDS

    def test_keys_and_headers_follow_the_fields(self):
        """
        to_dict() returns the fields' keys in their order, and every header
        is named after a field.
        """
        root = UserContext(user_id="u", thread_id="t", run_id="r", connection_id="c")
        ctx = root.child(metadata={"k": 1})

        assert tuple(ctx.to_dict()) == _codec.FIELDS
        assert list(ctx.to_headers()) == [HEADER_NAMES[f] for f in _codec.FIELDS]

    def test_leaf(self):
        """
        The codec imports nothing of the package but the exceptions and the
        wording of their messages, which import nothing but the exceptions
        (and the two modules these are defined in): the context can import it
        without a circle.
        """

        def imported(module):
            tree = ast.parse(inspect.getsource(module))
            return {
                node.module
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level > 0
            }

        assert imported(_codec) == {"_messages", "exceptions"}
        assert imported(_messages) == {"exceptions"}
        assert imported(exceptions) == {"_error_base", "_refusals"}
        assert imported(_refusals) == {"_error_base"}
        assert imported(_error_base) == set()


class TestDict:
    def test_to_dict(self):
        """
        to_dict() returns every field as plain values; metadata mappings become
        dicts, tuples, frozensets and bytes stay.
        """
        ctx = UserContext(
            **REQUIRED,
            request_id="req-1",
            created_at=5.0,
            metadata={"m": {"n": [1, {"o": 2}]}, "s": {1}, "b": b"x"},
        )

        data = ctx.to_dict()

        assert data == {
            "user_id": "u-42",
            "thread_id": "t-7",
            "run_id": "r-1",
            "request_id": "req-1",
            "connection_id": None,
            "parent_request_id": None,
            "depth": 0,
            "created_at": 5.0,
            "metadata": {"m": {"n": (1, {"o": 2})}, "s": frozenset({1}), "b": b"x"},
        }
        assert type(data["metadata"]) is dict
        assert type(data["metadata"]["m"]) is dict
        assert type(data["metadata"]["m"]["n"][1]) is dict

    def test_round_trip(self, full):
        """
        from_dict(to_dict()) gives an equal context.
        """
        again = UserContext.from_dict(full.to_dict())

        assert again == full
        assert isinstance(again.metadata["nested"], MappingProxyType)

    def test_round_trip_json(self, full):
        """
        The dict survives a JSON round trip.
        """
        assert UserContext.from_dict(json.loads(json.dumps(full.to_dict()))) == full

    def test_round_trip_binary_metadata(self):
        """
        Bytes and frozensets survive the dict codec.
        """
        ctx = UserContext(**REQUIRED, metadata={"b": b"\x00", "s": frozenset({"a", 1})})

        assert UserContext.from_dict(ctx.to_dict()) == ctx

    def test_minimal_dict(self):
        """
        Only the required keys are needed; the rest get defaults.
        """
        ctx = UserContext.from_dict(REQUIRED)

        assert (ctx.user_id, ctx.depth, ctx.connection_id) == ("u-42", 0, None)
        assert len(ctx.request_id) == 32

    @pytest.mark.parametrize("key", ["plan", "userId", "", 1, "User_id"])
    def test_unknown_key(self, key):
        """
        Unknown keys are refused with InvalidContextError naming them.
        """
        with pytest.raises(InvalidContextError, match="is not a UserContext field") as ei:
            UserContext.from_dict({**REQUIRED, key: "x"})

        assert ei.value.field == str(key)
        assert ei.value.value == key

    @pytest.mark.parametrize("missing", ["user_id", "thread_id", "run_id"])
    def test_missing_key(self, missing):
        """
        Missing required keys are refused with InvalidContextError naming them.
        """
        data = dict(REQUIRED)
        del data[missing]

        with pytest.raises(InvalidContextError, match="is missing") as ei:
            UserContext.from_dict(data)

        assert ei.value.field == missing
        assert f"Cannot decode UserContext.{missing}" in str(ei.value)

    @pytest.mark.parametrize("data", [None, [("user_id", "u")], "user_id=u", 3])
    def test_not_a_mapping(self, data):
        """
        A non-mapping raises TypeError.
        """
        with pytest.raises(TypeError, match="takes a mapping"):
            UserContext.from_dict(data)

    def test_mapping_proxy(self, full):
        """
        Any mapping is accepted.
        """
        assert UserContext.from_dict(MappingProxyType(full.to_dict())) == full

    def test_wrong_value_type(self, full):
        """
        Values of the wrong type raise TypeError.
        """
        with pytest.raises(TypeError, match="depth"):
            UserContext.from_dict({**full.to_dict(), "depth": "1"})


class TestHeaders:
    def test_to_headers(self):
        """
        to_headers() makes one percent-encoded x-usercontext-* header per set
        field, plus depth and created_at; metadata travels as compact JSON.
        """
        ctx = UserContext(
            user_id="ü 1",
            thread_id="t/7",
            run_id="r%1",
            request_id="req-1",
            created_at=1.5,
            metadata={"a": [1, "é"]},
        )

        assert ctx.to_headers() == {
            "x-usercontext-user-id": "%C3%BC%201",
            "x-usercontext-thread-id": "t/7",
            "x-usercontext-run-id": "r%251",
            "x-usercontext-request-id": "req-1",
            "x-usercontext-depth": "0",
            "x-usercontext-created-at": "1.5",
            "x-usercontext-metadata": '{"a":[1,"\\u00e9"]}',
        }

    def test_all_ascii(self, full):
        """
        Every header name and value is ASCII.
        """
        headers = full.to_headers()

        assert set(headers) == set(HEADER_NAMES.values())
        assert all(k.isascii() and v.isascii() for k, v in headers.items())

    def test_round_trip(self, full):
        """
        from_headers(to_headers()) gives an equal context.
        """
        assert UserContext.from_headers(full.to_headers()) == full

    def test_round_trip_created_at_exact(self, ctx):
        """
        created_at survives exactly, to the last bit.
        """
        ctx = ctx.evolve(created_at=1_700_000_000.123456789)

        assert UserContext.from_headers(ctx.to_headers()).created_at == ctx.created_at

    def test_round_trip_bytes_pairs(self, full):
        """
        ASGI-style lists of (bytes, bytes) pairs decode, among other headers.
        """
        pairs = [(b"host", b"example.com")]
        pairs += [(k.encode(), v.encode()) for k, v in full.to_headers().items()]
        pairs += [(b"content-type", b"text/plain")]

        assert UserContext.from_headers(pairs) == full

    def test_round_trip_bytes_mapping(self, full):
        """
        Mappings of bytes to bytes decode.
        """
        headers = {k.encode(): v.encode() for k, v in full.to_headers().items()}

        assert UserContext.from_headers(headers) == full

    @pytest.mark.parametrize("case", [str.upper, str.title, str.swapcase])
    def test_mixed_case_names(self, full, case):
        """
        Header names are case-insensitive.
        """
        headers = [(case(k), v) for k, v in full.to_headers().items()]

        assert UserContext.from_headers(headers) == full

    def test_other_headers_ignored(self, ctx):
        """
        Headers without the x-usercontext- prefix are ignored, whatever they hold.
        """
        headers = {
            **ctx.to_headers(),
            "x-user-id": "u-99",
            "x-usercontext": "x",
            "usercontext-user-id": "u-99",
            "authorization": "\x00" * 10_000,
        }

        assert UserContext.from_headers(headers) == ctx

    def test_unencoded_values(self):
        """
        Plain header values decode as is.
        """
        ctx = UserContext.from_headers(
            {
                "x-usercontext-user-id": "u 42",
                "x-usercontext-thread-id": "t-7",
                "x-usercontext-run-id": "r-1",
            }
        )

        assert (ctx.user_id, ctx.thread_id, ctx.depth) == ("u 42", "t-7", 0)

    def test_generator_of_pairs(self, ctx):
        """
        Any iterable of pairs works, a generator too.
        """
        assert UserContext.from_headers(iter(ctx.to_headers().items())) == ctx

    @pytest.mark.parametrize(
        "name", ["x-usercontext-plan", "x-usercontext-", "X-UserContext-Tenant"]
    )
    def test_unknown_header(self, ctx, name):
        """
        An unknown x-usercontext-* header is refused, naming it.
        """
        with pytest.raises(InvalidContextError, match="is not a usercontext header") as ei:
            UserContext.from_headers({**ctx.to_headers(), name: "x"})

        assert ei.value.field == name.lower()

    def test_duplicate(self, ctx):
        """
        A header that appears twice is refused, whatever the case of its names.
        """
        pairs = [*ctx.to_headers().items(), ("X-Usercontext-Run-Id", "r-2")]

        with pytest.raises(InvalidContextError, match="appears twice") as ei:
            UserContext.from_headers(pairs)

        assert ei.value.field == "run_id"

    @pytest.mark.parametrize("missing", ["user_id", "thread_id", "run_id"])
    def test_missing(self, ctx, missing):
        """
        A missing required header is refused, naming it.
        """
        headers = ctx.to_headers()
        del headers[HEADER_NAMES[missing]]

        with pytest.raises(InvalidContextError, match=f"{HEADER_NAMES[missing]} is missing") as ei:
            UserContext.from_headers(headers)

        assert ei.value.field == missing

    def test_to_headers_too_large(self, ctx):
        """
        to_headers() refuses metadata that would take more than 8 KiB, and
        accepts metadata just under it.
        """
        base = sum(len(k) + len(v) for k, v in ctx.to_headers().items())
        overhead = len('x-usercontext-metadata{"b":""}')
        fits = ctx.evolve(metadata={"b": "x" * (8192 - base - overhead)})
        assert sum(len(k) + len(v) for k, v in fits.to_headers().items()) == 8192

        big = ctx.evolve(metadata={"b": "x" * (8193 - base - overhead)})
        with pytest.raises(InvalidContextError, match="8193 bytes, over the limit of 8192") as ei:
            big.to_headers()

        assert ei.value.field == "headers"
        assert ei.value.value == 8193

    def test_from_headers_too_large(self, ctx):
        """
        from_headers() refuses x-usercontext-* headers of more than 8 KiB in total.
        """
        headers = {**ctx.to_headers(), "x-usercontext-metadata": json.dumps({"b": "x" * 9000})}

        with pytest.raises(InvalidContextError, match="exceed 8192 bytes") as ei:
            UserContext.from_headers(headers)

        assert ei.value.field == "headers"

    @pytest.mark.parametrize(
        "value", [b"\x00", frozenset({1}), math.nan, math.inf, -math.inf, (1, b"x")]
    )
    def test_to_headers_non_json(self, ctx, value):
        """
        Metadata holding bytes, frozensets or non-finite floats cannot travel in
        headers.
        """
        ctx = ctx.evolve(metadata={"v": value})

        with pytest.raises(InvalidContextError, match="cannot travel in headers") as ei:
            ctx.to_headers()

        assert ei.value.field == "metadata"
        assert isinstance(ei.value.__cause__, (TypeError, ValueError))

    @pytest.mark.parametrize(
        ("field", "value", "reason"),
        [
            ("depth", "x", "small decimal integer"),
            ("depth", "-1", "small decimal integer"),
            ("depth", "1.0", "small decimal integer"),
            ("depth", "12345", "small decimal integer"),
            ("depth", "\u0661", "small decimal integer"),
            ("depth", "", "small decimal integer"),
            ("created_at", "yesterday", "not a number"),
            ("created_at", "", "not a number"),
            ("metadata", "{", "not valid JSON"),
            ("metadata", "", "not valid JSON"),
            ("metadata", "[" * 7000, "not valid JSON"),
            ("metadata", "[1]", "not a JSON object"),
            ("metadata", '"a"', "not a JSON object"),
            ("metadata", "null", "not a JSON object"),
            ("user_id", "%ff", "percent-encoded UTF-8"),
            ("run_id", "r-%C3%28", "percent-encoded UTF-8"),
        ],
    )
    def test_malformed(self, ctx, field, value, reason):
        """
        Malformed depth, created_at, metadata or percent-encoding is refused,
        naming the field.
        """
        headers = {**ctx.to_headers(), HEADER_NAMES[field]: value}

        with pytest.raises(InvalidContextError, match=reason) as ei:
            UserContext.from_headers(headers)

        assert ei.value.field == field
        assert len(str(ei.value)) < 400

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("depth", "33"),
            ("depth", "1"),
            ("created_at", "nan"),
            ("created_at", "-1"),
            ("metadata", '{"user_id":"x"}'),
            ("metadata", '{"":1}'),
            ("metadata", "[" * 9 + "]" * 9),
        ],
    )
    def test_well_formed_but_invalid(self, ctx, field, value):
        """
        Well-formed values that break a rule are refused like at construction.
        """
        if field == "metadata":
            value = value if value.startswith("{") else '{"a":' + value + "}"
        headers = {**ctx.to_headers(), HEADER_NAMES[field]: value}

        with pytest.raises(InvalidContextError):
            UserContext.from_headers(headers)

    def test_lineage_headers(self, ctx):
        """
        A child's lineage travels and is checked.
        """
        child = ctx.child()
        headers = child.to_headers()

        assert headers["x-usercontext-depth"] == "1"
        assert headers["x-usercontext-parent-request-id"] == ctx.request_id
        assert UserContext.from_headers(headers) == child

        del headers["x-usercontext-parent-request-id"]
        with pytest.raises(InvalidContextError):
            UserContext.from_headers(headers)

    @pytest.mark.parametrize("headers", ["x-usercontext-user-id: u", b"abc", 42, None])
    def test_not_headers(self, headers):
        """
        Something that is neither a mapping nor an iterable of pairs raises TypeError.
        """
        with pytest.raises(TypeError, match="mapping or an iterable"):
            UserContext.from_headers(headers)

    @pytest.mark.parametrize("pair", [("x-usercontext-user-id",), ("a", "b", "c"), 42, None, "abc"])
    def test_not_a_pair(self, pair):
        """
        Items that are not (name, value) pairs are refused.
        """
        with pytest.raises(InvalidContextError, match="not a \\(name, value\\) pair") as ei:
            UserContext.from_headers([pair])

        assert ei.value.field == "headers"

    @pytest.mark.parametrize(
        "pair", [(1, "u"), (None, "u"), ("x-usercontext-user-id", 1), ("x-usercontext-depth", None)]
    )
    def test_not_text(self, pair):
        """
        Header names and values must be str or bytes.
        """
        with pytest.raises(InvalidContextError, match="neither str nor bytes"):
            UserContext.from_headers([pair])

    def test_latin1_bytes(self):
        """
        Bytes values are read as latin-1, as HTTP allows.
        """
        ctx = UserContext.from_headers(
            [
                (b"x-usercontext-user-id", "u-\xe9".encode("latin-1")),
                (b"x-usercontext-thread-id", b"t"),
                (b"x-usercontext-run-id", b"r"),
            ]
        )

        assert ctx.user_id == "u-\xe9"

    def test_constants(self):
        """
        The limit is 8 KiB and the prefix x-usercontext-.
        """
        assert _codec.MAX_HEADER_BYTES == 8192
        assert _codec.HEADER_PREFIX == "x-usercontext-"

"""
Signed context headers: `HeaderSigner` and `HeaderVerifier` with
`UserContext.to_headers`/`from_headers` and `to_job`/`bound_from_job`.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import re

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import usercontext

from usercontext import (
    HeaderSigner,
    HeaderVerifier,
    InvalidContextError,
    InvalidSignatureError,
    UserContext,
    bound_from_job,
    child_from_job,
    current_or_none,
    to_job,
)
from usercontext._codec import MAX_HEADER_BYTES


KEY = bytes(range(32))
OLD_KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(1, 33))
SIG = "x-usercontext-signature"
T0 = 1_800_000_000.0  # a fixed "now", in epoch seconds
SIGNATURE_FORMAT = re.compile(
    r"v1;kid=([A-Za-z0-9._-]+);iat=([0-9]+);exp=([0-9]+);sig=([0-9a-f]{64})"
)


class FakeClock:
    """
    A clock that tells the time it is set to, in epoch seconds.
    """

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="clock")
def _clock():
    return FakeClock()


@pytest.fixture(name="signer")
def _signer(clock):
    """
    A signer of key id k1 with a 30 s lifetime, on the fake clock.
    """
    return HeaderSigner(KEY, key_id="k1", ttl=30, clock=clock)


@pytest.fixture(name="verifier")
def _verifier(clock):
    """
    A verifier of key k1 with 5 s of leeway, on the same fake clock.
    """
    return HeaderVerifier({"k1": KEY}, leeway=5, clock=clock)


@pytest.fixture(name="full")
def _full():
    """
    A child context with every field set, and metadata.
    """
    root = UserContext(user_id="ü ser/42", thread_id="t%7", run_id="r-1", connection_id="ws-1")
    return root.child(metadata={"plan": "pro", "tags": ["a", "b"], "n": {"x": 1.5}})


def refusal(headers, verifier, reason):
    """
    Return the `InvalidSignatureError` that decoding *headers* with *verifier*
    raises, after checking its *reason* and field.
    """
    with pytest.raises(InvalidSignatureError) as info:
        UserContext.from_headers(headers, verifier=verifier)
    assert (info.value.reason, info.value.field) == (reason, "signature")
    assert str(info.value).startswith("Cannot trust the x-usercontext-* headers: ")
    return info.value


class TestSignedHeaders:
    def test_round_trip(self, full, signer, verifier):
        """
        Signed headers carry the context's headers unchanged plus a v1
        signature of key id k1, issued now, expiring 30 s later, and decode
        with the verifier to an equal context.
        """
        headers = full.to_headers(signer=signer)
        sig = headers.pop(SIG)

        assert headers == full.to_headers()
        kid, iat, exp, _ = SIGNATURE_FORMAT.fullmatch(sig).groups()
        assert (kid, int(iat), int(exp)) == ("k1", T0 * 1000, T0 * 1000 + 30_000)
        assert UserContext.from_headers({**headers, SIG: sig}, verifier=verifier) == full

    def test_mac_is_hmac_sha256_of_the_canonical_form(self, ctx, signer):
        """
        The signature is HMAC-SHA256 in lower-case hex over lines of the
        version, key id, times and each header's ``name:value`` sorted by
        name: a receiver in another language can check it.
        """
        headers = ctx.to_headers(signer=signer)
        kid, iat, exp, sig = SIGNATURE_FORMAT.fullmatch(headers.pop(SIG)).groups()
        lines = ["v1", kid, iat, exp, *(f"{name}:{headers[name]}" for name in sorted(headers))]
        message = "".join(f"{line}\n" for line in lines).encode("ascii")

        assert sig == hmac.new(KEY, message, hashlib.sha256).hexdigest()

    def test_unsigned_unchanged(self, full):
        """
        Without a signer no signature header is made, and without a
        verifier a signature header is ignored, so signing can be turned on
        at callers before receivers check it.
        """
        signed = full.to_headers(signer=HeaderSigner(KEY, key_id="k1"))

        assert SIG not in full.to_headers()
        assert UserContext.from_headers(signed) == full
        assert UserContext.from_headers({**signed, SIG: "garbage"}) == full

    def test_asgi_pairs_any_order_and_case(self, full, signer, verifier):
        """
        Headers as ASGI gives them (byte pairs), in reverse order, with
        upper-case names and other headers around them, verify: names are
        case-insensitive and the MAC covers them sorted.
        """
        pairs = [
            (k.upper().encode(), v.encode()) for k, v in full.to_headers(signer=signer).items()
        ]
        pairs = [(b"accept", b"*/*"), *reversed(pairs), (b"x-other", b"1")]

        assert UserContext.from_headers(pairs, verifier=verifier) == full

    def test_missing(self, full, verifier):
        """
        Unsigned headers are refused by a verifier, with a message naming the
        header and the fix.
        """
        error = refusal(full.to_headers(), verifier, "missing")

        assert "the x-usercontext-signature header is missing" in str(error)
        assert "to_headers(signer=HeaderSigner(...))" in str(error)

    def test_changed_value(self, ctx, signer, verifier):
        """
        Changing the user id of signed headers is refused as a mismatch.
        """
        headers = ctx.to_headers(signer=signer)
        headers["x-usercontext-user-id"] = "u-99"

        error = refusal(headers, verifier, "mismatch")
        assert "does not match the headers received" in str(error)
        assert "(key id 'k1')" in str(error)

    def test_added_field(self, ctx, signer, verifier):
        """
        Adding a header that is a valid field (a parent link) is refused.
        """
        headers = ctx.to_headers(signer=signer)
        headers["x-usercontext-connection-id"] = "ws-9"

        refusal(headers, verifier, "mismatch")

    @pytest.mark.parametrize("name", ["x-usercontext-request-id", "x-usercontext-metadata"])
    def test_removed_field(self, full, signer, verifier, name):
        """
        Removing a signed header, required or not, is refused.
        """
        headers = full.to_headers(signer=signer)
        del headers[name]

        refusal(headers, verifier, "mismatch")

    @pytest.mark.parametrize("value", ["u-42\u00e9", "u-42\u4e00", b"u-42\xff", "u-42\n"])
    def test_not_ascii_or_newline(self, ctx, signer, verifier, value):
        """
        A header value that is not ASCII or holds a newline (to_headers never
        makes one) is refused as a mismatch, whether given as str or bytes.
        """
        pairs = list(ctx.to_headers(signer=signer).items())
        pairs[0] = (pairs[0][0], value)

        refusal(pairs, verifier, "mismatch")

    def test_signature_of_another_context(self, ctx, other_ctx, signer, verifier):
        """
        A valid signature moved onto another user's headers is refused.
        """
        headers = other_ctx.to_headers()
        headers[SIG] = ctx.to_headers(signer=signer)[SIG]

        refusal(headers, verifier, "mismatch")

    def test_signature_twice(self, ctx, signer, verifier):
        """
        A second signature header is refused before any is checked.
        """
        pairs = list(ctx.to_headers(signer=signer).items())
        pairs.append(pairs[-1])

        with pytest.raises(InvalidContextError, match="appears twice") as info:
            UserContext.from_headers(pairs, verifier=verifier)
        assert info.value.field == "signature"

    @pytest.mark.parametrize(
        "change",
        [
            lambda s: "",
            lambda s: s.replace("v1;", "v2;"),
            lambda s: s + "=",
            lambda s: s + "\n",
            lambda s: " " + s,
            lambda s: s.replace(";", ",", 1),
            lambda s: s.replace("iat=", "iat=0"),
            lambda s: s.replace("exp=", "exp=+"),
            lambda s: s[:-1],
            lambda s: s + "a",
            lambda s: s[:-64] + s[-64:].upper(),
            lambda s: s.replace("kid=k1", "kid=k 1"),
            lambda s: s.replace("iat=1", "iat=\u0661"),  # an Arabic-Indic digit one
        ],
    )
    def test_malformed(self, ctx, signer, verifier, change):
        """
        A signature header that is not exactly the v1 format is refused as
        malformed, and the message shows the format.
        """
        headers = ctx.to_headers(signer=signer)
        headers[SIG] = change(headers[SIG])

        error = refusal(headers, verifier, "malformed")
        assert "(v1;kid=...;iat=...;exp=...;sig=...)" in str(error)

    def test_unknown_key(self, ctx, clock, verifier):
        """
        Headers signed with a key id the verifier does not hold are refused,
        and the message names that id and the known ones.
        """
        signer = HeaderSigner(OTHER_KEY, key_id="billing.2", clock=clock)

        error = refusal(ctx.to_headers(signer=signer), verifier, "unknown key")
        assert "key id 'billing.2', which is not one of this verifier's ('k1')" in str(error)

    def test_wrong_key_same_id(self, ctx, clock, verifier):
        """
        Headers signed with another key under a known id are refused as a
        mismatch.
        """
        signer = HeaderSigner(OTHER_KEY, key_id="k1", clock=clock)

        refusal(ctx.to_headers(signer=signer), verifier, "mismatch")

    def test_rotation(self, ctx, clock):
        """
        A verifier holding the old and the new key accepts both signers; once
        the old key is removed, its signatures are refused as unknown.
        """
        old = HeaderSigner(OLD_KEY, key_id="2026-11", clock=clock)
        new = HeaderSigner(KEY, key_id="2026-12", clock=clock)
        both = HeaderVerifier({"2026-11": OLD_KEY, "2026-12": KEY}, clock=clock)
        after = HeaderVerifier({"2026-12": KEY}, clock=clock)

        for signer in (old, new):
            assert UserContext.from_headers(ctx.to_headers(signer=signer), verifier=both) == ctx
        assert UserContext.from_headers(ctx.to_headers(signer=new), verifier=after) == ctx
        refusal(ctx.to_headers(signer=old), after, "unknown key")

    def test_error_is_invalid_context_and_pickles(self, ctx, verifier):
        """
        The refusal is an `InvalidContextError` (and a `ValueError`), and
        crosses processes with its message and attributes.
        """
        error = refusal(ctx.to_headers(), verifier, "missing")
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301  # our own error

        assert isinstance(error, InvalidContextError)
        assert isinstance(error, ValueError)
        assert (type(copy), str(copy), copy.reason, copy.field) == (
            InvalidSignatureError,
            str(error),
            "missing",
            "signature",
        )

    def test_signature_counts_towards_the_limit(self, ctx, signer):
        """
        The signature header counts in the 8 KiB limit: headers that fit
        unsigned but not signed are refused by to_headers.
        """
        unsigned = ctx.to_headers()
        room = MAX_HEADER_BYTES - sum(len(k) + len(v) for k, v in unsigned.items())
        # metadata's header: its name, plus '{"k":"...."}' around the padding
        padding = room - len("x-usercontext-metadata") - len('{"k":""}')
        big = ctx.evolve(metadata={"k": "a" * padding})

        assert sum(len(k) + len(v) for k, v in big.to_headers().items()) == MAX_HEADER_BYTES
        with pytest.raises(InvalidContextError, match="over the limit of 8192"):
            big.to_headers(signer=signer)

    def test_not_a_signer_or_verifier(self, ctx):
        """
        Anything but a signer or a verifier is refused with a TypeError that
        names the class to pass.
        """
        with pytest.raises(TypeError, match=r"takes a usercontext\.HeaderSigner, got 'k1'"):
            ctx.to_headers(signer="k1")
        with pytest.raises(TypeError, match=r"takes a usercontext\.HeaderVerifier, got"):
            UserContext.from_headers(ctx.to_headers(), verifier={"k1": KEY})

    def test_verified_before_decoding(self, ctx, signer, verifier):
        """
        A malformed value in signed headers is refused by the signature check,
        not read by a decoder: depth 'x' gives a signature mismatch.
        """
        headers = ctx.to_headers(signer=signer)
        headers["x-usercontext-depth"] = "x"

        refusal(headers, verifier, "mismatch")


class TestExpiry:
    @pytest.mark.parametrize("later", [0.0, 30.0, 35.0])
    def test_valid_until_expiry_plus_leeway(self, ctx, clock, signer, verifier, later):
        """
        Signed headers verify from their issue until 30 s (the ttl) + 5 s
        (the leeway) later, both ends included.
        """
        headers = ctx.to_headers(signer=signer)
        clock.now = T0 + later

        assert UserContext.from_headers(headers, verifier=verifier) == ctx

    def test_expired(self, ctx, clock, signer, verifier):
        """
        One millisecond after expiry + leeway, they are refused as expired,
        and the message says by how much.
        """
        headers = ctx.to_headers(signer=signer)
        clock.now = T0 + 35.001

        error = refusal(headers, verifier, "expired")
        assert "the signature expired 5.001 s ago (leeway 5 s)" in str(error)

    def test_no_leeway(self, ctx, clock, signer):
        """
        With leeway=0 the expiry is exact to the millisecond.
        """
        verifier = HeaderVerifier({"k1": KEY}, leeway=0, clock=clock)
        headers = ctx.to_headers(signer=signer)
        clock.now = T0 + 30

        assert UserContext.from_headers(headers, verifier=verifier) == ctx
        clock.now = T0 + 30.001
        refusal(headers, verifier, "expired")

    def test_not_yet_valid(self, ctx, clock, signer, verifier):
        """
        Headers issued by a clock ahead of the verifier's by at most the
        leeway verify; 1 ms more is refused as not yet valid.
        """
        headers = ctx.to_headers(signer=signer)
        clock.now = T0 - 5

        assert UserContext.from_headers(headers, verifier=verifier) == ctx
        clock.now = T0 - 5.001
        error = refusal(headers, verifier, "not yet valid")
        assert "issued 5.001 s in the future" in str(error)
        assert "Synchronise the clocks" in str(error)

    def test_lifetime_too_long(self, ctx, clock):
        """
        A signature claiming a longer lifetime than the verifier's max_ttl
        is refused, even when fresh; one of exactly max_ttl verifies.
        """
        verifier = HeaderVerifier({"k1": KEY}, max_ttl=300, clock=clock)
        too_long = HeaderSigner(KEY, key_id="k1", ttl=300.001, clock=clock)
        longest = HeaderSigner(KEY, key_id="k1", ttl=300, clock=clock)

        error = refusal(ctx.to_headers(signer=too_long), verifier, "lifetime too long")
        assert "a lifetime of 300.001 s, more than this verifier's max_ttl of 300 s" in str(error)
        assert UserContext.from_headers(ctx.to_headers(signer=longest), verifier=verifier) == ctx

    def test_mac_checked_before_time(self, ctx, clock, signer, verifier):
        """
        Tampered headers that are also expired are refused as a mismatch: a
        message about time is only given for authentic headers.
        """
        headers = ctx.to_headers(signer=signer)
        headers["x-usercontext-run-id"] = "r-2"
        clock.now = T0 + 3600

        refusal(headers, verifier, "mismatch")

    def test_sub_millisecond_ttl(self, ctx, clock):
        """
        A ttl below a millisecond lasts one millisecond: times are whole
        milliseconds, rounded so that no signature is born expired.
        """
        signer = HeaderSigner(KEY, key_id="k1", ttl=0.0001, clock=clock)
        _, iat, exp, _ = SIGNATURE_FORMAT.fullmatch(ctx.to_headers(signer=signer)[SIG]).groups()

        assert int(exp) - int(iat) == 1

    def test_real_clock(self, ctx):
        """
        By default both sides read time.time(): a signature is issued between
        the reads before and after it, and lasts the default 60 s.
        """
        import time

        before = int(time.time() * 1000)
        headers = ctx.to_headers(signer=HeaderSigner(KEY, key_id="k1"))
        after = int(time.time() * 1000) + 1
        _, iat, exp, _ = SIGNATURE_FORMAT.fullmatch(headers[SIG]).groups()

        assert before <= int(iat) <= after
        assert int(exp) - int(iat) == 60_000
        assert UserContext.from_headers(headers, verifier=HeaderVerifier({"k1": KEY})) == ctx


# -- Properties ----------------------------------------------------------------

PROPERTIES = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
ids = st.text(
    alphabet=st.characters(categories=("L", "N", "P", "S"), max_codepoint=0x2FF),
    min_size=3,
    max_size=20,
).filter(lambda s: s.strip() == s and s.lower() not in usercontext.DEFAULT_PLACEHOLDERS)
metadata = st.dictionaries(
    st.sampled_from(["plan", "tenant", "n"]),
    st.one_of(st.text(max_size=10), st.integers(-5, 10**6), st.booleans(), st.none()),
    max_size=3,
)


@st.composite
def contexts(draw):
    """
    Root or child contexts with any valid ids, times and small metadata,
    every field drawn, so that each example is made the same way twice.
    """
    parent = draw(st.none() | ids)
    return UserContext(
        user_id=draw(ids),
        thread_id=draw(ids),
        run_id=draw(ids),
        request_id=draw(ids),
        connection_id=draw(st.none() | ids),
        parent_request_id=parent,
        depth=0 if parent is None else draw(st.integers(1, 32)),
        created_at=draw(st.floats(0, 4e9)),
        metadata=draw(metadata),
    )


def signed_pairs(ctx):
    """
    *ctx*'s headers signed at T0, as the byte pairs an ASGI server gives.
    """
    signer = HeaderSigner(KEY, key_id="k1", clock=FakeClock())
    return [(k.encode(), v.encode()) for k, v in ctx.to_headers(signer=signer).items()]


def edit(data, position, byte, how):
    """
    Return *data* with one byte replaced, inserted or deleted at *position*.
    """
    if how == "insert":
        return data[:position] + bytes([byte]) + data[position:]
    if how == "delete":
        return data[:position] + data[position + 1 :]
    return data[:position] + bytes([byte]) + data[position + 1 :]


class TestProperties:
    @PROPERTIES
    @given(ctx=contexts())
    def test_round_trip(self, ctx):
        """
        Every valid context, signed, verifies and decodes to itself.
        """
        verifier = HeaderVerifier({"k1": KEY}, clock=FakeClock())

        assert UserContext.from_headers(signed_pairs(ctx), verifier=verifier) == ctx

    @PROPERTIES
    @given(
        ctx=contexts(),
        data=st.data(),
        byte=st.integers(0, 255),
        how=st.sampled_from(["replace", "insert", "delete"]),
    )
    def test_any_byte_of_a_value_changed(self, ctx, data, byte, how):
        """
        Replacing, inserting or deleting any one byte of any header's value,
        the signature's included, makes the headers refused.
        """
        pairs = signed_pairs(ctx)
        index = data.draw(st.integers(0, len(pairs) - 1), label="header")
        name, value = pairs[index]
        position = data.draw(st.integers(0, len(value) - (how != "insert")), label="position")
        changed = edit(value, position, byte, how)
        if changed == value:  # replaced by itself, or a byte inserted beside its twin
            return
        pairs[index] = (name, changed)
        verifier = HeaderVerifier({"k1": KEY}, clock=FakeClock())

        with pytest.raises(InvalidContextError):
            UserContext.from_headers(pairs, verifier=verifier)

    @PROPERTIES
    @given(
        ctx=contexts(),
        data=st.data(),
        byte=st.integers(0, 255),
        how=st.sampled_from(["replace", "insert", "delete"]),
    )
    def test_any_byte_of_a_name_changed(self, ctx, data, byte, how):
        """
        Replacing, inserting or deleting any one byte of any header's name
        makes the headers refused, unless it only changes a letter's case
        (header names are case-insensitive, RFC 9110 section 5.1).
        """
        pairs = signed_pairs(ctx)
        index = data.draw(st.integers(0, len(pairs) - 1), label="header")
        name, value = pairs[index]
        position = data.draw(st.integers(0, len(name) - (how != "insert")), label="position")
        changed = edit(name, position, byte, how)
        pairs[index] = (changed, value)
        verifier = HeaderVerifier({"k1": KEY}, clock=FakeClock())

        if changed.lower() == name:
            assert UserContext.from_headers(pairs, verifier=verifier) == ctx
        else:
            with pytest.raises(InvalidContextError):
                UserContext.from_headers(pairs, verifier=verifier)


# -- Construction -------------------------------------------------------------


class TestConstruction:
    def test_short_key(self):
        """
        A key under 32 bytes is refused, naming its length and how to make one.
        """
        with pytest.raises(ValueError, match=r"key of id 'k1' is 31 bytes long; it must be at"):
            HeaderSigner(KEY[:31], key_id="k1")
        with pytest.raises(ValueError, match=r"secrets.token_bytes\(32\)"):
            HeaderVerifier({"k1": KEY, "k2": KEY[:16]})

    @pytest.mark.parametrize("key", ["0" * 64, None, list(KEY)])
    def test_key_not_bytes(self, key):
        """
        A key that is not bytes (a hex str, say) is refused with a TypeError
        that says how to read one.
        """
        with pytest.raises(TypeError, match=r"must be bytes, got .*bytes.fromhex\(\)"):
            HeaderSigner(key, key_id="k1")
        with pytest.raises(TypeError, match="must be bytes"):
            HeaderVerifier({"k1": key})

    def test_bytearray_key(self, ctx):
        """
        A bytearray key works, and is copied: changing it later changes nothing.
        """
        key = bytearray(KEY)
        signer = HeaderSigner(key, key_id="k1")
        key[0] ^= 1

        headers = ctx.to_headers(signer=signer)
        assert UserContext.from_headers(headers, verifier=HeaderVerifier({"k1": KEY})) == ctx

    @pytest.mark.parametrize("key_id", ["", "a b", "k" * 65, "clé", "k1\n"])
    def test_bad_key_id(self, key_id):
        """
        A key id must be 1 to 64 letters, digits, '.', '_' or '-'.
        """
        with pytest.raises(ValueError, match="must be 1 to 64 letters, digits"):
            HeaderSigner(KEY, key_id=key_id)
        with pytest.raises(ValueError, match="must be 1 to 64 letters, digits"):
            HeaderVerifier({key_id: KEY})

    def test_key_id_not_str(self):
        """
        A key id that is not a str is refused with a TypeError.
        """
        with pytest.raises(TypeError, match="a key id must be a str, got int"):
            HeaderSigner(KEY, key_id=1)
        with pytest.raises(TypeError, match="a key id must be a str, got bytes"):
            HeaderVerifier({b"k1": KEY})

    def test_keys_mapping(self):
        """
        The verifier's keys must be a non-empty mapping.
        """
        with pytest.raises(TypeError, match="must be a mapping of key ids to keys"):
            HeaderVerifier([("k1", KEY)])
        with pytest.raises(ValueError, match="is empty: give it the key of each trusted peer"):
            HeaderVerifier({})

    @pytest.mark.parametrize("value", [0, -1, 366 * 86400 + 1, float("inf"), float("nan")])
    def test_bad_ttl(self, value):
        """
        ttl and max_ttl must be > 0 and at most 366 days.
        """
        with pytest.raises(ValueError, match=r"HeaderSigner\(ttl=...\) must be a number of"):
            HeaderSigner(KEY, key_id="k1", ttl=value)
        with pytest.raises(ValueError, match=r"seconds > 0 and at most 31622400 \(366 days\)"):
            HeaderVerifier({"k1": KEY}, max_ttl=value)

    def test_longest_ttl(self, ctx, clock):
        """
        A signature valid for 366 days, the most allowed, verifies.
        """
        signer = HeaderSigner(KEY, key_id="k1", ttl=366 * 86400, clock=clock)
        verifier = HeaderVerifier({"k1": KEY}, max_ttl=366 * 86400, clock=clock)
        clock.now += 366 * 86400

        assert UserContext.from_headers(ctx.to_headers(signer=signer), verifier=verifier) == ctx

    @pytest.mark.parametrize("value", [-0.001, 366 * 86400 + 1, float("inf"), float("nan")])
    def test_bad_leeway(self, value):
        """
        leeway must be >= 0 and at most 366 days; 0 is allowed.
        """
        with pytest.raises(ValueError, match=r"seconds >= 0 and at most"):
            HeaderVerifier({"k1": KEY}, leeway=value)
        assert "leeway=0," in repr(HeaderVerifier({"k1": KEY}, leeway=0))

    @pytest.mark.parametrize("value", ["30", True, None])
    def test_not_a_number(self, value):
        """
        Durations that are not numbers are refused with a TypeError.
        """
        with pytest.raises(TypeError, match=r"HeaderSigner\(ttl=...\) must be a number"):
            HeaderSigner(KEY, key_id="k1", ttl=value)
        with pytest.raises(TypeError, match=r"HeaderVerifier\(leeway=...\) must be a number"):
            HeaderVerifier({"k1": KEY}, leeway=value)

    def test_clock_not_callable(self):
        """
        A clock must be callable.
        """
        with pytest.raises(TypeError, match=r"HeaderSigner\(clock=...\) must be a callable"):
            HeaderSigner(KEY, key_id="k1", clock=T0)
        with pytest.raises(TypeError, match=r"HeaderVerifier\(clock=...\) must be a callable"):
            HeaderVerifier({"k1": KEY}, clock=T0)

    def test_repr_hides_keys(self):
        """
        The reprs show key ids and durations, never a key.
        """
        signer = HeaderSigner(KEY, key_id="k1", ttl=30)
        verifier = HeaderVerifier({"k1": KEY, "k2": OTHER_KEY}, leeway=2.5, max_ttl=600)

        assert repr(signer) == "HeaderSigner(key_id='k1', ttl=30)"
        assert repr(verifier) == "HeaderVerifier(key_ids=('k1', 'k2'), leeway=2.5, max_ttl=600)"
        for text in (repr(signer), repr(verifier)):
            assert KEY.hex() not in text
            assert repr(KEY) not in text


class TestJobs:
    def test_signed_job(self, ctx, signer, verifier):
        """
        A payload signed by to_job binds, in the worker, a child of the
        sender's context once its signature is checked.
        """
        payload = to_job(ctx, signer=signer)

        assert SIG in payload
        with bound_from_job(payload, verifier=verifier) as job_ctx:
            assert (job_ctx.user_id, job_ctx.parent_request_id) == (ctx.user_id, ctx.request_id)

    def test_tampered_job(self, ctx, signer, verifier):
        """
        A payload whose user was changed is refused before anything is bound.
        """
        payload = to_job(ctx, signer=signer)
        payload["x-usercontext-user-id"] = "u-99"

        with pytest.raises(InvalidSignatureError, match="does not match"):
            bound_from_job(payload, verifier=verifier)
        assert current_or_none() is None

    def test_unsigned_job(self, ctx, verifier):
        """
        An unsigned payload is refused by a worker with a verifier, and a
        signed one is accepted by a worker without one.
        """
        with pytest.raises(InvalidSignatureError, match="is missing"):
            child_from_job(to_job(ctx), verifier=verifier)
        signed = to_job(ctx, signer=HeaderSigner(KEY, key_id="k1"))
        assert child_from_job(signed).parent_request_id == ctx.request_id

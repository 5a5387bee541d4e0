from __future__ import annotations

import collections
import copy
import math
import os
import pickle
import re
import subprocess
import sys
import time

from pathlib import Path
from types import MappingProxyType

import attrs
import pytest

import usercontext

from usercontext import (
    DEFAULT_PLACEHOLDERS,
    IdRules,
    InvalidContextError,
    IsolationError,
    UserContext,
    UserContextError,
    _context,
)


class _Tampered:
    """
    Pickles as a `UserContext` rebuilt from *data*, as a tampered pickle would.
    """

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (_context._from_dict, (UserContext, self.data))


REQUIRED = {"user_id": "u-42", "thread_id": "t-7", "run_id": "r-1"}
ID_FIELDS = (
    "user_id",
    "thread_id",
    "run_id",
    "request_id",
    "connection_id",
    "parent_request_id",
)
ALL_FIELDS = (*ID_FIELDS, "depth", "created_at", "metadata")
HEX32 = re.compile(r"[0-9a-f]{32}")

CONTROL_CHARACTERS = [
    "\x00",
    "\n",
    "\r",
    "\t",
    "\x1b",
    "\x7f",
    "\x85",
    "\xa0",
    "\u200b",
    "\u200e",
    "\u2028",
    "\u2029",
    "\ufeff",
]
PLACEHOLDERS = [
    "none",
    "null",
    "nil",
    "undefined",
    "placeholder",
    "registry",
    "default",
    "temp",
    "xxx",
    "example",
    "NULL",
    "None",
    "Undefined",
    "DeFaUlT",
    "XXX",
]


def make(**kw):
    """
    Build a context from REQUIRED updated with *kw*.
    """
    return UserContext(**{**REQUIRED, **kw})


def kwargs_with(field, value):
    """
    Constructor arguments that set *field* to *value*, with a consistent lineage.
    """
    kw = {**REQUIRED, field: value}
    if field == "parent_request_id":
        kw["depth"] = 1
    return kw


class TestConstruction:
    def test_required_fields_are_keyword_only(self):
        """
        user_id, thread_id and run_id are keyword-only: positional arguments are
        refused with TypeError.
        """
        with pytest.raises(TypeError):
            UserContext("u-42", "t-7", "r-1")  # type: ignore[misc]

    @pytest.mark.parametrize("missing", ["user_id", "thread_id", "run_id"])
    def test_required_fields_are_required(self, missing):
        """
        Leaving out any of user_id, thread_id or run_id raises TypeError naming it.
        """
        kw = dict(REQUIRED)
        del kw[missing]
        with pytest.raises(TypeError, match=missing):
            UserContext(**kw)

    def test_defaults(self, ctx):
        """
        A root context has the given ids, a generated request_id, no connection,
        no parent, depth 0 and empty metadata.
        """
        assert (ctx.user_id, ctx.thread_id, ctx.run_id) == ("u-42", "t-7", "r-1")
        assert HEX32.fullmatch(ctx.request_id)
        assert ctx.connection_id is None
        assert ctx.parent_request_id is None
        assert ctx.depth == 0
        assert dict(ctx.metadata) == {}

    def test_request_ids_unique_and_hex(self):
        """
        Generated request ids are 32 lowercase hex characters, distinct over 100k
        creations.
        """
        ids = [UserContext(**REQUIRED).request_id for _ in range(100_000)]

        assert len(set(ids)) == 100_000
        assert all(len(i) == 32 for i in ids)
        assert re.fullmatch(r"[0-9a-f]+", "".join(ids))

    @pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
    def test_request_ids_distinct_across_fork(self):
        """
        A forked child never hands out the request ids its parent hands out,
        although both start from the same memory.
        """
        UserContext(**REQUIRED)  # make sure the parent holds a batch of ids
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover  # the child; coverage does not follow it
            try:
                ids = " ".join(UserContext(**REQUIRED).request_id for _ in range(300))
                os.write(write_fd, ids.encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        parent_ids = {UserContext(**REQUIRED).request_id for _ in range(300)}
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        child_ids = set(b"".join(chunks).decode().split())

        assert os.waitstatus_to_exitcode(status) == 0
        assert len(child_ids) == 300
        assert len(parent_ids) == 300
        assert not child_ids & parent_ids

    def test_optional_ids(self):
        """
        request_id, connection_id and parent_request_id may be given.
        """
        ctx = make(request_id="req-1", connection_id="ws-1", parent_request_id="req-0", depth=1)

        assert (ctx.request_id, ctx.connection_id, ctx.parent_request_id, ctx.depth) == (
            "req-1",
            "ws-1",
            "req-0",
            1,
        )

    def test_created_at_now(self):
        """
        created_at defaults to time.time() at creation.
        """
        before = time.time()
        ctx = UserContext(**REQUIRED)
        after = time.time()

        assert type(ctx.created_at) is float
        assert before <= ctx.created_at <= after

    def test_created_at_given(self):
        """
        A given created_at is kept; an int becomes a float.
        """
        assert make(created_at=1_700_000_000.5).created_at == 1_700_000_000.5
        ctx = make(created_at=1_700_000_000)

        assert ctx.created_at == 1_700_000_000.0
        assert type(ctx.created_at) is float

    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, -1])
    def test_created_at_invalid(self, value):
        """
        created_at must be finite and non-negative.
        """
        with pytest.raises(InvalidContextError) as ei:
            make(created_at=value)

        assert ei.value.field == "created_at"

    @pytest.mark.parametrize(
        "value",
        [2**1024, 10**400, -(10**400), 10**5000],
        ids=["2**1024", "10**400", "-10**400", "10**5000"],
    )
    @pytest.mark.parametrize("how", ["constructor", "evolve", "from_dict", "pickle"])
    def test_created_at_too_large(self, value, how, ctx):
        """
        An int too large for a float is refused with InvalidContextError naming
        created_at, by construction, evolve(), from_dict() and unpickling, not
        with OverflowError (nor ValueError from printing a 5,000-digit int).
        """
        data = {**ctx.to_dict(), "created_at": value}
        build = {
            "constructor": lambda: UserContext(**data),
            "evolve": lambda: ctx.evolve(created_at=value),
            "from_dict": lambda: UserContext.from_dict(data),
            "pickle": lambda: pickle.loads(  # noqa: S301  # a pickle we made, on purpose
                pickle.dumps(_Tampered(data))
            ),
        }[how]

        with pytest.raises(InvalidContextError, match=r"created_at: must be a finite") as ei:
            build()

        assert ei.value.field == "created_at"
        assert ei.value.value == value

    def test_too_large_int_shown_by_type(self):
        """
        An error about an int too long to print shows its type instead of
        failing while it is being built.
        """
        with pytest.raises(
            TypeError, match=r"must be a str, got int \(a value of type int too large"
        ):
            make(user_id=10**5000)
        with pytest.raises(InvalidContextError, match="got a value of type int too large to show"):
            make(created_at=10**5000)
        with pytest.raises(IsolationError, match="for user a value of type int too large"):
            make().evolve(user_id=10**5000)

    @pytest.mark.parametrize("value", ["1700000000", True, b"1", [1.0]])
    def test_created_at_wrong_type(self, value):
        """
        created_at of a type other than float or int (bool included) raises TypeError.
        """
        with pytest.raises(TypeError, match="created_at"):
            make(created_at=value)

    def test_depth_and_parent(self):
        """
        A context with a parent has a depth of at least 1, and one without a
        parent has depth 0.
        """
        assert make(parent_request_id="p-1", depth=5).depth == 5

        with pytest.raises(InvalidContextError, match="parent_request_id") as ei:
            make(depth=1)
        assert ei.value.field == "depth"

        with pytest.raises(InvalidContextError) as ei:
            make(parent_request_id="p-1")
        assert ei.value.field == "depth"

        with pytest.raises(InvalidContextError):
            make(parent_request_id="p-1", depth=0)

    @pytest.mark.parametrize("depth", [-1, 33, 10**6])
    def test_depth_out_of_range(self, depth):
        """
        depth must be between 0 and the maximum depth.
        """
        with pytest.raises(InvalidContextError, match="between 0 and 32") as ei:
            make(parent_request_id="p-1", depth=depth)

        assert ei.value.field == "depth"
        assert ei.value.value == depth

    @pytest.mark.parametrize("depth", [1.0, "1", True])
    def test_depth_wrong_type(self, depth):
        """
        A depth that is not an int raises TypeError.
        """
        with pytest.raises(TypeError, match="depth"):
            make(parent_request_id="p-1", depth=depth)

    @pytest.mark.parametrize("depth", [None, 0.0, False, ""])
    def test_falsy_depth_wrong_type(self, depth):
        """
        A falsy depth that is not an int is refused like any other, and never
        stored: a context's depth is always an int.
        """
        with pytest.raises(TypeError, match="depth"):
            make(depth=depth)


class TestIdValidation:
    @pytest.mark.parametrize("field", ID_FIELDS)
    @pytest.mark.parametrize("value", [42, 4.2, b"u-42", bytearray(b"u"), ["u"], object()])
    def test_wrong_type(self, field, value):
        """
        An id that is not a str raises TypeError naming the field and the type.
        """
        with pytest.raises(TypeError, match=rf"UserContext\.{field} must be a str") as ei:
            UserContext(**kwargs_with(field, value))

        assert type(value).__name__ in str(ei.value)

    @pytest.mark.parametrize("field", ["user_id", "thread_id", "run_id"])
    def test_required_none(self, field):
        """
        None is not a valid required id.
        """
        with pytest.raises(TypeError, match=field):
            UserContext(**kwargs_with(field, None))

    def test_str_subclass_refused_even_when_cached(self):
        """
        A str subclass is refused with TypeError, even when an equal plain str
        has passed validation before (and sits in the cache of valid ids).
        """

        class Sneaky(str):
            __slots__ = ()

        UserContext(**REQUIRED)
        assert "u-42" in _context._valid_ids

        for field in ID_FIELDS:
            with pytest.raises(TypeError, match=field):
                UserContext(**kwargs_with(field, Sneaky(REQUIRED.get(field, "u-42"))))

    @pytest.mark.parametrize("field", ID_FIELDS)
    def test_empty(self, field):
        """
        An empty id is refused.
        """
        with pytest.raises(InvalidContextError, match="must not be empty") as ei:
            UserContext(**kwargs_with(field, ""))

        assert ei.value.field == field
        assert ei.value.value == ""
        assert ei.value.reason == "must not be empty"
        assert "Pass the real id" in str(ei.value)

    @pytest.mark.parametrize("field", ID_FIELDS)
    @pytest.mark.parametrize("value", [" u", "u ", " ", "  u  "])
    def test_surrounding_whitespace(self, field, value):
        """
        Leading or trailing whitespace is refused, with the fix spelled out.
        """
        with pytest.raises(InvalidContextError, match=r"whitespace") as ei:
            UserContext(**kwargs_with(field, value))

        assert ei.value.field == field
        assert "strip()" in str(ei.value)

    def test_inner_space_allowed(self):
        """
        A space inside an id is fine.
        """
        assert make(user_id="Ada Lovelace").user_id == "Ada Lovelace"

    @pytest.mark.parametrize("field", ID_FIELDS)
    def test_length(self, field):
        """
        Ids of up to 256 characters are accepted, 257 refused.
        """
        assert getattr(UserContext(**kwargs_with(field, "a" * 256)), field) == "a" * 256

        with pytest.raises(InvalidContextError, match="at most 256 characters, not 257") as ei:
            UserContext(**kwargs_with(field, "a" * 257))
        assert ei.value.field == field
        assert "Shorten it" in str(ei.value)

    def test_long_value_message_is_short(self):
        """
        The message for a 10,000-character id names the field, shows the start
        of the value and stays short; the full value is on the exception.
        """
        value = "x" * 10_000
        with pytest.raises(InvalidContextError) as ei:
            make(user_id=value)

        message = str(ei.value)
        assert len(message) < 400
        assert "UserContext.user_id" in message
        assert "'xxxxxxxx" in message
        assert ei.value.value is value

    @pytest.mark.parametrize("field", ID_FIELDS)
    @pytest.mark.parametrize("char", CONTROL_CHARACTERS)
    @pytest.mark.parametrize("where", ["start", "middle", "end"])
    def test_control_characters(self, field, char, where):
        """
        Control, format and separator characters are refused wherever they are,
        and the message says which one and where.
        """
        value = {"start": char + "ab", "middle": "a" + char + "b", "end": "ab" + char}[where]

        with pytest.raises(InvalidContextError, match="printable") as ei:
            UserContext(**kwargs_with(field, value))

        assert ei.value.field == field
        assert repr(char) in str(ei.value)
        assert "Remove" in str(ei.value)

    @pytest.mark.parametrize("field", ID_FIELDS)
    @pytest.mark.parametrize("value", PLACEHOLDERS)
    def test_placeholders(self, field, value):
        """
        Placeholder values are refused case-insensitively.
        """
        with pytest.raises(InvalidContextError, match="placeholder") as ei:
            UserContext(**kwargs_with(field, value))

        assert ei.value.field == field
        assert ei.value.value == value
        assert "IdRules.placeholders" in str(ei.value)

    @pytest.mark.parametrize("value", sorted(DEFAULT_PLACEHOLDERS))
    def test_every_default_placeholder(self, value):
        """
        Every default placeholder is refused, in lower and upper case.
        """
        for v in (value, value.upper()):
            with pytest.raises(InvalidContextError):
                make(user_id=v)

    @pytest.mark.parametrize("value", ["nullable", "none1", "u-null", "example.com", "xx"])
    def test_placeholder_lookalikes_allowed(self, value):
        """
        Ids that merely contain a placeholder are fine.
        """
        assert make(user_id=value).user_id == value

    def test_error_is_value_error(self):
        """
        InvalidContextError is a ValueError and a UserContextError.
        """
        with pytest.raises(InvalidContextError) as ei:
            make(user_id="")

        assert isinstance(ei.value, ValueError)
        assert isinstance(ei.value, UserContextError)

    def test_message(self):
        """
        The message names the field, shows the value and says how to fix it.
        """
        with pytest.raises(InvalidContextError) as ei:
            make(thread_id="null")

        assert str(ei.value) == (
            "Invalid UserContext.thread_id: is a placeholder, not a real id; got 'null'. "
            "Pass the real id. If this value is legitimate in your service, leave it out of "
            "IdRules.placeholders and pass those rules to usercontext.configure()."
        )

    @pytest.mark.parametrize("field", ["thread_id", "run_id", "connection_id"])
    def test_child_validates(self, ctx, field):
        """
        Values passed to child() follow the same rules.
        """
        with pytest.raises(InvalidContextError) as ei:
            ctx.child(**{field: "null"})
        assert ei.value.field == field

        with pytest.raises(TypeError, match=field):
            ctx.child(**{field: 7})

    @pytest.mark.parametrize("field", ID_FIELDS[1:])
    @pytest.mark.parametrize("value", ["", " x", "a\nb", "a" * 257, "NULL"])
    def test_evolve_validates(self, ctx, field, value):
        """
        Values passed to evolve() follow the same rules.
        """
        with pytest.raises(InvalidContextError) as ei:
            ctx.evolve(**{field: value})

        assert ei.value.field == field

    @pytest.mark.parametrize("field", ID_FIELDS)
    @pytest.mark.parametrize("value", ["", " x", "a\x00b", "a" * 257, "Undefined"])
    def test_from_dict_validates(self, ctx, field, value):
        """
        from_dict() validates like construction.
        """
        data = {**ctx.to_dict(), field: value}
        if field == "parent_request_id":
            data["depth"] = 1

        with pytest.raises(InvalidContextError) as ei:
            UserContext.from_dict(data)

        assert ei.value.field == field

    @pytest.mark.parametrize("field", ID_FIELDS)
    @pytest.mark.parametrize("value", ["%00x", "%20x", "a" * 257, "none", "%E2%80%8B"])
    def test_from_headers_validates(self, ctx, field, value):
        """
        from_headers() validates decoded ids like construction.
        """
        headers = {**ctx.to_headers(), "x-usercontext-" + field.replace("_", "-"): value}
        if field == "parent_request_id":
            headers["x-usercontext-depth"] = "1"

        with pytest.raises(InvalidContextError) as ei:
            UserContext.from_headers(headers)

        assert ei.value.field == field


class TestIdRules:
    def test_defaults(self):
        """
        The default rules allow 256 characters, refuse the default placeholders
        and have no pattern.
        """
        rules = IdRules()

        assert (rules.max_length, rules.placeholders, rules.pattern) == (
            256,
            DEFAULT_PLACEHOLDERS,
            None,
        )
        assert _context.current_rules() == (rules, 32)

    def test_max_length(self):
        """
        configure() with a shorter max_length refuses longer ids.
        """
        usercontext.configure(id_rules=IdRules(max_length=8))

        assert make(user_id="a" * 8).user_id == "a" * 8
        with pytest.raises(InvalidContextError, match="at most 8 characters, not 9"):
            make(user_id="a" * 9)

    def test_longer_max_length(self):
        """
        configure() with a longer max_length accepts longer ids.
        """
        usercontext.configure(id_rules=IdRules(max_length=1000))

        assert len(make(user_id="a" * 1000).user_id) == 1000

    def test_placeholders_lowercased(self):
        """
        Custom placeholders are lowercased and replace the defaults.
        """
        rules = IdRules(placeholders=frozenset({"ACME", "Anonymous"}))
        assert rules.placeholders == frozenset({"acme", "anonymous"})
        usercontext.configure(id_rules=rules)

        for value in ("acme", "ACME", "aNoNyMoUs"):
            with pytest.raises(InvalidContextError, match="placeholder"):
                make(user_id=value)
        assert make(user_id="null").user_id == "null"
        assert make(user_id="anonymous2").user_id == "anonymous2"

    def test_no_placeholders(self):
        """
        An empty set of placeholders refuses none.
        """
        usercontext.configure(id_rules=IdRules(placeholders=frozenset()))

        assert make(user_id="none", thread_id="NULL", run_id="-").run_id == "-"

    def test_pattern_fullmatch(self):
        """
        With a pattern, ids must match it in full; the message names the pattern.
        """
        usercontext.configure(id_rules=IdRules(pattern=r"[a-z]-[0-9]+"))

        assert make(user_id="u-1").user_id == "u-1"
        for value in ("u-1x", "xu-1", "U-1", "u-"):
            with pytest.raises(InvalidContextError, match=r"\[a-z\]-\[0-9\]\+") as ei:
                make(user_id=value)
            assert ei.value.field == "user_id"

    def test_pattern_other_rules_first(self):
        """
        With a pattern, the other rules still apply and are reported first.
        """
        usercontext.configure(id_rules=IdRules(pattern=r".*"))

        with pytest.raises(InvalidContextError, match="placeholder"):
            make(user_id="null")
        with pytest.raises(InvalidContextError, match="whitespace"):
            make(user_id=" u")

    def test_pattern_round_trip(self):
        """
        A context created under a pattern survives to_dict/from_dict, pickling
        and headers: the ids the library generates itself must not be refused
        when the context comes back.
        """
        usercontext.configure(id_rules=IdRules(pattern=r"[a-z]-[0-9]+"))
        ctx = make(user_id="u-1", thread_id="t-1", run_id="r-1")
        child = ctx.child()

        assert UserContext.from_dict(ctx.to_dict()) == ctx
        assert UserContext.from_dict(child.to_dict()) == child
        assert pickle.loads(pickle.dumps(child)) == child  # noqa: S301  # our own pickle
        assert UserContext.from_headers(child.to_headers()) == child

    def test_configure_clears_cache(self):
        """
        An id accepted (and cached) under the old rules is refused under
        stricter ones, and configure() empties the cache.
        """
        assert make(user_id="abc-1").user_id == "abc-1"
        assert "abc-1" in _context._valid_ids

        usercontext.configure(id_rules=IdRules(pattern=r"u-[0-9]+"))

        assert not _context._valid_ids
        with pytest.raises(InvalidContextError, match="pattern"):
            make(user_id="abc-1", thread_id="u-2", run_id="u-3")

    def test_cache_bounded(self):
        """
        The cache of valid ids never holds more than its bound, whatever the
        number of distinct ids.
        """
        sizes = set()
        held = set()
        for i in range(10_000):
            UserContext(user_id=f"user-{i}", thread_id=f"thread-{i}", run_id="r")
            sizes.add(len(_context._valid_ids))
            held.add(len(_context._valid_ids) + len(_context._old_ids))

        assert _context._VALID_IDS_MAX == 4096
        assert 4000 <= max(sizes) <= 4096
        # Both generations together: the whole cache.
        assert max(held) == _context._ID_CACHE_MAX == 8192

    def test_cache_bound_in_readme(self):
        """
        The README states the bound of the id cache the code enforces.
        """
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
        figures = re.findall(
            r"cache\s+of\s+already\s+validated\s+ids\s+is\s+capped\s+at\s+([\d,]+)\s+entries",
            readme,
        )

        assert figures == [f"{_context._ID_CACHE_MAX:,}"]

    @pytest.mark.parametrize("max_length", [0, -1, 1.5, "256", True, None])
    def test_bad_max_length(self, max_length):
        """
        max_length must be a positive int.
        """
        with pytest.raises(ValueError, match=r"IdRules\.max_length must be a positive int"):
            IdRules(max_length=max_length)

    @pytest.mark.parametrize("placeholders", [{"null"}, ["null"], "null", frozenset({1})])
    def test_bad_placeholders(self, placeholders):
        """
        placeholders must be a frozenset of str.
        """
        with pytest.raises(TypeError, match=r"IdRules\.placeholders must be a frozenset"):
            IdRules(placeholders=placeholders)

    @pytest.mark.parametrize("pattern", ["(", "[a-", "*", 42])
    def test_bad_pattern(self, pattern):
        """
        pattern must be a valid regular expression.
        """
        with pytest.raises(ValueError, match=r"IdRules\.pattern"):
            IdRules(pattern=pattern)

    @pytest.mark.parametrize("rules", [{"max_length": 8}, "strict", 8])
    def test_configure_needs_id_rules(self, rules):
        """
        configure(id_rules=...) takes an IdRules instance only, and keeps the
        rules in force when refusing.
        """
        with pytest.raises(TypeError, match="IdRules"):
            usercontext.configure(id_rules=rules)

        assert _context.current_rules() == (IdRules(), 32)

    @pytest.mark.parametrize("max_depth", [-1, 1.0, "3", True])
    def test_configure_bad_max_depth(self, max_depth):
        """
        configure(max_depth=...) takes a non-negative int.
        """
        with pytest.raises(ValueError, match="max_depth must be a non-negative int"):
            usercontext.configure(max_depth=max_depth)

        assert _context.current_rules()[1] == 32

    def test_configure_none_keeps(self):
        """
        Arguments left out of configure() keep their current value.
        """
        rules = IdRules(max_length=10)
        usercontext.configure(id_rules=rules, max_depth=3)
        usercontext.configure()
        usercontext.configure(max_depth=4)

        assert _context.current_rules() == (rules, 4)

    def test_described_rules(self):
        """
        described_rules() gives the rules in force as text, updated by every
        configure() call; ContextExecutor sends it to its worker processes.
        """
        assert _context.described_rules() == (
            "IdRules(max_length=256, placeholders=frozenset({'-', 'default', 'example', "
            "'n/a', 'nil', 'none', 'null', 'placeholder', 'registry', 'temp', 'tmp', "
            "'undefined', 'unknown', 'xxx'}), pattern=None) with max_depth=32"
        )
        usercontext.configure(id_rules=IdRules(placeholders=frozenset(), pattern="u-[0-9]+"))
        usercontext.configure(max_depth=4)

        assert _context.described_rules() == (
            "IdRules(max_length=256, placeholders=frozenset({}), pattern='u-[0-9]+') "
            "with max_depth=4"
        )

    def test_described_rules_same_in_every_process(self):
        """
        Equal rules are described by the same text in processes with different
        hash seeds, where their placeholders iterate in different orders.
        """
        script = (
            "import usercontext as uc, usercontext._context as c\n"
            "p = frozenset(f'p{i}' for i in range(40))\n"
            "uc.configure(id_rules=uc.IdRules(placeholders=p))\n"
            "print(list(uc.IdRules(placeholders=p).placeholders)[:5], c.described_rules())\n"
        )
        outputs = [
            subprocess.run(  # noqa: S603  # our own interpreter
                [sys.executable, "-c", script],
                env={**os.environ, "PYTHONHASHSEED": seed},
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
            for seed in ("1", "2")
        ]
        orders = [out.partition("] ")[0] for out in outputs]
        described = [out.partition("] ")[2] for out in outputs]

        assert orders[0] != orders[1]
        assert described[0] == described[1]
        assert "'p0', 'p1', 'p10', 'p11'" in described[0]

    def test_rules_are_frozen(self):
        """
        IdRules are immutable.
        """
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            IdRules().max_length = 3  # type: ignore[misc]


class TestMetadata:
    def test_shared_empty(self):
        """
        Contexts without metadata share one empty read-only mapping.
        """
        empty = UserContext(**REQUIRED).metadata

        assert UserContext(**REQUIRED).metadata is empty
        assert make(metadata={}).metadata is empty
        assert make(metadata=None).metadata is empty
        assert make(metadata=MappingProxyType({})).metadata is empty
        assert make(metadata=collections.OrderedDict()).metadata is empty
        assert isinstance(empty, MappingProxyType)
        assert len(empty) == 0

    def test_conversion(self):
        """
        Lists become tuples, sets frozensets and dicts read-only mappings, at
        every level; scalars are kept.
        """
        meta = {
            "plan": "pro",
            "n": 3,
            "ratio": 0.5,
            "flag": True,
            "nothing": None,
            "raw": b"\x00",
            "tags": ["a", ["b", "c"]],
            "roles": {"admin", "dev"},
            "fz": frozenset({1}),
            "tup": (1, [2]),
            "nested": {"a": {"b": [1, {"c": {2}}]}},
            "od": collections.OrderedDict(x=1),
        }
        md = make(metadata=meta).metadata

        assert md["plan"] == "pro"
        assert md["raw"] == b"\x00"
        assert md["tags"] == ("a", ("b", "c"))
        assert md["roles"] == frozenset({"admin", "dev"})
        assert type(md["roles"]) is frozenset
        assert md["fz"] == frozenset({1})
        assert md["tup"] == (1, (2,))
        assert isinstance(md, MappingProxyType)
        assert isinstance(md["nested"], MappingProxyType)
        assert isinstance(md["nested"]["a"], MappingProxyType)
        assert md["nested"]["a"]["b"][0] == 1
        assert isinstance(md["nested"]["a"]["b"][1], MappingProxyType)
        assert md["nested"]["a"]["b"][1]["c"] == frozenset({2})
        assert type(md["od"]) is MappingProxyType
        assert md == {
            **meta,
            "tags": ("a", ("b", "c")),
            "roles": frozenset({"admin", "dev"}),
            "tup": (1, (2,)),
            "nested": {"a": {"b": (1, {"c": frozenset({2})})}},
        }

    def test_input_is_copied(self):
        """
        Changing the dict (or the lists in it) after construction does not
        change the context.
        """
        meta = {"tags": ["a"], "inner": {"x": 1}}
        ctx = make(metadata=meta)
        meta["tags"].append("b")
        meta["inner"]["x"] = 2
        meta["new"] = 1

        assert ctx.metadata == {"tags": ("a",), "inner": {"x": 1}}

    @pytest.mark.parametrize(
        ("meta", "path"),
        [
            ({"a": bytearray(b"x")}, "metadata['a']"),
            ({"a": object()}, "metadata['a']"),
            ({"a": [1, [2, bytearray()]]}, r"metadata['a'][1][1]"),
            ({"a": {"b": {"c": []}, "d": [{1, 2}, {"e": 1j}]}}, "metadata['a']['d'][1]['e']"),
            ({"a": {1, 2, 3.5j}}, "metadata['a'][...]"),
            ({"a": type("Str", (str,), {})("x")}, "metadata['a']"),
        ],
    )
    def test_refused_types(self, meta, path):
        """
        Values of any other type raise TypeError naming the key path.
        """
        with pytest.raises(TypeError) as ei:
            make(metadata=meta)

        assert f"UserContext.{path} must be an immutable value" in str(ei.value)

    @pytest.mark.parametrize("meta", [[("a", 1)], "a=1", 3, ("a",)])
    def test_not_a_mapping(self, meta):
        """
        Metadata that is not a mapping raises TypeError.
        """
        with pytest.raises(TypeError, match=r"UserContext\.metadata must be a mapping"):
            make(metadata=meta)

    def test_nesting_limit(self):
        """
        Containers nested 8 deep are fine, deeper are refused.
        """
        ok: object = 1
        for _ in range(8):
            ok = [ok]
        assert make(metadata={"a": ok}).metadata["a"]

        too_deep = [ok]
        with pytest.raises(InvalidContextError, match="deeper than 8") as ei:
            make(metadata={"a": too_deep})
        assert ei.value.field.startswith("metadata['a']")

    @pytest.mark.parametrize("key", ["", 1, None, b"k", ("k",)])
    def test_bad_keys(self, key):
        """
        Keys must be non-empty str.
        """
        with pytest.raises(InvalidContextError, match="non-empty str") as ei:
            make(metadata={key: 1})

        assert ei.value.field == "metadata key"
        assert ei.value.value == key

    def test_bad_nested_key(self):
        """
        Nested mapping keys follow the same rule, and the path names them.
        """
        with pytest.raises(InvalidContextError) as ei:
            make(metadata={"a": {"b": {2: 1}}})

        assert ei.value.field == "metadata['a']['b'] key"

    def test_entries_limit(self):
        """
        At most 64 entries are allowed.
        """
        assert len(make(metadata={f"k{i}": i for i in range(64)}).metadata) == 64

        with pytest.raises(InvalidContextError, match="at most 64 entries, not 65") as ei:
            make(metadata={f"k{i}": i for i in range(65)})
        assert ei.value.field == "metadata"

    @pytest.mark.parametrize("key", ALL_FIELDS)
    def test_reserved_keys(self, key):
        """
        Keys that name a field are refused.
        """
        with pytest.raises(InvalidContextError, match="reserved") as ei:
            make(metadata={"ok": 1, key: "x"})

        assert ei.value.field == "metadata key"
        assert ei.value.value == key

    def test_reserved_keys_nested_allowed(self):
        """
        Field names are fine as keys of nested mappings.
        """
        assert make(metadata={"origin": {"user_id": "u-1"}}).metadata["origin"]["user_id"] == "u-1"


class TestImmutability:
    @pytest.mark.parametrize("field", [*ALL_FIELDS, "new_attribute"])
    def test_setattr(self, ctx, field):
        """
        Setting any attribute raises FrozenInstanceError, an AttributeError.
        """
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(ctx, field, "x")

        assert issubclass(attrs.exceptions.FrozenInstanceError, AttributeError)
        assert ctx.user_id == "u-42"

    @pytest.mark.parametrize("field", ALL_FIELDS)
    def test_delattr(self, ctx, field):
        """
        Deleting any attribute raises.
        """
        with pytest.raises(AttributeError):
            delattr(ctx, field)

        assert hasattr(ctx, field)

    def test_set_class(self, ctx):
        """
        The class of a context cannot be swapped.
        """
        with pytest.raises(AttributeError):
            ctx.__class__ = object  # type: ignore[assignment]

        assert type(ctx) is UserContext

    def test_no_dict(self, ctx):
        """
        A context has no __dict__ to sneak state into.
        """
        assert not hasattr(ctx, "__dict__")

    def test_metadata(self):
        """
        Metadata mappings, nested ones too, refuse item assignment and
        deletion, and their containers cannot be changed.
        """
        ctx = make(metadata={"a": 1, "n": {"b": [1]}, "s": {1}})

        with pytest.raises(TypeError):
            ctx.metadata["a"] = 2  # type: ignore[index]
        with pytest.raises(TypeError):
            ctx.metadata["new"] = 2  # type: ignore[index]
        with pytest.raises(TypeError):
            del ctx.metadata["a"]  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            ctx.metadata["n"]["b"] = 2
        with pytest.raises(AttributeError):
            ctx.metadata["n"]["b"].append(2)
        with pytest.raises(AttributeError):
            ctx.metadata["s"].add(2)
        with pytest.raises(AttributeError):
            ctx.metadata.update(a=3)  # type: ignore[attr-defined]
        assert ctx.metadata == {"a": 1, "n": {"b": (1,)}, "s": frozenset({1})}

    def test_shared_empty_is_read_only(self):
        """
        The shared empty mapping cannot be filled.
        """
        with pytest.raises(TypeError):
            UserContext(**REQUIRED).metadata["x"] = 1  # type: ignore[index]

        assert len(UserContext(**REQUIRED).metadata) == 0


class TestEquality:
    def test_equal_fields_equal(self):
        """
        Contexts with equal fields are equal and hash equally.
        """
        kw = {**REQUIRED, "request_id": "req-1", "created_at": 1.5, "metadata": {"a": [1]}}
        a, b = UserContext(**kw), UserContext(**kw)

        assert a is not b
        assert a == b
        assert hash(a) == hash(b)
        assert len({a, b}) == 1
        assert {a: 1}[b] == 1

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("user_id", "u-43"),
            ("thread_id", "t-8"),
            ("run_id", "r-2"),
            ("request_id", "req-2"),
            ("connection_id", "ws-1"),
            ("created_at", 2.5),
            ("metadata", {"a": [2]}),
        ],
    )
    def test_one_field_differs(self, field, value):
        """
        Contexts differing in any one field are unequal.
        """
        kw = {**REQUIRED, "request_id": "req-1", "created_at": 1.5, "metadata": {"a": [1]}}

        assert UserContext(**kw) != UserContext(**{**kw, field: value})

    def test_lineage_differs(self):
        """
        Contexts differing in lineage are unequal.
        """
        kw = {**REQUIRED, "request_id": "req-1", "created_at": 1.5}

        assert UserContext(**kw, parent_request_id="p", depth=1) != UserContext(
            **kw, parent_request_id="p", depth=2
        )
        assert UserContext(**kw, parent_request_id="p", depth=1) != UserContext(
            **kw, parent_request_id="q", depth=1
        )

    def test_hashable_with_nested_metadata(self):
        """
        A context is hashable even though its metadata mapping is not.
        """
        ctx = make(metadata={"a": {"b": [1]}})

        assert isinstance(hash(ctx), int)
        with pytest.raises(TypeError):
            hash(ctx.metadata)

    def test_not_equal_to_other_types(self, ctx):
        """
        A context is not equal to its dict form.
        """
        assert ctx != ctx.to_dict()
        assert ctx != ctx.request_id


class TestChild:
    def test_lineage(self, ctx):
        """
        A child gets a new request_id, links to its parent, is one deeper and
        keeps the other fields.
        """
        ctx = ctx.evolve(connection_id="ws-1", metadata={"plan": "pro"}, created_at=1.0)
        before = time.time()
        child = ctx.child()

        assert type(child) is UserContext
        assert HEX32.fullmatch(child.request_id)
        assert child.request_id != ctx.request_id
        assert child.parent_request_id == ctx.request_id
        assert child.depth == 1
        assert before <= child.created_at <= time.time()
        assert (child.user_id, child.thread_id, child.run_id, child.connection_id) == (
            "u-42",
            "t-7",
            "r-1",
            "ws-1",
        )
        assert child.metadata is ctx.metadata

        grandchild = child.child()
        assert grandchild.parent_request_id == child.request_id
        assert grandchild.depth == 2

    def test_changes(self, ctx):
        """
        thread_id, run_id, connection_id and metadata can change; metadata is
        replaced as a whole and frozen.
        """
        parent = ctx.evolve(connection_id="ws-1", metadata={"a": 1})
        child = parent.child(
            thread_id="t-9", run_id="r-1.tool", connection_id="ws-2", metadata={"b": [1]}
        )

        assert (child.thread_id, child.run_id, child.connection_id) == (
            "t-9",
            "r-1.tool",
            "ws-2",
        )
        assert child.metadata == {"b": (1,)}
        assert isinstance(child.metadata, MappingProxyType)
        assert parent.child(connection_id=None).connection_id is None
        assert parent.child(metadata=None).metadata is UserContext(**REQUIRED).metadata

    def test_same_user_id_allowed(self, ctx):
        """
        Passing the same user_id is allowed.
        """
        assert ctx.child(user_id="u-42").user_id == "u-42"

    @pytest.mark.parametrize("user_id", ["u-43", "U-42", "", 42])
    def test_user_change_refused(self, ctx, user_id):
        """
        A child for another user raises IsolationError.
        """
        with pytest.raises(IsolationError, match="new root UserContext"):
            ctx.child(user_id=user_id)

    @pytest.mark.parametrize(
        "field", ["request_id", "parent_request_id", "depth", "created_at", "plan"]
    )
    def test_fixed_fields(self, ctx, field):
        """
        Other fields cannot be set on a child: TypeError naming the field and
        what is accepted.
        """
        with pytest.raises(TypeError, match=rf"cannot set {field}; it accepts connection_id"):
            ctx.child(**{field: "x"})

    def test_max_depth(self, ctx):
        """
        32 levels of children are allowed by default; the 33rd is refused.
        """
        c = ctx
        for _ in range(32):
            c = c.child()
        assert c.depth == 32

        with pytest.raises(InvalidContextError, match="maximum depth of 32") as ei:
            c.child()
        assert ei.value.field == "depth"
        assert ei.value.value == 33

    def test_configured_max_depth(self, ctx):
        """
        configure(max_depth=...) changes the limit.
        """
        usercontext.configure(max_depth=2)
        assert ctx.child().child().depth == 2
        with pytest.raises(InvalidContextError, match="maximum depth of 2"):
            ctx.child().child().child()

        usercontext.configure(max_depth=0)
        with pytest.raises(InvalidContextError):
            ctx.child()

        usercontext.configure(max_depth=40)
        c = ctx
        for _ in range(40):
            c = c.child()
        assert c.depth == 40


class TestEvolve:
    def test_copy_keeps_request_id(self, ctx):
        """
        evolve() returns a new, equal-but-changed context with the same
        request_id and lineage.
        """
        new = ctx.evolve(run_id="r-2")

        assert new is not ctx
        assert type(new) is UserContext
        assert new.run_id == "r-2"
        assert ctx.run_id == "r-1"
        assert (new.request_id, new.parent_request_id, new.depth, new.created_at) == (
            ctx.request_id,
            None,
            0,
            ctx.created_at,
        )
        assert ctx.evolve() == ctx

    def test_every_field(self, ctx):
        """
        Every field but user_id can change.
        """
        new = ctx.evolve(
            thread_id="t-9",
            run_id="r-9",
            request_id="req-9",
            connection_id="ws-9",
            parent_request_id="p-9",
            depth=3,
            created_at=12,
            metadata={"a": {1}},
        )

        assert new.to_dict() == {
            "user_id": "u-42",
            "thread_id": "t-9",
            "run_id": "r-9",
            "request_id": "req-9",
            "connection_id": "ws-9",
            "parent_request_id": "p-9",
            "depth": 3,
            "created_at": 12.0,
            "metadata": {"a": frozenset({1})},
        }
        assert new.evolve(connection_id=None).connection_id is None
        assert new.evolve(metadata=None).metadata == {}

    def test_lineage_consistency(self, ctx):
        """
        depth is 0 exactly when parent_request_id is None, also through evolve().
        """
        child = ctx.child()

        with pytest.raises(InvalidContextError, match="parent_request_id"):
            ctx.evolve(depth=1)
        with pytest.raises(InvalidContextError):
            ctx.evolve(parent_request_id="p-1")
        with pytest.raises(InvalidContextError):
            child.evolve(parent_request_id=None)
        with pytest.raises(InvalidContextError):
            child.evolve(depth=0)
        with pytest.raises(InvalidContextError):
            child.evolve(depth=33)
        with pytest.raises(TypeError, match="depth"):
            child.evolve(depth=1.0)
        assert child.evolve(parent_request_id=None, depth=0).parent_request_id is None
        assert ctx.evolve(parent_request_id="p", depth=4).depth == 4

    def test_user_change_refused(self, ctx):
        """
        evolve() to another user raises IsolationError; the same user is fine.
        """
        with pytest.raises(IsolationError, match="through evolve"):
            ctx.evolve(user_id="u-43")

        assert ctx.evolve(user_id="u-42", run_id="r-2").run_id == "r-2"

    @pytest.mark.parametrize("field", ["plan", "userid", "__class__"])
    def test_unknown_field(self, ctx, field):
        """
        An unknown field raises TypeError naming it.
        """
        with pytest.raises(TypeError, match=rf"evolve\(\) cannot set {re.escape(field)}"):
            ctx.evolve(**{field: "x"})

    @pytest.mark.parametrize(
        ("field", "value", "error"),
        [
            ("thread_id", None, TypeError),
            ("request_id", None, TypeError),
            ("created_at", "now", TypeError),
            ("created_at", -1.0, InvalidContextError),
            ("metadata", [1], TypeError),
            ("metadata", {"user_id": 1}, InvalidContextError),
        ],
    )
    def test_bad_values(self, ctx, field, value, error):
        """
        evolve() validates every changed value.
        """
        with pytest.raises(error):
            ctx.evolve(**{field: value})


class TestRepr:
    def test_repr(self):
        """
        repr shows the ids, the lineage and only the metadata keys.
        """
        ctx = make(
            request_id="req-1",
            connection_id="ws-1",
            parent_request_id="p-1",
            depth=1,
            metadata={"api_key": "sk-SECRET-123", "nested": {"pw": "hunter2"}},
        )

        assert repr(ctx) == (
            "UserContext(user_id='u-42', thread_id='t-7', run_id='r-1', request_id='req-1', "
            "connection_id='ws-1', parent_request_id='p-1', depth=1, "
            "metadata_keys=('api_key', 'nested'))"
        )
        for text in (repr(ctx), str(ctx), f"{ctx}", repr([ctx])):
            assert "SECRET" not in text
            assert "hunter2" not in text

    def test_repr_minimal(self):
        """
        A root context without connection or metadata shows neither.
        """
        ctx = make(request_id="req-1")

        assert repr(ctx) == (
            "UserContext(user_id='u-42', thread_id='t-7', run_id='r-1', "
            "request_id='req-1', depth=0)"
        )


class TestPickle:
    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    def test_round_trip(self, protocol):
        """
        A pickled context unpickles equal, on every protocol.
        """
        ctx = make(connection_id="ws", metadata={"a": [1, {"b": {2}}], "c": b"x"}).child()

        assert pickle.loads(pickle.dumps(ctx, protocol)) == ctx  # noqa: S301  # our own pickle

    def test_copy(self, ctx):
        """
        copy.copy and copy.deepcopy give equal contexts.
        """
        ctx = ctx.evolve(metadata={"a": [1, {"b": 2}]})

        assert copy.copy(ctx) == ctx
        assert copy.deepcopy(ctx) == ctx
        assert copy.deepcopy([ctx])[0] == ctx

    def test_unpickling_validates(self):
        """
        Unpickling goes through validation: a tampered pickle is refused.
        """
        data = pickle.dumps(make(user_id="qwzy"))
        assert data.count(b"qwzy") == 1

        tampered = data.replace(b"qwzy", b"NULL")
        with pytest.raises(InvalidContextError, match="placeholder") as ei:
            pickle.loads(tampered)  # noqa: S301  # a pickle we made, on purpose
        assert ei.value.field == "user_id"

    def test_reduce_goes_through_from_dict(self, ctx):
        """
        __reduce__ rebuilds from the dict form.
        """
        fn, (cls, data) = ctx.__reduce__()

        assert cls is UserContext
        assert data == ctx.to_dict()
        assert fn(cls, data) == ctx
        with pytest.raises(InvalidContextError):
            fn(cls, {**data, "depth": 1})

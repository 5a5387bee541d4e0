"""
Fuzzing of every field and every decoder of `UserContext`: whatever comes in,
the result is a valid context, or `InvalidContextError` or `TypeError` naming
the field at fault. No other exception type ever escapes.
"""

from __future__ import annotations

import math
import pickle

from collections.abc import Mapping
from types import MappingProxyType

import pytest

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from usercontext import InvalidContextError, UserContext, _codec, _context


# Each example costs microseconds; hypothesis's own work dominates. 120 examples
# per test keep the whole file at a few seconds on a loaded 2-core machine.
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# The fuzzing covers every field the class has: its own lists of them.
ID_FIELDS = _codec.ID_FIELDS
FIELDS = _codec.FIELDS
CHILD_FIELDS = ("thread_id", "run_id", "connection_id", "metadata")
HEADER_OF = {f: "x-usercontext-" + f.replace("_", "-") for f in FIELDS}
BASE = {"user_id": "u-1", "thread_id": "t-1", "run_id": "r-1"}

# Ints a float cannot hold, and one longer than sys.get_int_max_str_digits()
# allows to print.
huge_ints = st.builds(
    lambda exponent, sign: sign * 10**exponent,
    st.sampled_from([309, 400, 5000]),
    st.sampled_from([1, -1]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(),
    st.text(),
    st.binary(),
)
hashables = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, st.text(), st.binary())
values = st.recursive(
    scalars | st.builds(object),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), inner, max_size=3),
        st.dictionaries(st.text(max_size=5), inner, max_size=3).map(MappingProxyType),
        st.frozensets(hashables, max_size=3),
        st.sets(hashables, max_size=3),
    ),
    max_leaves=8,
)
# Values that are often valid, so that the fuzzing also reaches the paths past
# the first check of each field.
plausible = {
    **dict.fromkeys(ID_FIELDS, st.one_of(st.none(), st.text(min_size=1, max_size=12))),
    "depth": st.integers(min_value=-2, max_value=40),
    "created_at": st.one_of(st.floats(), st.integers(), huge_ints),
    "metadata": st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=8), values, max_size=4),
    ),
}


def field_value(field: str) -> st.SearchStrategy[object]:
    """
    Values for *field*: often plausible, sometimes anything at all.
    """
    return st.one_of(plausible[field], values)


one_field = st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), field_value(f)))
some_fields = st.fixed_dictionaries({}, optional={field: field_value(field) for field in FIELDS})


def same(a: object, b: object) -> bool:
    """
    Compare decoded values, with NaN equal to itself.
    """
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def assert_valid(ctx: object) -> None:
    """
    *ctx* is a context that every decoder gives back unchanged.
    """
    assert type(ctx) is UserContext
    assert math.isfinite(ctx.created_at)
    assert ctx.created_at >= 0
    assert 0 <= ctx.depth <= 32
    assert (ctx.depth == 0) == (ctx.parent_request_id is None)
    assert same(UserContext.from_dict(ctx.to_dict()).to_dict(), ctx.to_dict())
    assert same(pickle.loads(pickle.dumps(ctx)).to_dict(), ctx.to_dict())  # noqa: S301  # ours
    try:
        headers = ctx.to_headers()
    except InvalidContextError as e:  # metadata that JSON cannot carry, or too large
        refused: InvalidContextError | None = e
    else:
        refused = None
        assert same(UserContext.from_headers(headers).to_dict(), ctx.to_dict())
    assert refused is None or refused.field in ("metadata", "headers")


def assert_names(error: BaseException, fields: object) -> None:
    """
    *error* is one the contract allows and names one of *fields*.
    """
    names = (fields,) if isinstance(fields, str) else tuple(fields)
    if isinstance(error, InvalidContextError):
        named = f"{error.field}: {error}"
    else:
        assert type(error) is TypeError, f"{type(error).__name__}: {error}"
        named = str(error)
    assert any(name in named for name in names), f"{names} not named in {named!r}: {error}"


def check(build: object, fields: object) -> None:
    """
    Call *build*: it returns a valid context, or raises an allowed error
    naming one of *fields*.
    """
    try:
        ctx = build()  # type: ignore[operator]
    except (InvalidContextError, TypeError) as e:
        assert_names(e, fields)
        return
    assert_valid(ctx)


class _Forged:
    """
    Pickles as a `UserContext` holding *data*, as a tampered pickle would.
    """

    def __init__(self, data: object) -> None:
        self.data = data

    def __reduce__(self) -> tuple[object, ...]:
        return (_context._from_dict, (UserContext, self.data))


@pytest.fixture(name="root", scope="module")
def _root():
    return UserContext(**BASE, connection_id="c-1", metadata={"k": "v"})


class TestFuzzFields:
    @FUZZ
    @given(field_and_value=one_field)
    def test_constructor_one_field(self, field_and_value):
        """
        Any value of any one field constructs a valid context or is refused
        naming that field.
        """
        field, value = field_and_value
        kw = {**BASE, field: value}
        if field == "parent_request_id" and value is not None:
            kw["depth"] = 1
        check(lambda: UserContext(**kw), field)

    @FUZZ
    @given(fields=some_fields)
    def test_constructor_many_fields(self, fields):
        """
        Any values in several fields at once construct a valid context or are
        refused naming one of them.
        """
        check(lambda: UserContext(**{**BASE, **fields}), list(fields))

    @FUZZ
    @given(field_and_value=one_field)
    def test_evolve(self, field_and_value, root):
        """
        evolve() with any value of any field (but another user) gives a valid
        context or is refused naming that field.
        """
        field, value = field_and_value
        if field == "user_id":
            value = root.user_id if value is None else value
            try:
                check(lambda: root.evolve(user_id=value), field)
            except _context.IsolationError:
                assert value != root.user_id
            return
        check(lambda: root.evolve(**{field: value}), field)

    @FUZZ
    @given(
        changes=st.fixed_dictionaries(
            {}, optional={field: field_value(field) for field in CHILD_FIELDS}
        )
    )
    def test_child(self, changes, root):
        """
        child() with any values of the fields it may change gives a valid
        context or is refused naming one of them.
        """
        check(lambda: root.child(**changes), list(changes))

    @pytest.mark.parametrize("field", ["request_id", "parent_request_id", "depth", "created_at"])
    def test_child_refuses_lineage(self, field, root):
        """
        child() refuses the fields it sets itself, naming them.
        """
        with pytest.raises(TypeError, match=rf"cannot set {field}"):
            root.child(**{field: 1})


class TestFuzzDecoders:
    @FUZZ
    @given(
        fields=some_fields,
        extra=st.dictionaries(st.one_of(st.text(), st.integers()), values, max_size=2),
        drop=st.sets(st.sampled_from(list(BASE)), max_size=2),
    )
    def test_from_dict(self, fields, extra, drop):
        """
        from_dict() of any mapping, with fields missing, extra or of any value,
        gives a valid context or is refused naming a field or key.
        """
        data = {**BASE, **fields, **extra}
        for key in drop:
            data.pop(key, None)
        check(lambda: UserContext.from_dict(data), [*map(str, data), *BASE])

    @FUZZ
    @given(data=st.one_of(values, st.lists(st.tuples(st.text(), values), max_size=3)))
    def test_from_dict_not_a_mapping(self, data):
        """
        from_dict() of anything else is refused with TypeError or
        InvalidContextError.
        """
        check(lambda: UserContext.from_dict(data), [*FIELDS, "mapping", "user_id"])

    @FUZZ
    @given(fields=some_fields)
    def test_pickle(self, fields):
        """
        A tampered pickle with any values gives a valid context or is refused
        naming one of them, as construction would.
        """
        try:
            payload = pickle.dumps(_Forged({**BASE, **fields}))
        except (TypeError, pickle.PicklingError):  # a mappingproxy or a bare object
            assume(False)
        check(lambda: pickle.loads(payload), list(fields))  # noqa: S301  # a pickle we forged

    @FUZZ
    @given(
        field=st.sampled_from(FIELDS),
        raw=st.one_of(
            st.text(),
            st.binary(),
            st.integers().map(str),
            st.floats().map(repr),
            st.just("9" * 400),
            st.sampled_from(["1e400", "-1e400", "nan", "inf", "1_0", "1" * 5000, "[1]", "{}"]),
        ),
        as_bytes=st.booleans(),
    )
    def test_from_headers_one_header(self, field, raw, as_bytes):
        """
        Any value of any one header decodes into a valid context or is refused
        naming its field.
        """
        headers = {HEADER_OF[f]: v for f, v in BASE.items()}
        headers[HEADER_OF[field]] = raw
        if field == "parent_request_id":
            headers[HEADER_OF["depth"]] = "1"
        if as_bytes:
            pairs = [
                (k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()
            ]
        else:
            pairs = [
                (k, v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in headers.items()
            ]
        check(lambda: UserContext.from_headers(pairs), [field, HEADER_OF[field]])

    @FUZZ
    @given(
        pairs=st.lists(
            st.one_of(
                st.tuples(
                    st.one_of(st.sampled_from(list(HEADER_OF.values())), st.text(), st.binary()),
                    st.one_of(st.text(), st.binary(), values),
                ),
                values,
            ),
            max_size=12,
        )
    )
    def test_from_headers_anything(self, pairs):
        """
        Any list of headers, pairs or not, decodes into a valid context or is
        refused with InvalidContextError or TypeError naming a header or field.
        """
        names = [*FIELDS, *HEADER_OF.values(), "headers", "x-usercontext-", "from_headers"]
        check(
            lambda: UserContext.from_headers(
                [*((HEADER_OF[f], v) for f, v in BASE.items()), *pairs]
            ),
            names,
        )

from __future__ import annotations

import copy
import inspect
import pickle
import threading

from types import MappingProxyType

import pytest

import usercontext

from usercontext import InvalidContextError, UserContext, exceptions


def public_exceptions() -> list[type[BaseException]]:
    """
    Every exception class usercontext.exceptions exports, found by looking.
    """
    found = [getattr(exceptions, name) for name in exceptions.__all__]
    return [obj for obj in found if isinstance(obj, type) and issubclass(obj, BaseException)]


# Errors built with positional arguments that their __str__ reads back.
SAMPLES = {
    exceptions.QuotaError: ("u-1", 2, "key", 2, 0.25, 1.0),
    exceptions.QuotaExceededError: ("u-1", 2, "key", 2, 0.0, 0),
    exceptions.QuotaTimeoutError: ("u-1", 10, "total", 10, 1.5, 1.5),
    exceptions.EmitterFullError: ("u-1", 100, "error", True, 0.0, None),
    exceptions.EmitterTimeoutError: ("u-1", 100, "block", False, 2.0, 2.0),
}
# What to pass for an argument of __init__ whose name says more than its type:
# InvalidContextError.value is any object, LoadShedError.reason one of three.
BY_NAME: dict[str, object] = {"value": {"nested": (1, 2.5, b"x")}, "reason": "deadline"}
# What to pass for an argument of __init__, by its annotation (its first type).
BY_ANNOTATION = {
    "str": "sample text",
    "int": 403,
    "float": 1.5,
    "bool": True,
    "Mapping": {"x-sample": "value"},
    "dict": {"x-sample": "value"},
}


def sample(cls: type[BaseException]) -> BaseException:
    """
    An instance of *cls* with every argument of its __init__ given a value
    other than its default, so that each attribute is a real one.
    """
    if cls in SAMPLES:
        return cls(*SAMPLES[cls])
    if not any("__init__" in vars(k) for k in cls.__mro__ if k.__module__ != "builtins"):
        return cls(f"A sample {cls.__name__}.")
    args: list[object] = []
    kwargs: dict[str, object] = {}
    for param in inspect.signature(cls).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = str(param.annotation).split("|")[0].split("[")[0].strip()
        if param.name in BY_NAME:
            value: object = BY_NAME[param.name]
        elif annotation in BY_ANNOTATION:
            value = BY_ANNOTATION[annotation]
        elif param.default is not param.empty:
            continue  # a type this table does not know: keep its default
        else:
            value = f"sample {param.name}"
        if param.kind is param.KEYWORD_ONLY:
            kwargs[param.name] = value
        else:
            args.append(value)
    try:
        return cls(*args, **kwargs)
    except Exception as e:  # any failure means: give this class a sample
        pytest.fail(
            f"Add a sample of {cls.__name__} to SAMPLES: it cannot be built generically ({e!r})."
        )


def public_attributes(error: BaseException) -> dict[str, object]:
    """
    The attributes and properties of *error*, with the message and args.
    """
    names = set(vars(error))
    for klass in type(error).__mro__:
        names.update(name for name, v in vars(klass).items() if isinstance(v, property))
    found = {name: getattr(error, name) for name in names}
    return {**found, "args": error.args, "str": str(error), "type": type(error)}


class TestPickle:
    def test_found_by_introspection(self):
        """
        The introspection finds the base class, the errors with attributes, and
        nothing that is not an exception.
        """
        found = public_exceptions()

        assert exceptions.UserContextError in found
        assert exceptions.InvalidContextError in found
        assert exceptions.QuotaTimeoutError in found
        assert len(found) >= 17
        assert all(issubclass(cls, exceptions.UserContextError) for cls in found)

    @pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
    @pytest.mark.parametrize("cls", public_exceptions(), ids=lambda cls: cls.__name__)
    def test_round_trip(self, cls, protocol):
        """
        Every public exception pickles and unpickles with its type, message,
        args and every attribute and property, on every protocol.
        """
        error = sample(cls)
        error.__notes__ = ["a note"]  # what add_note() does, on Python 3.10 too

        back = pickle.loads(pickle.dumps(error, protocol))  # noqa: S301  # our own pickle

        assert public_attributes(back) == public_attributes(error)
        assert back.__notes__ == ["a note"]
        assert copy.deepcopy(error).args == error.args

    def test_invalid_context_error(self):
        """
        InvalidContextError, whose __init__ takes keyword-only arguments,
        unpickles with its field, value and reason.
        """
        with pytest.raises(InvalidContextError) as ei:
            UserContext(user_id="null", thread_id="t-1", run_id="r-1")

        back = pickle.loads(pickle.dumps(ei.value))  # noqa: S301  # our own pickle

        assert (back.field, back.value, back.reason) == (
            "user_id",
            "null",
            "is a placeholder, not a real id",
        )
        assert str(back) == str(ei.value)
        assert str(back).startswith("Invalid UserContext.user_id: is a placeholder")

    def test_subclass_of_user(self):
        """
        A user's subclass with its own required arguments pickles too.
        """

        class MyError(exceptions.UserContextError):
            def __init__(self, code: int, *, where: str) -> None:
                super().__init__(f"code {code} at {where}")
                self.code = code
                self.where = where

        globals()["MyError"] = MyError  # pickle finds classes by name
        MyError.__qualname__ = "MyError"
        try:
            back = pickle.loads(pickle.dumps(MyError(7, where="db")))  # noqa: S301  # ours
        finally:
            del globals()["MyError"]

        assert (str(back), back.code, back.where) == ("code 7 at db", 7, "db")

    def test_unpicklable_value(self):
        """
        An attribute that cannot be pickled (a lock, a mappingproxy) is replaced
        by a description of it, so that the error still crosses; the others are
        kept.
        """
        lock = threading.Lock()
        error = InvalidContextError(
            "Invalid UserContext.metadata['a'] key: ...",
            field="metadata['a'] key",
            value=lock,
            reason="must be a non-empty str",
        )
        error.extra = MappingProxyType({"a": 1})

        back = pickle.loads(pickle.dumps(error))  # noqa: S301  # our own pickle

        assert back.value == "<a lock that cannot be pickled>"
        assert back.extra == "<a mappingproxy that cannot be pickled>"
        assert (back.field, back.reason, back.args) == (error.field, error.reason, error.args)
        assert error.value is lock

    def test_headers_error_value_pickles(self):
        """
        The error for metadata that headers cannot carry holds plain dicts, not
        the context's read-only mappings, so its value survives pickling.
        """
        ctx = UserContext(user_id="u-1", thread_id="t-1", run_id="r-1", metadata={"m": {"b": b"x"}})
        with pytest.raises(InvalidContextError, match="cannot travel in headers") as ei:
            ctx.to_headers()

        back = pickle.loads(pickle.dumps(ei.value))  # noqa: S301  # our own pickle

        assert back.value == {"m": {"b": b"x"}}
        assert type(back.value["m"]) is dict

    def test_public_from_package(self):
        """
        The package re-exports the same classes the introspection covers.
        """
        for cls in public_exceptions():
            assert getattr(usercontext, cls.__name__) is cls


NAMED_ARGS = [cls for cls in public_exceptions() if issubclass(cls, exceptions._NamedArgsError)]


class TestNamedArgs:
    def test_found(self):
        """
        The quota and emitter errors, and only they, name their arguments.
        """
        assert {cls.__name__ for cls in NAMED_ARGS} == {
            "QuotaError",
            "QuotaExceededError",
            "QuotaTimeoutError",
            "EmitterFullError",
            "EmitterTimeoutError",
        }

    @pytest.mark.parametrize("cls", NAMED_ARGS, ids=lambda cls: cls.__name__)
    def test_names_match_annotations(self, cls):
        """
        Each class that names its arguments annotates exactly those names, in
        order, and annotates args with as many types: the types checkers see
        are the attributes there are.
        """
        owner = next(k for k in cls.__mro__ if "_arg_names" in vars(k))
        annotated = [name for name in vars(owner)["__annotations__"] if name != "args"]

        assert annotated == list(owner._arg_names)
        assert vars(owner)["__annotations__"]["args"].count(",") == len(annotated) - 1

    def test_quota_attributes(self):
        """
        A quota error reads its six arguments back by name, and its message
        shows them.
        """
        error = exceptions.QuotaTimeoutError("u-1", 10, "total", 7, 1.5, 2.0)

        assert (error.key, error.limit, error.scope, error.in_use) == ("u-1", 10, "total", 7)
        assert (error.waited, error.timeout) == (1.5, 2.0)
        assert str(error).startswith("Waited 1.500 s (the timeout of 2.0 s) for a slot, but all 10")

    def test_emitter_attributes(self):
        """
        An emitter error reads its six arguments back by name, and its
        message shows them.
        """
        error = exceptions.EmitterFullError("u-1", 100, "drop_oldest", True, 0.0, None)

        assert (error.user_id, error.maxsize, error.overflow) == ("u-1", 100, "drop_oldest")
        assert (error.critical, error.waited, error.timeout) == (True, 0.0, None)
        assert "holds 100 critical events" in str(error)

    def test_read_only(self):
        """
        The attributes are read-only views of args: assigning one fails, and
        args keeps its six values.
        """
        error = exceptions.QuotaExceededError("u-1", 2, "key", 2, 0.0, 0)

        with pytest.raises(AttributeError):
            error.limit = 3

        assert error.args == ("u-1", 2, "key", 2, 0.0, 0)
        assert vars(error) == {}

    def test_reader_docstring(self):
        """
        Each attribute says which argument it reads.
        """
        assert exceptions.EmitterFullError.overflow.__doc__ == (
            "The error's *overflow*: ``args[2]``."
        )

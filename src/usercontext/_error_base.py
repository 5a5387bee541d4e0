"""
The base of every usercontext error, and how errors cross process boundaries.

It sits apart from `usercontext.exceptions` so that the modules the public
exceptions are spread over can all derive from it without a circle.
"""

from __future__ import annotations

from typing import Any


__all__ = ["UserContextError"]


def _portable(value: object) -> object:
    """
    Return *value* if it pickles, else a string that says what it was.

    An error must reach the process that waits for it even when it carries an
    offending value that cannot travel (a lock, a mappingproxy): losing that
    one value beats losing the whole error to a pickling failure.
    """
    import pickle  # only when an error is pickled: it costs `import usercontext` 6 ms

    try:
        pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:  # pickling fails with many types, all meaning "cannot"
        return f"<a {type(value).__name__} that cannot be pickled>"
    return value


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """
    Recreate an error from its *args* and attributes, without calling ``__init__``.
    """
    # The __new__ that cls(*args) would run: the one of the base CPython lays
    # the instance out from (OSError's for TimeoutError subclasses), which
    # attribute lookup along the MRO does not always find first.
    base: Any = cls
    while "__new__" not in vars(base):
        base = base.__base__
    error = base.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class UserContextError(Exception):
    """
    Base class of every error raised by usercontext.

    Every subclass pickles with its message and attributes, so an error raised
    in a worker process reaches the process that waits for it intact.

    .. versionadded:: 0.1.0
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds with cls(*args), which fails for errors whose
        # __init__ takes keyword-only arguments (InvalidContextError): rebuild
        # from args and attributes instead, whatever __init__ takes.
        return (
            _rebuild,
            (
                type(self),
                tuple(_portable(a) for a in self.args),
                {k: _portable(v) for k, v in vars(self).items()},
            ),
        )

"""
The wording of validation errors: a short repr of the refused value, and the
`InvalidContextError` of a context field.
"""

from __future__ import annotations

from .exceptions import InvalidContextError


__all__ = ["invalid", "short_repr"]

_REPR_MAX = 64


def short_repr(value: object) -> str:
    """
    Return the repr of *value*, cut to a length an error message can show.
    """
    try:
        r = repr(value)
    except ValueError:
        # An int longer than sys.get_int_max_str_digits() has no repr; an error
        # message about it must not fail with one of its own.
        return f"a value of type {type(value).__name__} too large to show"
    return r if len(r) <= _REPR_MAX else r[: _REPR_MAX - 4] + "...'"


def invalid(
    field: str, value: object, reason: str, fix: str, *, show: bool = True
) -> InvalidContextError:
    """
    Return the `InvalidContextError` for *value* of *field*, which breaks the
    rule *reason*, with the *fix* to apply; without *show*, the message gives
    the value's type only.
    """
    # Metadata values may hold personal data: their errors show the type only.
    got = short_repr(value) if show else f"a {type(value).__name__}"
    return InvalidContextError(
        f"Invalid UserContext.{field}: {reason}; got {got}. {fix}",
        field=field,
        value=value,
        reason=reason,
    )

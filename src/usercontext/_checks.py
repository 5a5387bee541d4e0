"""
The checks of a setting's value: one rule, one wording, whichever class asks.

A user who passes ``timeout="5"`` to the factory and to the hub reads the same
sentence from both, naming the setting and what it accepts.
"""

from __future__ import annotations

import math


__all__ = ["count", "function", "limit", "seconds"]


def seconds(name: str, value: object, *, allow_none: bool = False, zero_ok: bool = False) -> None:
    """
    Refuse *value* unless it is a number of seconds: ``> 0``, or ``>= 0`` when
    *zero_ok*, or `None` when *allow_none*. NaN is refused; a bool is not a number.
    """
    if value is None and allow_none:
        return
    or_none = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a number of seconds{or_none}, got {value!r}."
        raise TypeError(msg)
    if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
        msg = f"{name} must be {'>= 0' if zero_ok else '> 0'} seconds{or_none}, got {value!r}."
        raise ValueError(msg)


def count(name: str, value: object, *, minimum: int) -> None:
    """Refuse *value* unless it is an int (not a bool) of at least *minimum*."""
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must be an int, got {value!r}."
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be at least {minimum}, got {value}."
        raise ValueError(msg)


def limit(name: str, value: object, *, allow_none: bool) -> None:
    """
    Refuse a limit that is not a non-negative int: or `None` (no limit) when
    *allow_none*, else a callable ``key -> int`` (a per-key limit).
    """
    if value is None and allow_none:
        return
    if callable(value) and not allow_none:
        return
    if not isinstance(value, int) or type(value) is not int or value < 0:
        what = "a non-negative int" + (" or None" if allow_none else " or a callable key -> int")
        msg = f"{name} must be {what}, got {value!r}."
        raise TypeError(msg) if type(value) is not int else ValueError(msg)


def function(name: str, value: object, *, allow_none: bool = False) -> None:
    """Refuse *value* unless it is callable (or `None` when *allow_none*)."""
    if value is None and allow_none:
        return
    if not callable(value):
        msg = f"{name} must be a callable{' or None' if allow_none else ''}, got {value!r}."
        raise TypeError(msg)

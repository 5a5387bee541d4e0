"""
A context's metadata made immutable, all the way down, and checked.

`UserContext` stores what `check_metadata` returns: a read-only mapping whose
values are immutable too (lists become tuples, sets frozensets, dicts read-only
mappings); any other mutable value is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, cast

from ._codec import FIELDS
from ._messages import invalid


__all__ = ["EMPTY", "MAX_METADATA_ENTRIES", "RESERVED_METADATA_KEYS", "check_metadata"]

EMPTY: Mapping[str, Any] = MappingProxyType({})
"""
The metadata of every context created without any: one shared empty mapping.
"""
RESERVED_METADATA_KEYS = frozenset(FIELDS)
"""
Keys metadata cannot hold: they name a field of the context.
"""
MAX_METADATA_ENTRIES = 64
"""
The most entries a context's metadata may hold at its top level.
"""
_MAX_NESTING = 8
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def _freeze(path: str, value: object, nesting: int) -> object:
    """
    Return *value* as an immutable value, converting lists, sets and dicts.
    """
    t = type(value)
    if t in _SCALARS:
        return value
    if nesting >= _MAX_NESTING:
        raise invalid(
            path,
            value,
            f"nests containers deeper than {_MAX_NESTING} levels",
            "Flatten the metadata.",
            show=False,
        )
    if t is tuple or t is list:
        items = cast("Iterable[object]", value)
        return tuple([_freeze(f"{path}[{i}]", v, nesting + 1) for i, v in enumerate(items)])
    if t is frozenset or t is set:
        members = cast("Iterable[object]", value)
        return frozenset([_freeze(f"{path}[...]", v, nesting + 1) for v in members])
    if isinstance(value, Mapping):
        return _freeze_mapping(path, cast("Mapping[object, object]", value), nesting + 1)
    msg = (
        f"UserContext.{path} must be an immutable value (str, int, float, bool, None, bytes, "
        f"or a tuple, frozenset or mapping of those), got a {t.__name__}. "
        "Convert it to one of those types, such as str(value)."
    )
    raise TypeError(msg)


def _freeze_mapping(path: str, value: Mapping[object, object], nesting: int) -> Mapping[str, Any]:
    out: dict[str, Any] = {}
    for key, v in value.items():
        if type(key) is not str or not key:
            raise invalid(
                f"{path} key",
                key,
                "must be a non-empty str",
                "Use non-empty string keys in metadata.",
            )
        out[key] = _freeze(f"{path}[{key!r}]", v, nesting)
    return MappingProxyType(out)


def check_metadata(metadata: object) -> Mapping[str, Any]:
    """
    Return *metadata* checked and frozen, or `EMPTY` when it holds nothing.

    Raises:
        TypeError: If *metadata* is not a mapping, or holds a mutable value of
            another type than list, set and dict.
        InvalidContextError: If it holds too many entries, a reserved or empty
            key, or nests too deep.
    """
    if metadata is None or (type(metadata) is dict and not metadata):
        return EMPTY
    if not isinstance(metadata, Mapping):
        msg = (
            f"UserContext.metadata must be a mapping, got a {type(metadata).__name__}. "
            "Pass a dict of str keys to immutable values."
        )
        raise TypeError(msg)
    entries = cast("Mapping[object, object]", metadata)
    if not entries:
        return EMPTY
    if len(entries) > MAX_METADATA_ENTRIES:
        raise invalid(
            "metadata",
            entries,
            f"must have at most {MAX_METADATA_ENTRIES} entries, not {len(entries)}",
            "Keep metadata small; store bulky data in a per-request resource instead.",
            show=False,
        )
    for key in entries:
        if key in RESERVED_METADATA_KEYS:
            raise invalid(
                "metadata key",
                key,
                "is reserved: it names a UserContext field",
                "Set the field itself, or choose another key.",
            )
    return _freeze_mapping("metadata", entries, 0)

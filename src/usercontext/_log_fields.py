"""
What the logging adapters put in a log line: which fields of the current
context become which keys, what stands in for a missing context, and which
metadata keys may be copied too.

`usercontext.stdlib` (records of ``logging``) and `usercontext.structlog`
(structlog's events) both write through `add_fields`, so a line carries the
same keys and the same stand-ins whichever library logged it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from ._codec import FIELDS
from ._current import current_or_none
from ._pending import pending, readers


if TYPE_CHECKING:
    from collections.abc import MutableMapping


__all__ = ["ID_KEYS", "MISSING", "add_fields", "metadata_keys"]

ID_KEYS = ("user_id", "thread_id", "run_id", "request_id")
"""
The fields of the context that every line gets, under keys of the same names.
"""
MISSING = "-"
"""
What a line shows by default for an id when no context is bound, and for an
allowlisted metadata key the context lacks.
"""
# Metadata never holds a key that names a field (UserContext refuses them), so
# allowlisting one would only ever give the default.
_CONTEXT_FIELDS = frozenset(FIELDS)

_pending_get = pending.get
# The middleware makes the id of a request being resolved visible only once a
# logging adapter is loaded: each imports this module.
readers[:] = [True]


def metadata_keys(
    metadata: object, *, owner: str, reserved: frozenset[str], where: str, identifiers: bool
) -> tuple[str, ...]:
    """
    Check the metadata allowlist *metadata* given to *owner*, and return its
    keys in order, without duplicates.

    Keys in *reserved* are refused as names the *where* has already; with
    *identifiers*, keys must be Python identifiers.

    Raises:
        TypeError: If *metadata* is not an iterable of str.
        ValueError: If a key is empty, not an identifier when it must be one,
            one of `ID_KEYS`, a field of the context, or in *reserved*.
    """
    if isinstance(metadata, (str, bytes)) or not isinstance(metadata, Iterable):
        msg = (
            f"{owner}(metadata=...) takes an iterable of metadata keys, such as "
            f"('plan', 'tenant'), got a {type(metadata).__name__} ({metadata!r})."
        )
        if isinstance(metadata, str):
            msg += f" Wrap a single key in a tuple: metadata=({metadata!r},)."
        raise TypeError(msg)
    keys: dict[str, None] = {}  # in order, without duplicates
    for key in cast("Iterable[object]", metadata):
        if not isinstance(key, str):
            msg = (
                f"{owner}(metadata=...) takes metadata keys as str, got a "
                f"{type(key).__name__} ({key!r}). Metadata keys are always str: pass "
                "the key's name."
            )
            raise TypeError(msg)
        if not key or (identifiers and not key.isidentifier()):
            what = (
                "a Python identifier, so that format strings can name it"
                if identifiers
                else "a non-empty str"
            )
            msg = (
                f"{owner}(metadata=...) cannot allowlist {key!r}: a key must be {what}. "
                "Store the value in the context's metadata under such a key, such as "
                "'plan' or 'tenant_id', and allowlist that."
            )
            raise ValueError(msg)
        if key in ID_KEYS:
            msg = (
                f"{owner}(metadata=...) cannot allowlist {key!r}: the {where} gets "
                f"{', '.join(ID_KEYS)} from the context in every case. Leave it out of "
                "metadata."
            )
            raise ValueError(msg)
        if key in _CONTEXT_FIELDS:
            msg = (
                f"{owner}(metadata=...) cannot allowlist {key!r}: it names a field of "
                "usercontext.UserContext, and metadata never holds such a key. Leave it "
                "out of metadata."
            )
            raise ValueError(msg)
        if key in reserved:
            msg = (
                f"{owner}(metadata=...) cannot allowlist {key!r}: every {where} has "
                f"its own {key!r}, which the metadata value would clash with. Store the "
                f"value in the context's metadata under another key, such as "
                f"'ctx_{key.strip('_')}', and allowlist that."
            )
            raise ValueError(msg)
        keys[key] = None
    return tuple(keys)


def add_fields(into: MutableMapping[str, Any], metadata: tuple[str, ...], default: object) -> None:
    """
    Add the current context's `ID_KEYS`, and its *metadata* keys, to *into*,
    keeping the keys it has; *default* stands for what is missing.
    """
    # Written out key by key, not looped over ID_KEYS: it runs on every log
    # line, and a test checks that it sets exactly ID_KEYS.
    ctx = current_or_none()
    setdefault = into.setdefault
    if ctx is None:
        setdefault("user_id", default)
        setdefault("thread_id", default)
        setdefault("run_id", default)
        # A request being resolved or refused has an id, and no context yet.
        request = _pending_get(None)
        setdefault("request_id", default if request is None else request.get())
        for key in metadata:
            setdefault(key, default)
    else:
        setdefault("user_id", ctx.user_id)
        setdefault("thread_id", ctx.thread_id)
        setdefault("run_id", ctx.run_id)
        setdefault("request_id", ctx.request_id)
        if metadata:
            get = ctx.metadata.get
            for key in metadata:
                setdefault(key, get(key, default))

"""
The lean reference of a sync registry scope: `LeanScope`, written by hand for
one generator resource with every guarantee a `usercontext.Scope` documents,
each done the cheapest way known.

`usercontext._report.floors.FloorScope` is the least a scope can do; this one
adds, and so shows what these cost together, the physical limit the
library's sync scope is measured against:

- entered once, and never inside another user's binding;
- a scope dropped open warns (a `ResourceWarning`) naming the file and line
  that entered it: the entering frame and instruction offset are kept while
  it is open, and every scope has a finalizer;
- resources are handed out only while the scope is open and its user's
  context is bound;
- exact counts: scopes entered and left, resources created and closed per key;
- every generator is finished in reverse order even when one fails, the
  failures collected and raised together.
"""

from __future__ import annotations

import sys
import warnings

from typing import TYPE_CHECKING, Any

from usercontext._scope import ExceptionGroup_

from .floors import floor_var


if TYPE_CHECKING:
    from collections.abc import Callable

    from typing_extensions import Self

__all__ = ["LeanCounts", "LeanScope"]

_getframe = sys._getframe
_get = floor_var.get
_set = floor_var.set
_reset = floor_var.reset
# _open: _NEW, then the context while open (get's check is one comparison),
# then _CLOSED.
_NEW: Any = object()
_CLOSED: Any = object()


class LeanCounts:
    """
    The counts a registry keeps of its scopes: entered and left. Those of
    resources, created and closed, are kept per key beside its provider.
    """

    __slots__ = ("entered", "left")

    def __init__(self) -> None:
        self.entered = 0
        self.left = 0


class LeanScope:
    """
    A sync scope with every guarantee of `usercontext.Scope` (see the module's
    docstring) and nothing more: generator providers only.
    """

    __slots__ = ("_counts", "_ctx", "_frame", "_gens", "_lasti", "_open", "_providers", "_token")

    def __init__(
        self,
        providers: dict[Any, tuple[Callable[[Any], Any], list[int]]],
        ctx: Any,
        counts: LeanCounts,
    ) -> None:
        self._providers = providers
        self._ctx = ctx
        self._counts = counts
        self._gens: dict[Any, tuple[Any, Any, list[int]]] = {}
        self._open: Any = _NEW
        self._frame: Any = None

    def __enter__(self) -> Self:
        if self._open is not _NEW:
            msg = "A scope can be entered once."
            raise RuntimeError(msg)
        ctx = self._ctx
        prev = _get(None)
        if prev is not None and prev is not ctx and prev.user_id != ctx.user_id:  # type: ignore[attr-defined]
            msg = "Another user's context is bound."
            raise RuntimeError(msg)
        frame = self._frame = _getframe(1)
        self._lasti = frame.f_lasti
        self._token = _set(ctx)
        self._open = ctx
        self._counts.entered += 1
        return self

    def get(self, key: Any) -> Any:
        """
        Return the value of *key*, made by its generator provider once, if the
        scope is open and its user's context bound.
        """
        ctx = self._open
        if _get(None) is not ctx:
            ctx = self._check()
        gens = self._gens
        if key in gens:
            return gens[key][1]
        make, counts = self._providers[key]
        gen = make(ctx)
        for value in gen:  # noqa: B007  # the first value is the resource
            break
        else:
            msg = "The provider did not yield."
            raise RuntimeError(msg)
        counts[0] += 1
        gens[key] = (gen, value, counts)
        return value

    def _check(self) -> Any:
        ctx = self._open
        if ctx is _NEW or ctx is _CLOSED:
            msg = "The scope is not open."
            raise RuntimeError(msg)
        bound = _get(None)
        if bound is not None and bound.user_id != ctx.user_id:  # type: ignore[attr-defined]
            msg = "Another user's context is bound."
            raise RuntimeError(msg)
        return ctx

    def __exit__(self, *exc_info: object) -> None:
        gens = self._gens
        errors: list[BaseException] | None = None
        try:
            while gens:
                gen, _, counts = gens.popitem()[1]
                counts[1] += 1
                try:
                    for _ in gen:
                        msg = "The generator yielded twice."
                        raise RuntimeError(msg)  # noqa: TRY301  # collected below
                except Exception as e:  # collected; every cleanup runs
                    errors = [e] if errors is None else [*errors, e]
        finally:
            self._open = _CLOSED
            self._frame = None
            self._counts.left += 1
            _reset(self._token)
        if errors is not None:
            msg = "cleanups failed"
            raise ExceptionGroup_(msg, errors)

    def __del__(self) -> None:
        frame = self._frame
        if frame is not None:  # open
            warnings.warn(
                f"A scope opened at {frame.f_code.co_filename} (offset {self._lasti}) "
                "was never closed.",
                ResourceWarning,
                stacklevel=1,
            )

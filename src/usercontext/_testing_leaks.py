"""
`LeakGuard`: what a piece of work left behind (a context bound, a scope open,
a quota slot held, an engine open, a hub running), and where each was made.

It adds nothing to the library's hot paths: it looks at the live objects
(`gc.get_objects`) and their state before and after the work, and asks
`tracemalloc` where each was allocated.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc

from collections import deque
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._current import current_or_none


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType

    from typing_extensions import Self

    from ._context import UserContext

__all__ = ["Leak", "LeakGuard"]

# Frames of these are skipped to find where user code made an object.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # noqa: PTH100, PTH120  # a prefix to compare with
_PLUMBING = tuple(
    os.path.dirname(os.path.abspath(module.__file__ or "")) + os.sep  # noqa: PTH100, PTH120
    for module in (os, attrs)
)
_CONTAINERS = (dict, list, set, deque)
_PLUMBING_NAMES = (
    "_pytest",
    "anyio",
    "asyncio",
    "contextlib",
    "outcome",
    "pluggy",
    "sniffio",
    "threading",
    "trio",
)


@attrs.frozen
class Leak:
    """
    One thing a piece of work left behind, found by `LeakGuard`.

    Attributes:
        kind: What leaked: ``"context"`` (a context left bound),
            ``"attach"`` (an `usercontext.attach` never detached), ``"scope"``
            (a scope never closed), ``"lease"`` (a quota slot held),
            ``"quota"`` (slots held by leases no longer reachable),
            ``"engine"`` (engines left in use or open) or ``"hub"`` (a hub
            left running).
        what: A sentence naming the object and its state.
        where: ``file:line`` of the code that made it, or `None` when it was
            made before the guard started tracing.

    .. versionadded:: 0.1.0
    """

    kind: str
    what: str
    where: str | None

    def __str__(self) -> str:
        if self.where is None:
            return f"{self.what} (made before the leak guard started, so where is unknown)"
        return f"{self.what}, made at {self.where}"


def where_made(obj: object) -> str | None:
    """
    Return ``file:line`` of the innermost frame of user code that allocated
    *obj* (and of its caller, when it has one), or `None` if `tracemalloc`
    did not trace it.
    """
    traceback = _traceback(obj)
    if traceback is None:
        return None
    frames = list(traceback)  # oldest first
    user = [
        frame
        for frame in reversed(frames)
        if not frame.filename.startswith((_PACKAGE, *_PLUMBING))
        and not any(
            f"{os.sep}{part}{os.sep}" in frame.filename
            or frame.filename.endswith(f"{os.sep}{part}.py")
            for part in _PLUMBING_NAMES
        )
    ] or frames[-1:]
    where = f"{_short(user[0].filename)}:{user[0].lineno}"
    if len(user) > 1:
        where += f" (called from {_short(user[1].filename)}:{user[1].lineno})"
    return where


def _traceback(obj: object) -> tracemalloc.Traceback | None:
    traceback = tracemalloc.get_object_traceback(obj)
    if traceback is not None or not hasattr(obj, "__dict__"):
        return traceback
    # Python 3.11 traces no object whose __dict__ the interpreter manages
    # (most classes with no __slots__): one of the containers its __init__
    # made was allocated by the same call.
    attributes: dict[str, object] = vars(obj)
    for value in attributes.values():
        kind: type = type(value)
        if kind in _CONTAINERS or kind.__module__.startswith("usercontext."):
            traceback = tracemalloc.get_object_traceback(value)
            if traceback is not None:
                return traceback
    return None


def _short(filename: str) -> str:
    """
    *filename* relative to the working directory when it lies below it, as
    pytest shows them.
    """
    return filename.removeprefix(f"{Path.cwd()}{os.sep}")


def _classes(module: str, name: str) -> set[type]:
    """
    The class *name* of *module* and its subclasses, or nothing if *module* is
    not imported (then none of them can exist).
    """
    loaded = sys.modules.get(f"usercontext.{module}")
    if loaded is None:
        return set()
    found: set[type] = set()
    todo: list[type] = [getattr(loaded, name)]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def _describe_ctx(ctx: UserContext) -> str:
    return f"a UserContext of user {ctx.user_id!r} (request {ctx.request_id!r})"


class _Snapshot:
    """
    The open objects and the counters of the long-lived ones, at one moment.
    """

    def __init__(self) -> None:
        self.bound = current_or_none()
        # Strong references for the life of one snapshot: an id alone could be
        # reused by a new object once the old one is gone.
        self.open: dict[int, Any] = {}
        self.counts: dict[int, tuple[Any, int, int]] = {}
        kinds = {cls: kind for module, name, kind in _KINDS for cls in _classes(module, name)}
        objects = gc.get_objects()
        # Filtered in C (compress, map): a loop in Python over every live
        # object of a test process takes tenths of a second.
        for obj in compress(objects, map(kinds.__contains__, map(type, objects))):
            kind = kinds[type(obj)]
            try:
                if kind in _COUNTED:
                    self.counts[id(obj)] = (obj, *_COUNTED[kind](obj))
                elif _OPEN[kind](obj):
                    self.open[id(obj)] = obj
            except Exception:  # noqa: S112  # half made (its __init__ raised): holds nothing
                continue
        self.kinds = kinds


def _scope_open(scope: Any) -> bool:
    from ._scope import _CLOSED, _NEW

    # While open, a scope's state is its context (see _scope.py).
    state = getattr(scope, "_state", _NEW)
    return state is not _NEW and state is not _CLOSED


def _registry_counts(registry: Any) -> tuple[int, int]:
    return (registry.stats().scopes, 0)


def _factory_counts(factory: Any) -> tuple[int, int]:
    stats = factory.stats()
    idle = 0 if factory._closed else stats.idle
    return (stats.in_use, idle)


def _quota_counts(quota: Any) -> tuple[int, int]:
    return (quota.stats().in_use, 0)


_KINDS = (
    ("_attach", "AttachToken", "attach"),
    ("_scope", "Scope", "scope"),
    ("_quota", "Lease", "lease"),
    ("_emitter._hub", "EmitterHub", "hub"),
    ("_registry", "Registry", "registry"),
    ("_factory", "EngineFactory", "factory"),
    ("_local_quota", "LocalQuota", "quota"),
    ("_local_quota", "ThreadQuota", "quota"),
)
_OPEN: dict[str, Callable[[Any], bool]] = {
    "attach": lambda token: not token._detached,
    "scope": _scope_open,
    "lease": lambda lease: not lease.released,
    "hub": lambda hub: hub._state == "running",
}
_COUNTED: dict[str, Callable[[Any], tuple[int, int]]] = {
    "registry": _registry_counts,
    "factory": _factory_counts,
    "quota": _quota_counts,
}


_NOT_STARTED = "This LeakGuard was not started: call start() before the work."


class LeakGuard:
    """
    Find what a piece of work leaves behind: a context bound, an
    `usercontext.attach` never detached, a scope open, a quota slot held, an
    engine in use or open, a hub running; each named with where it was made.

    Call `start` before the work and `leaks` (or `stop`) after it, or use it
    as a context manager, which raises `AssertionError` listing the leaks on
    exit. Only what is new since `start` counts: objects open before it
    (a long-lived fixture's hub, say) are not leaks; neither is a factory
    made before `start` that keeps idle engines, while one made during the
    work must be closed by its end.

    It adds no cost to the library while the work runs: it looks at the live
    objects (``gc.get_objects()``) before and after, and it starts
    ``tracemalloc`` (if it is not tracing) to tell where each leaked object was allocated,
    which slows allocations down while it traces. Code that runs in
    another thread must have finished by the check.

    >>> import usercontext as uc
    >>> from usercontext.testing import LeakGuard
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    >>> with LeakGuard():
    ...     with uc.bind(ctx):
    ...         pass

    Args:
        frames: How many frames ``tracemalloc`` keeps per allocation, when the
            guard starts it: enough to reach your code from the library's,
            and its caller. Each frame more slows allocations down further.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, frames: int = 8) -> None:
        if type(frames) is not int or frames < 1:
            msg = f"frames must be a positive int, got {frames!r}."
            raise ValueError(msg)
        self._frames = frames
        self._started_tracing = False
        self._before: _Snapshot | None = None
        self._last: _Snapshot | None = None  # what the last check saw

    def start(self) -> None:
        """
        Take note of what is open now, and start tracing allocations.
        """
        self._start_from(None)

    def _start_from(self, snapshot: _Snapshot | None) -> None:
        """
        Start, from *snapshot* (the state at the end of the work just
        checked, when nothing ran since) instead of a new one.
        """
        if not tracemalloc.is_tracing():
            tracemalloc.start(self._frames)
            self._started_tracing = True
        self._before = _Snapshot() if snapshot is None else snapshot

    def accept(self) -> None:
        """
        Take what is open now as the starting point: it is not a leak.

        For objects made after `start` that are meant to outlive the work,
        such as a long-lived fixture's, set up after the guard started.

        Raises:
            RuntimeError: If the guard was not started.
        """
        before = self._before
        if before is None:
            raise RuntimeError(_NOT_STARTED)
        self._before = _Snapshot()
        self._before.bound = before.bound

    def leaks(self) -> list[Leak]:
        """
        Return what was left behind since `start`, in a stable order.

        Raises:
            RuntimeError: If the guard was not started.
        """
        before = self._before
        if before is None:
            raise RuntimeError(_NOT_STARTED)
        self._last = _Snapshot()
        return list(_compare(before, self._last))

    def stop(self) -> list[Leak]:
        """
        Return `leaks`, and stop tracing allocations if `start` began it.
        """
        try:
            return self.leaks()
        finally:
            self._before = None
            if self._started_tracing:
                self._started_tracing = False
                tracemalloc.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        found = self.stop()
        if found and exc is None:
            raise AssertionError(describe(found))

    def __repr__(self) -> str:
        state = "started" if self._before is not None else "stopped"
        return f"<usercontext.testing.LeakGuard({state})>"


def describe(leaks: list[Leak]) -> str:
    """
    One message for *leaks*: how many, then one line each.
    """
    lines = [f"{len(leaks)} thing{'s' if len(leaks) != 1 else ''} left behind:"]
    lines += [f"- {leak}" for leak in leaks]
    return "\n".join(lines)


def _compare(before: _Snapshot, after: _Snapshot) -> Iterator[Leak]:
    new_open = [obj for key, obj in after.open.items() if key not in before.open]
    yield from _bound_leak(before, after, new_open)
    # What the open objects account for, so that it is named once: the slots
    # held by live leases, and the scopes still alive, of each quota and
    # registry.
    accounted: dict[int, int] = {}
    for obj in new_open:
        kind = after.kinds[type(obj)]
        yield _open_leak(kind, obj)
        if kind in ("lease", "scope"):
            owner = obj._quota if kind == "lease" else obj._registry
            accounted[id(owner)] = accounted.get(id(owner), 0) + 1
    # Factories first: the slots their engines hold are accounted for too.
    ordered = sorted(after.counts.items(), key=lambda kv: after.kinds[type(kv[1][0])] != "factory")
    for key, (obj, in_use, idle) in ordered:
        old = before.counts.get(key)
        grew = in_use - (old[1] if old is not None else 0)
        kind = after.kinds[type(obj)]
        if kind == "factory":
            idle_left = idle if old is None else 0
            if grew > 0 or idle_left > 0:
                yield _factory_leak(obj, max(grew, 0), idle_left)
            quota = id(obj.quota)
            accounted[quota] = accounted.get(quota, 0) + max(grew, 0)
            continue
        grew -= accounted.get(key, 0)
        if grew > 0:
            yield _counted_leak(kind, obj, grew)


def _bound_leak(before: _Snapshot, after: _Snapshot, new_open: list[Any]) -> Iterator[Leak]:
    bound = after.bound
    if bound is None or bound is before.bound:
        return
    # A context left bound by an attach never detached (or a scope never
    # closed) is named once, as that.
    if not any(
        after.kinds[type(obj)] in ("attach", "scope") and obj.ctx is bound for obj in new_open
    ):
        yield Leak("context", f"{_describe_ctx(bound)} is still bound", where_made(bound))


def _counted_leak(kind: str, obj: Any, grew: int) -> Leak:
    s = "s" if grew != 1 else ""
    if kind == "registry":
        what = f"{grew} scope{s} of {obj!r} entered and never closed (the Scope objects are gone)"
        return Leak("scope", what, where_made(obj))
    what = (
        f"{obj!r} holds {grew} slot{s} that no live lease or engine accounts for: a lease "
        "was dropped without being released"
    )
    return Leak("quota", what, where_made(obj))


def _open_leak(kind: str, obj: Any) -> Leak:
    if kind == "attach":
        ctx = obj.ctx
        what = f"usercontext.attach() of {_describe_ctx(ctx)} was never detached"
    elif kind == "scope":
        ctx = obj.ctx
        what = f"a Scope of {_describe_ctx(ctx)} is still open"
    elif kind == "lease":
        what = f"a quota slot of key {obj.key!r} is still held ({obj!r})"
    else:
        what = f"{obj!r} is still running: close it with `await hub.aclose()`"
    return Leak(kind, what, where_made(obj))


def _factory_leak(factory: Any, in_use: int, idle: int) -> Leak:
    parts: list[str] = []
    if in_use:
        top = ", ".join(f"{user!r}: {n}" for user, n in factory.stats().top)
        parts.append(f"{in_use} engine{'s' if in_use != 1 else ''} still in use ({top})")
    if idle:
        parts.append(
            f"{idle} idle engine{'s' if idle != 1 else ''} never closed (close the "
            "factory with `await factory.aclose()`)"
        )
    return Leak("engine", f"{factory!r} has {' and '.join(parts)}", where_made(factory))

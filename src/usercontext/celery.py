"""
Carry the bound `usercontext.UserContext` into Celery tasks.

Call `install` once where the Celery app is made, in the process that
publishes tasks and in the worker (both import the app's module):

- a task published while a context is bound carries it in one message header,
  ``usercontext``, encoded by `usercontext.to_job` (validated, at most 8 KiB);
- the worker binds a child of it (same user, new request id, the publisher's
  request id as parent) for the task's run, and opens a scope of the
  registry given to `install`, if any, that the task reaches with `scope`;
- a retry carries the header of the run it retries, so every attempt is a
  child of the publisher's context, at the same depth;
- a task published with no context bound runs with none;
- a header that is malformed, tampered with or oversized fails the task with
  `usercontext.exceptions.InvalidContextError` before its body runs: it never
  runs as another user, nor as nobody.

In eager mode (``task_always_eager``, or ``task.apply()``) nothing is
published: the task runs in the caller's thread, under a child of the
caller's context if one is bound.
"""

from __future__ import annotations

import weakref

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import celery
import celery.signals

import usercontext


if TYPE_CHECKING:
    from collections.abc import Callable

    from celery.app.task import Context as Request

    from usercontext import AttachToken, Scope, UserContext


__all__ = ["HEADER", "install", "scope"]

HEADER = "usercontext"
"""
The name of the message header that carries the context.
"""

# The registry (or None) of each app `install` was called for.
_installed: weakref.WeakKeyDictionary[celery.Celery, usercontext.Registry | None] = (
    weakref.WeakKeyDictionary()
)
# What the worker keeps on a task's request between its prerun and postrun.
_RUN = "_usercontext_run"
_REFUSED = "_usercontext_refused"
_UID = "usercontext.celery"


def install(app: celery.Celery, *, registry: usercontext.Registry | None = None) -> None:
    """
    Carry the bound context from publishers into the tasks of *app*.

    Call it once, where *app* is made, so that publishers and workers both
    run it. Calling it again replaces the registry.

    Args:
        app: The Celery application.
        registry: Per-task resources: each task with a context runs inside a
            scope of it, closed after the task (see `scope`).

    Raises:
        TypeError: If *app* is not a Celery application, or *registry* not a
            `usercontext.Registry`.

    .. versionadded:: 0.1.0
    """
    if not isinstance(app, celery.Celery):
        msg = f"install() takes a celery.Celery application, got {type(app).__name__}."  # type: ignore[unreachable]
        raise TypeError(msg)
    if registry is not None and not isinstance(registry, usercontext.Registry):
        kind = type(registry).__name__  # type: ignore[unreachable]
        msg = f"registry must be a usercontext.Registry or None, got {kind}."
        raise TypeError(msg)
    _installed[app] = registry
    # Weak references would let the handlers go; the uid makes connecting twice a no-op.
    celery.signals.before_task_publish.connect(_publish, weak=False, dispatch_uid=_UID)
    celery.signals.task_prerun.connect(_prerun, weak=False, dispatch_uid=_UID)
    celery.signals.task_postrun.connect(_postrun, weak=False, dispatch_uid=_UID)
    # A signal handler's exception is logged and dropped by Celery; the
    # loader's hook runs next, outside the signal, and fails the task instead.
    loader = app.loader
    if not getattr(loader.on_task_init, _REFUSED, False):
        loader.on_task_init = _refusing(loader.on_task_init)  # type: ignore[method-assign]


def scope() -> Scope:
    """
    Return the registry scope of the running task.

    Raises:
        RuntimeError: If no task runs here, or its app was installed without a
            registry, or the task runs with no context.

    .. versionadded:: 0.1.0
    """
    task = _running_task()
    run = None if task is None else getattr(task.request, _RUN, None)
    if run is None or run[1] is None:
        msg = (
            "No usercontext scope is open here: usercontext.celery.scope() works in the body "
            "of a task that runs with a context, for an app installed with "
            "usercontext.celery.install(app, registry=...)."
        )
        raise RuntimeError(msg)
    found: Scope = run[1]
    return found


def _running_task() -> Any:
    task: Any = celery.current_task  # a proxy, false when no task runs here
    return task or None


def _publish(headers: dict[str, Any], **_: Any) -> None:
    """
    Put the bound context in the headers of a task being published.
    """
    task = _running_task()
    if task is not None and task.request.id == headers.get("id"):
        # A retry (it keeps the task's id): carry what the first attempt got,
        # so that every attempt is a child of the publisher's context.
        original = getattr(task.request, HEADER, None)
        if original is not None:
            headers[HEADER] = original
            return
    ctx = usercontext.current_or_none()
    if ctx is None:
        return
    try:
        headers[HEADER] = usercontext.to_job(ctx)
    except usercontext.InvalidContextError as e:
        # Celery logs and drops a handler's exception here: send the reason
        # instead, so that the task fails with it rather than run with no context.
        headers[HEADER] = str(e)


def _prerun(task: Any, **_: Any) -> None:
    """
    Bind the task's context (a child of the publisher's) for its run.
    """
    app = task.app
    if app not in _installed:
        return
    request: Request = task.request
    payload = getattr(request, HEADER, None)
    try:
        if payload is not None:
            ctx = _decode(payload)
        elif request.is_eager and (parent := usercontext.current_or_none()) is not None:
            ctx = parent.child()
        else:
            return
        token = usercontext.attach(ctx)
    except Exception as e:  # raised by the loader's hook, which fails the task
        setattr(request, _REFUSED, e)
        return
    registry = _installed[app]
    opened: Scope | None = None
    if registry is not None:
        opened = registry.scope(ctx)
        opened.__enter__()
    setattr(request, _RUN, (token, opened))


def _decode(payload: object) -> UserContext:
    if isinstance(payload, str):
        msg = f"The publisher of this task could not send its context: {payload}"
        raise usercontext.InvalidContextError(
            msg, field="headers", value=payload, reason="not sent"
        )
    if not isinstance(payload, Mapping):
        msg = (
            f"The {HEADER!r} header of this task is not the dict usercontext.to_job() makes, "
            f"but a {type(payload).__name__}: the message was altered after it was published."
        )
        raise usercontext.InvalidContextError(
            msg, field="headers", value=payload, reason="not a mapping"
        )
    return usercontext.child_from_job(cast("Mapping[object, object]", payload))


def _postrun(task: Any, retval: object = None, **_: Any) -> None:
    """
    Close the task's scope and unbind its context.
    """
    request = task.request
    run: tuple[AttachToken, Scope | None] | None = getattr(request, _RUN, None)
    if run is None:
        return
    setattr(request, _RUN, None)
    token, opened = run
    try:
        if opened is not None:
            # A failed task's resources see its error (a session rolls back).
            error = retval if isinstance(retval, BaseException) else None
            opened.__exit__(None if error is None else type(error), error, None)
    finally:
        usercontext.detach(token)


def _refusing(on_task_init: Callable[[str, Any], None]) -> Any:
    """
    Wrap a loader's ``on_task_init`` to fail a task whose context was refused.
    """

    def on_task_init_or_refuse(task_id: str, task: Any) -> None:
        refused: Exception | None = getattr(task.request, _REFUSED, None)
        if refused is not None:
            setattr(task.request, _REFUSED, None)
            raise refused
        on_task_init(task_id, task)

    setattr(on_task_init_or_refuse, _REFUSED, True)  # wrapped once, however often installed
    return on_task_init_or_refuse

"""
`ContextExecutor`: an executor whose tasks run with their submitter's context,
in threads or in other processes.

It has a module of its own so that `import usercontext` need not import
`concurrent.futures` (and `logging` with it) until it is used.
"""

from __future__ import annotations

import concurrent.futures
import contextvars

from collections.abc import Callable  # noqa: TC003  # the docs evaluate the annotations
from typing import Any

from ._context import UserContext, described_rules
from ._current import T, _fresh_context, _get, bind  # T: the one the docs know
from .exceptions import ConfigurationError


__all__ = ["ContextExecutor"]


def _run_in_process(
    data: dict[str, Any] | None,
    rules: str,
    fn: Callable[..., T],
    args: Any,
    kwargs: Any,
) -> T:
    """
    Run one task of a `ContextExecutor` in a worker process, under the context
    *data* describes, or none; check first that the worker's rules are *rules*,
    those of the submitter.
    """
    # Compared as text computed once per configure(): a short string costs
    # each task far less to send than the IdRules object.
    here = described_rules()
    if rules != here:
        msg = (
            "This worker process validates contexts by other rules than the process that "
            f"submitted the task: here {here}, there {rules}. usercontext.configure() "
            "applies to one process only: call it with the same rules in the pool's "
            "initializer, such as ProcessPoolExecutor(initializer=functools.partial("
            "usercontext.configure, id_rules=RULES, max_depth=DEPTH))."
        )
        raise ConfigurationError(msg)
    # A worker forked while a context was bound inherited it in its Context: run
    # every task in one where none is bound, so a task sent without a context
    # sees none, whatever the start method and whoever started the worker.
    context = _fresh_context()
    if data is None:
        return context.run(fn, *args, **kwargs)
    ctx = UserContext.from_dict(data)
    return context.run(bind(ctx)(fn), *args, **kwargs)


class ContextExecutor(concurrent.futures.Executor):
    """
    Wrap an executor so each task runs with its *submitter's* context.

    A task submitted with `submit` (or `map`, or ``loop.run_in_executor``)
    runs in a copy of the Context that was current at submission, not the one
    the pool's threads inherited when they started, and nothing it changes
    leaks into the next task the same thread runs.

    Processes cannot share a Context: for a `concurrent.futures.ProcessPoolExecutor`
    (or with *processes* set to `True`) the current `UserContext` is sent
    through `UserContext.to_dict` and bound in the worker for the task; a task
    submitted with none bound runs with none, in every worker, whatever the
    start method (fork, forkserver, spawn). The worker validates the context
    with its own rules, which must be the submitter's: if you call
    `usercontext.configure`, call it in the pool's initializer too. A task
    sent to a worker whose rules differ raises
    `usercontext.exceptions.ConfigurationError` instead of running.

    Args:
        executor: The executor to wrap; it is shut down with this one.
        processes: Whether *executor* runs tasks in other processes; guessed
            from its type when `None`.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, executor: concurrent.futures.Executor, *, processes: bool | None = None
    ) -> None:
        self._executor = executor
        self._processes = (
            isinstance(executor, concurrent.futures.ProcessPoolExecutor)
            if processes is None
            else processes
        )

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """
        Schedule ``fn(*args, **kwargs)`` under the current context.
        """
        if self._processes:
            ctx = _get(None)
            # Submitted in a Context with no user bound: a pool that forks its
            # workers on this call copies the caller's Context into them.
            return _fresh_context().run(
                self._executor.submit,
                _run_in_process,
                None if ctx is None else ctx.to_dict(),
                described_rules(),
                fn,
                args,
                kwargs,
            )
        return self._executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:  # noqa: FBT001, FBT002  # the signature of Executor.shutdown
        """
        Shut the wrapped executor down.
        """
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"<usercontext.ContextExecutor({self._executor!r})>"

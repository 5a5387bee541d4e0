"""
The pytest plugin of usercontext: fixtures for testing code that uses it,
and a leak guard, off unless you turn it on.

pytest loads it by itself once usercontext is installed (an entry point in
the ``pytest11`` group); ``-p no:usercontext`` leaves it out. Loaded, it only
adds fixtures, an option and a marker: no test run changes until you use
them.

Fixtures:

- ``user_contexts``: a `usercontext.testing.ContextFactory`; what it binds is
  unbound after the test.
- ``recording_sink``: a `usercontext.testing.RecordingSink`.
- ``isolation_checker``: a `usercontext.testing.IsolationChecker` of 10 users,
  2 calls each.

The leak guard fails a test that leaves a context bound, a scope open, a
quota slot held, an engine open or a hub running, naming each and where it
was made (see `usercontext.testing.LeakGuard`). It reports at the test's
teardown, once the test's fixtures are closed. Turn it on for the whole run
with ``--usercontext-leaks`` or the ini option ``usercontext_leaks = true``,
for some tests with the marker ``@pytest.mark.usercontext_leaks``, and off
for some with ``@pytest.mark.usercontext_leaks(False)``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import functools
import inspect

from typing import TYPE_CHECKING, Any

import pytest


if TYPE_CHECKING:
    from collections.abc import Callable, Generator

    from .testing import ContextFactory, IsolationChecker, Leak, LeakGuard, RecordingSink


__all__ = [
    "isolation_checker",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_fixture_setup",
    "pytest_pyfunc_call",
    "pytest_runtest_setup",
    "pytest_runtest_teardown",
    "recording_sink",
    "user_contexts",
]

_MARKER = "usercontext_leaks"
_FACTORY = "user_contexts"


class _Watch:
    """
    The state of one test the plugin watches: its guard, and what its body
    left bound.
    """

    def __init__(self, guard: LeakGuard | None) -> None:
        self.guard = guard
        self.left_bound: list[tuple[str, Leak]] = []


_WATCH = pytest.StashKey[_Watch]()
_CURRENT = pytest.StashKey["_Watch | None"]()
_LAST = pytest.StashKey["tuple[pytest.Item | None, Any]"]()  # the next item, the last check


def pytest_addoption(parser: pytest.Parser) -> None:
    """
    Add ``--usercontext-leaks`` and the ini option ``usercontext_leaks``.
    """
    group = parser.getgroup("usercontext")
    group.addoption(
        "--usercontext-leaks",
        action="store_true",
        default=False,
        help="Fail every test that leaves a usercontext context bound, a scope open, a quota "
        "slot held, an engine open or a hub running.",
    )
    parser.addini(
        _MARKER,
        type="bool",
        default=False,
        help="Turn the usercontext leak guard on for every test (as --usercontext-leaks).",
    )


def pytest_configure(config: pytest.Config) -> None:
    """
    Register the marker.
    """
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(enabled=True): turn the usercontext leak guard on (or off, with False) "
        "for the marked tests.",
    )


def _marked(item: pytest.Item) -> bool | None:
    """
    What the closest ``usercontext_leaks`` marker of *item* says, or `None`.
    """
    marker = item.get_closest_marker(_MARKER)
    if marker is None:
        return None
    enabled = marker.args[0] if marker.args else marker.kwargs.get("enabled", True)
    if not isinstance(enabled, bool):
        msg = (
            f"{item.nodeid}: @pytest.mark.{_MARKER}() takes True or False (or nothing, for "
            f"True), got {enabled!r}."
        )
        raise pytest.UsageError(msg)
    return enabled


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """
    Refuse a ``usercontext_leaks`` marker with another argument than a bool,
    before any test runs.
    """
    for item in items:
        _marked(item)


def _guard_enabled(item: pytest.Item) -> bool:
    """
    Tell whether the leak guard watches *item*: its closest marker decides,
    else the command line option, else the ini option.
    """
    marked = _marked(item)
    if marked is not None:
        return marked
    return bool(item.config.getoption("usercontext_leaks") or item.config.getini(_MARKER))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """
    Start the guard of a watched test before its fixtures are set up.
    """
    guard: LeakGuard | None = None
    if _guard_enabled(item):
        from .testing import LeakGuard

        guard = LeakGuard()
        # What the previous watched test's check saw is where this one starts,
        # when it ran just before: nothing opened since, and a scan is saved.
        last = item.config.stash.get(_LAST, None)
        guard._start_from(last[1] if last is not None and last[0] is item else None)
    if guard is not None or _FACTORY in getattr(item, "fixturenames", ()):
        watch = _Watch(guard)
        item.stash[_WATCH] = watch
        item.config.stash[_CURRENT] = watch
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    """
    What a fixture of a wider scope than the test's opens while the test is
    set up lives on after it: it is not the test's leak.
    """
    result = yield
    watch = request.config.stash.get(_CURRENT, None)
    if watch is not None and watch.guard is not None and fixturedef.scope != "function":
        watch.guard.accept()
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """
    Run a watched test's body through `_watched`, which looks at what it
    left bound where it ran (the task of an async test).
    """
    watch = pyfuncitem.stash.get(_WATCH, None)
    original = pyfuncitem.obj
    if watch is None or hasattr(original, "hypothesis"):
        return (yield)
    pyfuncitem.obj = _watched(original, pyfuncitem, watch)
    try:
        return (yield)
    finally:
        pyfuncitem.obj = original


def _watched(fn: Callable[..., Any], item: pytest.Function, watch: _Watch) -> Callable[..., Any]:
    from ._current import current_or_none

    def after(before: object) -> None:
        factory: ContextFactory | None = item.funcargs.get(_FACTORY)  # type: ignore[assignment]
        if factory is not None:
            factory.unbind_all()
        bound = current_or_none()
        if watch.guard is not None and bound is not None and bound is not before:
            from ._testing_leaks import Leak, _describe_ctx, where_made

            what = f"{_describe_ctx(bound)} is still bound at the end of the test"
            watch.left_bound.append(
                (_describe_ctx(bound), Leak("context", what, where_made(bound)))
            )

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def watched_async(**kwargs: Any) -> Any:
            before = current_or_none()
            try:
                return await fn(**kwargs)
            finally:
                after(before)

        return watched_async

    @functools.wraps(fn)
    def watched(**kwargs: Any) -> Any:
        before = current_or_none()
        try:
            return fn(**kwargs)
        finally:
            after(before)

    return watched


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    """
    Once a watched test's fixtures are torn down, fail it if it left
    anything behind.
    """
    watch = item.stash.get(_WATCH, None)
    if watch is None:
        return (yield)
    item.config.stash[_CURRENT] = None
    try:
        result = yield
    finally:
        leaks: list[Leak] = []
        if watch.guard is not None:
            leaks = watch.guard.stop()
            item.config.stash[_LAST] = (nextitem, watch.guard._last)
    if not leaks and not watch.left_bound:
        return result
    from ._testing_leaks import describe

    # A context left bound is named once: as an attach never detached or a
    # scope never closed if that is alive, else as left bound by the body.
    found = [
        leak
        for ctx, leak in watch.left_bound
        if not any(ctx in other.what for other in leaks if other.kind in ("attach", "scope"))
    ]
    found += [
        leak
        for leak in leaks
        if leak.kind != "context" or not any(ctx in leak.what for ctx, _ in watch.left_bound)
    ]
    pytest.fail(f"usercontext leak guard: {describe(found)}", pytrace=False)


@pytest.fixture(name=_FACTORY)
def user_contexts() -> Generator[ContextFactory, None, None]:
    """
    A `usercontext.testing.ContextFactory`: valid contexts, bound with its
    ``bind()`` until the end of the test.

    .. versionadded:: 0.1.0
    """
    from .testing import ContextFactory

    factory = ContextFactory()
    yield factory
    # What the test body bound was unbound where it ran (see _watched); what
    # a fixture bound in this thread is unbound here.
    factory.unbind_all()
    factory.forget()


@pytest.fixture(name="recording_sink")
def recording_sink() -> RecordingSink:
    """
    A `usercontext.testing.RecordingSink`, to attach to a hub.

    .. versionadded:: 0.1.0
    """
    from .testing import RecordingSink

    return RecordingSink()


@pytest.fixture(name="isolation_checker")
def isolation_checker() -> IsolationChecker:
    """
    A `usercontext.testing.IsolationChecker` of 10 users, 2 calls each at
    once: ``isolation_checker.check(fn)`` in a sync test,
    ``await isolation_checker.acheck(fn)`` in an async one.

    .. versionadded:: 0.1.0
    """
    from .testing import IsolationChecker

    return IsolationChecker()

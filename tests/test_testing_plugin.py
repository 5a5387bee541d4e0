"""
The pytest plugin, run as users run it: real pytest runs (pytester) of small
test files, with the leak guard off, turned on by the option, the ini option
and the marker, on asyncio and trio.
"""

from __future__ import annotations

import contextvars
import gc
import importlib
import re
import textwrap
import warnings

from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import pytest


# The samples' runs forget the modules first imported during them; imported
# here once, they are not imported again (under tracemalloc, slowly) per run.
for _module in (
    "anyio._backends._asyncio",
    "anyio._backends._trio",
    "usercontext._emitter",
    "usercontext._factory",
    "usercontext._local_quota",
    "usercontext._registry",
    "usercontext.testing",
):
    importlib.import_module(_module)


HEADER = """
import anyio
import pytest
import usercontext as uc

@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param

def make(user="u-1"):
    return uc.UserContext(user_id=user, thread_id="t-1", run_id="r-1")
"""


def write(pytester: pytest.Pytester, body: str) -> str:
    """
    Write a test module of *body* below `HEADER`; return its name.
    """
    pytester.makepyfile(test_sample=HEADER + textwrap.dedent(body))
    return "test_sample.py"


def line_of(pytester: pytest.Pytester, marker: str) -> str:
    """
    ``test_sample.py:N``, N the line of the sample that holds *marker*.
    """
    lines = (pytester.path / "test_sample.py").read_text().splitlines()
    (number,) = [i for i, line in enumerate(lines, 1) if marker in line]
    return f"test_sample.py:{number}"


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """
    Run pytest on the sample in this process, in a copy of this test's
    Context: what the sample leaves bound stays in the copy. Hypothesis's
    plugin is left out: it would be imported anew for every run.
    """
    args = ("-p", "no:hypothesispytest", "-p", "no:benchmark", *args)
    result = contextvars.copy_context().run(pytester.runpytest_inprocess, *args)
    # The scopes a sample left open warn as they go: let them go here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return result


LEAKY = """
KEPT = []

def test_leaks_an_attach():
    KEPT.append(uc.attach(make()))  # ATTACH
"""


class TestOptIn:
    def test_off_by_default(self, pytester):
        """
        Installed and loaded, the plugin changes no run: a test that leaves a
        context attached passes.
        """
        write(pytester, LEAKY)

        result = run(pytester, "-p", "no:cacheprovider")

        result.assert_outcomes(passed=1)

    def test_option_turns_it_on(self, pytester):
        """
        With ``--usercontext-leaks`` the leaking test errors at teardown,
        naming what leaked and the line that made it.
        """
        write(pytester, LEAKY)

        result = run(pytester, "--usercontext-leaks")

        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*usercontext leak guard: 1 thing left behind:",
                (
                    "*- usercontext.attach() of a UserContext of user 'u-1' (request '*') was "
                    "never "
                    f"detached, made at {line_of(pytester, '# ATTACH')}"
                ),
            ]
        )

    def test_ini_option_turns_it_on(self, pytester):
        """
        ``usercontext_leaks = true`` in the ini file does what the option does.
        """
        write(pytester, LEAKY)
        pytester.makeini("[pytest]\nusercontext_leaks = true\n")

        run(pytester).assert_outcomes(passed=1, errors=1)

    def test_marker_turns_it_on_and_off(self, pytester):
        """
        The marker turns the guard on for a test, and ``(False)`` turns it off
        for a test while the option is on.
        """
        write(
            pytester,
            """
            @pytest.mark.usercontext_leaks
            def test_on():
                uc.attach(make())

            @pytest.mark.usercontext_leaks(False)
            def test_off():
                uc.attach(make())
            """,
        )

        plain = run(pytester)
        with_option = run(pytester, "--usercontext-leaks")

        plain.assert_outcomes(passed=2, errors=1)
        plain.stdout.fnmatch_lines(["*ERROR at teardown of test_on*"])
        with_option.assert_outcomes(passed=2, errors=1)

    def test_marker_takes_a_bool(self, pytester):
        """
        A marker argument other than True or False is a usage error.
        """
        write(
            pytester,
            """
            @pytest.mark.usercontext_leaks("yes")
            def test_x():
                pass
            """,
        )

        result = run(pytester)

        assert result.ret != 0
        result.stderr.fnmatch_lines(
            [
                (
                    "*test_x: @pytest.mark.usercontext_leaks() takes True or False (or nothing, "
                    "for True), got 'yes'."
                )
            ]
        )

    def test_disabled_plugin(self, pytester):
        """
        ``-p no:usercontext`` leaves the plugin out: its fixtures are unknown.
        """
        write(pytester, "def test_x(user_contexts):\n    pass\n")

        result = run(pytester, "-p", "no:usercontext")

        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*fixture 'user_contexts' not found*"])


class TestLeaks:
    def test_every_kind_named_with_its_line(self, pytester):
        """
        Each kind of leak fails its test, named with the line that made it:
        a context bound, a scope open, a scope dropped open, a lease held, a
        slot whose lease was dropped, an engine in use, idle engines of an
        unclosed factory, a running hub; clean tests pass.
        """
        write(
            pytester,
            """
            import gc

            pytestmark = pytest.mark.usercontext_leaks
            KEPT = []
            REGISTRY = uc.Registry()
            QUOTA = uc.LocalQuota(per_key=2)

            def test_bound():
                uc.bind(make()).__enter__()  # BOUND

            def test_scope():
                registry = uc.Registry()
                KEPT.append(registry.scope(make()).__enter__())  # SCOPE

            def test_scope_dropped(recwarn):
                uc.isolated(REGISTRY.scope(make()).__enter__)()  # dropped, open
                gc.collect()

            def test_lease():
                quota = uc.LocalQuota(per_key=2)
                KEPT.append(quota.acquire_nowait("k-1"))  # LEASE

            def test_dropped_lease():
                QUOTA.acquire_nowait("k-2")

            async def test_engine_in_use(anyio_backend):
                factory = uc.EngineFactory(lambda ctx: object(), per_user=1)  # FACTORY
                await factory.engine(make()).__aenter__()

            async def test_idle_engines(anyio_backend):
                factory = uc.EngineFactory(lambda ctx: object(), per_user=1, pool_idle=2)  # IDLE
                KEPT.append(factory)
                async with factory.engine(make()):
                    pass

            async def test_hub(anyio_backend):
                hub = uc.EmitterHub()  # HUB
                KEPT.append(hub)
                await hub.__aenter__()

            async def test_clean(anyio_backend):
                registry = uc.Registry()
                async with uc.EmitterHub(), registry.scope(make()):
                    async with uc.EngineFactory(lambda ctx: object()) as factory:
                        async with factory.engine():
                            pass
            """,
        )

        result = run(pytester, "-W", "ignore")

        result.assert_outcomes(passed=13, errors=11)
        result.stdout.fnmatch_lines_random(
            [
                (
                    "*- a UserContext of user 'u-1' (request '*') is still bound at the end of "
                    "the test, made at test_sample.py:10 (called from "
                    f"{line_of(pytester, '# BOUND')})"
                ),
                (
                    "*- a Scope of a UserContext of user 'u-1' (request '*') is still open, "
                    "made at "
                    f"{line_of(pytester, '# SCOPE')}"
                ),
                (
                    "*- 1 scope of <usercontext.Registry(num_providers=0)> entered and never "
                    "closed "
                    "(the Scope objects are gone) (made before the leak guard started, so where is "
                    "unknown)"
                ),
                (
                    "*- a quota slot of key 'k-1' is still held (<usercontext.Lease(key='k-1', "
                    f"held)>), made at {line_of(pytester, '# LEASE')}"
                ),
                (
                    "*- <usercontext.LocalQuota(*in_use=1*)> holds 1 slot that no live lease or "
                    "engine accounts for: a lease was dropped without being released (made before "
                    "the leak guard started, so where is unknown)"
                ),
                (
                    "*- <usercontext.EngineFactory(*in_use=1*)> has 1 engine still in use "
                    "('u-1': 1)"
                    f", made at {line_of(pytester, '# FACTORY')}"
                ),
                (
                    "*- <usercontext.EngineFactory(*)> has 1 idle engine never closed (close the "
                    f"factory with `await factory.aclose()`), made at {line_of(pytester, '# IDLE')}"
                ),
                (
                    "*- <usercontext.EmitterHub(*running*)> is still running: close it with `await "
                    f"hub.aclose()`, made at {line_of(pytester, '# HUB')}"
                ),
            ]
        )

    def test_async_body_left_bound(self, pytester):
        """
        An async test that leaves a context bound in its own task is caught on
        asyncio and trio, though that task's Context is not the test
        runner's thread's.
        """
        write(
            pytester,
            """
            @pytest.mark.usercontext_leaks
            async def test_bound(anyio_backend):
                ctx = uc.UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")  # MADE
                uc.bind(ctx).__enter__()
            """,
        )

        result = run(pytester)

        result.assert_outcomes(passed=2, errors=2)
        result.stdout.fnmatch_lines(
            [f"*is still bound at the end of the test, made at {line_of(pytester, '# MADE')}"] * 2
        )

    def test_longer_lived_fixtures_are_not_leaks(self, pytester):
        """
        What a module-scoped fixture opens during a test's setup lives on
        after that test, and what a function-scoped fixture closes at
        teardown was closed in time: neither fails the test.
        """
        write(
            pytester,
            """
            pytestmark = pytest.mark.usercontext_leaks

            @pytest.fixture(scope="module")
            def shared_quota():
                quota = uc.LocalQuota(per_key=5)
                lease = quota.acquire_nowait("k-shared")
                yield quota
                lease.release()

            @pytest.fixture
            def scope():
                with uc.Registry().scope(make()) as scope:
                    yield scope

            def test_one(shared_quota, scope):
                assert uc.current().user_id == "u-1"

            def test_two(shared_quota):
                assert shared_quota.stats().in_use == 1
            """,
        )

        run(pytester).assert_outcomes(passed=2)

    def test_failing_teardown_is_not_masked(self, pytester):
        """
        A fixture whose teardown fails reports its own error; the guard adds
        no second one.
        """
        write(
            pytester,
            """
            @pytest.fixture
            def broken():
                yield
                raise RuntimeError("teardown broke")

            @pytest.mark.usercontext_leaks
            def test_x(broken):
                uc.attach(make())
            """,
        )

        result = run(pytester)

        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*RuntimeError: teardown broke*"])
        result.stdout.no_fnmatch_line("*leak guard*")


class TestFixtures:
    def test_user_contexts(self, pytester):
        """
        ``user_contexts`` makes valid contexts and binds them for the test
        body, sync or async (asyncio and trio), and in a fixture, with the
        guard on or off; after each test nothing is bound, so the guard finds
        nothing.
        """
        write(
            pytester,
            """
            pytestmark = pytest.mark.usercontext_leaks

            @pytest.fixture
            def alice(user_contexts):
                return user_contexts.bind(user_id="alice")

            def test_sync(user_contexts):
                ctx = user_contexts.bind()
                assert uc.current() is ctx
                assert [c.user_id for c in user_contexts.users(2)] == ["u-2", "u-3"]

            async def test_async(user_contexts, anyio_backend):
                ctx = user_contexts.bind()
                child = user_contexts.bind(ctx.child(run_id="r-9"))
                assert uc.current() is child

            def test_in_a_fixture(alice):
                assert uc.current() is alice

            @pytest.mark.usercontext_leaks(False)
            def test_unguarded(user_contexts):
                assert user_contexts.bind() is uc.current()

            def test_after():
                assert uc.current_or_none() is None
            """,
        )

        run(pytester).assert_outcomes(passed=6)

    def test_isolation_checker(self, pytester):
        """
        ``isolation_checker`` passes isolated code and fails a shared cache,
        in threads and in tasks (asyncio and trio), naming the users and the
        value seen.
        """
        write(
            pytester,
            """
            async def test_isolated(isolation_checker, anyio_backend):
                async def handler(ctx):
                    await anyio.sleep(0)
                    return {"user": uc.current().user_id}

                report = await isolation_checker.acheck(handler)
                assert report.calls == 20

            def test_shared_cache(isolation_checker):
                cache = {}

                def handler(ctx):
                    return cache.setdefault("profile", {"owner": ctx.user_id})

                isolation_checker.check(handler)
            """,
        )

        result = run(pytester)

        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(
            [
                "E*AssertionError: 18 cross-user observations in 20 calls of 10 users:",
                *["E*- the call of user 'u-?' saw user 'u-?': result[[]'owner'] is 'u-?'"] * 18,
            ]
        )

    def test_recording_sink(self, pytester):
        """
        ``recording_sink`` records what a hub delivers to it.
        """
        write(
            pytester,
            """
            async def test_sink(recording_sink, anyio_backend):
                async with uc.EmitterHub() as hub:
                    hub.attach("u-1", recording_sink)
                    hub.emitter(make()).emit_nowait(uc.AGENT_STARTED)
                    with anyio.fail_after(5):
                        await recording_sink.wait_for(1)
                assert [e.type for e in recording_sink.events] == ["agent_started"]
            """,
        )

        run(pytester).assert_outcomes(passed=2)


class TestHowTo:
    def test_examples_pass(self, pytester):
        """
        The how-to page's examples, one test module, pass as a user runs
        them, on asyncio and trio, with the leak guard on for every test.
        """
        page = Path(__file__).resolve().parent.parent / "docs" / "how-to-testing.md"
        blocks = re.findall(r"^```python\n(.*?)^```$", page.read_text(), re.MULTILINE | re.DOTALL)
        pytester.makepyfile(test_howto="\n".join(blocks))

        run(pytester, "--usercontext-leaks").assert_outcomes(passed=11)

"""
Tests of the floors and the event harness the report shares with the
benchmarks (`usercontext._report.floors`), in the paths a report run does not
take.
"""

from __future__ import annotations

import asyncio
import json

from usercontext._report import floors


class TestDictQuota:
    def test_grants_then_refuses(self):
        """
        The floor quota grants up to its limit, then refuses by returning None
        and by raising.
        """
        quota = floors.DictQuota(1)

        async def main():
            assert await quota.acquire("u-1") == "u-1"
            assert quota.try_acquire("u-1") is None
            try:
                await quota.acquire("u-1", timeout=0)
            except floors.RejectedError as e:
                return e.args
            return None

        assert asyncio.run(main()) == ("u-1",)


class TestHelpers:
    def test_count_lines_stops_at_end_of_stream(self):
        """
        Counting lines stops when the peer closes early.
        """

        async def run():
            reader = asyncio.StreamReader()
            reader.feed_data(b"a\nb\n")
            reader.feed_eof()
            await floors._count_lines(reader, 10)

        asyncio.run(run())

    def test_counting_sink_reached_already(self):
        """
        Waiting for a count already reached returns at once.
        """
        sink = floors.CountingSink()

        asyncio.run(sink.wait_for(0))

        assert sink.reached is None

    def test_floor_json_matches_event_json(self):
        """
        The floor writes the same JSON shape as `Event.json`.
        """
        floor = floors.FloorEvents().make()

        assert set(json.loads(floors._floor_json(floor))) == {
            "type",
            "seq",
            "event_id",
            "ts",
            "user_id",
            "thread_id",
            "run_id",
            "request_id",
            "data",
        }


class TestFloorScope:
    def test_sync(self):
        """
        The floor scope binds its context, makes a resource once per scope from
        its generator, and finishes the generators in reverse order on exit.
        """
        log = []

        def provider(name):
            def make(ctx):
                log.append(("open", name, ctx))
                yield name
                log.append(("close", name))

            return make

        providers = {"a": provider("a"), "b": provider("b")}
        with floors.FloorScope(providers, "ctx") as scope:
            assert floors.floor_var.get() == "ctx"
            assert [scope.get("a"), scope.get("a"), scope.get("b")] == ["a", "a", "b"]

        assert floors.floor_var.get(None) is None
        assert log == [("open", "a", "ctx"), ("open", "b", "ctx"), ("close", "b"), ("close", "a")]

    def test_async(self):
        """
        The same with async generators, and async with.
        """
        log = []

        async def make(ctx):
            log.append(("open", ctx))
            yield "s"
            log.append("close")

        async def main():
            async with floors.FloorScope({"s": make}, "ctx") as scope:
                values = [await scope.aget("s"), await scope.aget("s")]
                bound = floors.floor_var.get()
            return values, bound

        assert asyncio.run(main()) == (["s", "s"], "ctx")
        assert log == [("open", "ctx"), "close"]

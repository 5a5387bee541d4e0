"""
Tests of the lean reference of the "Concurrent HTTP requests" section
(`usercontext._report.lean`): the example service written by hand keeps
every guarantee the library gives, so that its cost is a fair limit.
"""

from __future__ import annotations

import asyncio
import contextvars
import json

import pytest

from usercontext._report import http, lean
from usercontext._report.lean import (
    LeanContext,
    LeanQuota,
    LeanService,
    LeanStream,
    current_lean,
    in_context,
)


CTX = LeanContext("user-001", "web", "agent", "r-1")
var: contextvars.ContextVar[str] = contextvars.ContextVar("test_lean", default="outer")


def _scope(token=b"Bearer tok-001", request_id=b"r-1"):
    scope = http._http_scope(token.decode(), "x")
    scope["headers"] = [(b"authorization", token), (b"x-request-id", request_id)]
    return scope


async def _call(service, scope):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await service.asgi(scope, receive, send)
    return sent


class TestInContext:
    def test_isolated(self):
        """
        A coroutine run in a copied Context sees the caller's variables, and
        what it sets stays in it, across suspensions.
        """

        async def request():
            seen = var.get()
            var.set("inner")
            await asyncio.sleep(0)
            return seen, var.get()

        async def main():
            result = await in_context(contextvars.copy_context(), request())
            return result, var.get()

        assert asyncio.run(main()) == (("outer", "inner"), "outer")

    def test_errors_and_cancellation_go_through(self):
        """
        An error raised inside comes out; a cancellation of the caller is
        thrown into the coroutine, which can clean up.
        """
        cleaned = []

        async def fails():
            await asyncio.sleep(0)
            raise ValueError("boom")

        async def waits():
            try:
                await asyncio.sleep(10)
            finally:
                cleaned.append(var.get())

        async def main():
            with pytest.raises(ValueError, match="boom"):
                await in_context(contextvars.copy_context(), fails())
            task = asyncio.ensure_future(in_context(contextvars.copy_context(), waits()))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        assert cleaned == ["outer"]


class TestQuota:
    def test_fifo_and_forgets(self):
        """
        Slots go to waiters in arrival order; a cancelled waiter leaves the
        line; nothing is kept for a key once it is idle.
        """
        quota = LeanQuota(1)
        order = []

        async def take(name):
            await quota.acquire("u")
            order.append(name)
            await asyncio.sleep(0.001)
            quota.release("u")

        async def main():
            await quota.acquire("u")
            tasks = [asyncio.ensure_future(take(n)) for n in "abcd"]
            await asyncio.sleep(0)
            tasks[1].cancel()
            await asyncio.sleep(0)
            assert len(quota._keys["u"][1]) == 3
            tasks[0].cancel()  # dropped by the release below before it runs
            quota.release("u")
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
        assert order == ["c", "d"]
        assert quota.keys() == 0

    def test_granted_then_cancelled_passes_the_slot_on(self):
        """
        A waiter cancelled after its slot was granted gives the slot to the
        next waiter; a waiter cancelled while the last one leaves no key.
        """
        quota = LeanQuota(1)

        async def main():
            await quota.acquire("u")
            first = asyncio.ensure_future(quota.acquire("u"))
            second = asyncio.ensure_future(quota.acquire("u"))
            await asyncio.sleep(0)
            quota.release("u")  # granted to first, which is cancelled before it runs
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await second
            assert quota._keys["u"][0] == 1
            waiter = asyncio.ensure_future(quota.acquire("u"))
            await asyncio.sleep(0)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            quota.release("u")

        asyncio.run(main())
        assert quota.keys() == 0


class TestStream:
    def test_ordered_batches_one_wakeup(self):
        """
        Events emitted in one turn reach the sink in order, in one batch, with
        their data copied.
        """
        batches = []
        data = {"n": 1}

        async def main():
            stream = LeanStream(batches.append)
            for _ in range(5):
                await stream.emit(CTX, "t", data)
            data["n"] = 2
            await asyncio.sleep(0)
            await stream.emit(CTX, "t", data)
            await stream.aclose()
            return stream

        stream = asyncio.run(main())
        assert [len(b) for b in batches] == [5, 1]
        assert [e[0] for b in batches for e in b] == [1, 2, 3, 4, 5, 6]
        assert [e[2]["n"] for b in batches for e in b] == [1, 1, 1, 1, 1, 2]
        assert batches[0][0][3:5] == ("user-001", "r-1")
        assert stream.delivered == stream.seq == 6

    def test_bounded(self, monkeypatch):
        """
        At the bound, emitters wait in order for the consumer to make room; one
        cancelled while waiting, or after room was made for it, adds nothing.
        """
        monkeypatch.setattr(lean, "MAXSIZE", 2)
        got = []

        async def main():
            stream = LeanStream(lambda batch: got.extend(e[2]["n"] for e in batch))
            emits = [asyncio.ensure_future(stream.emit(CTX, "t", {"n": n})) for n in range(1, 6)]
            await asyncio.sleep(0)  # 1 and 2 buffered, 3, 4 and 5 wait
            assert len(stream._room) == 3
            emits[2].cancel()  # waiting: leaves the line
            await asyncio.sleep(0)  # the consumer delivers 1, 2 and makes room for 4, 5
            assert stream._reserved == 2
            emits[3].cancel()  # room was made for it: gives it back
            await asyncio.gather(*emits, return_exceptions=True)
            await stream.emit(CTX, "t", {"n": 6})
            await stream.aclose()
            return stream

        stream = asyncio.run(main())
        assert got == [1, 2, 5, 6]
        assert stream._reserved == 0
        assert not stream._room

    def test_data_validated(self):
        """
        Data that is not a dict of str keys and JSON scalars is refused at
        emit time.
        """

        async def main():
            stream = LeanStream(lambda batch: None)
            for bad in ([1], {1: "x"}, {"x": object()}):
                with pytest.raises(TypeError, match="Event data must be a dict"):
                    await stream.emit(CTX, "t", bad)
            await stream.aclose()
            return stream

        assert asyncio.run(main()).seq == 0


class TestService:
    def test_serves_and_leaves_nothing(self):
        """
        The scenario's requests all succeed with their own ids; every session,
        engine and event is accounted for, and nothing is left.
        """
        run, _ = asyncio.run(http._serve_in_process(LeanService(), per_user=3))

        assert (run.requests, run.failed, run.cross_user) == (300, 0, 0)
        state = run.state
        assert state["requests"] == state["sessions_closed"] == state["engines_closed"] == 300
        assert state["events_emitted"] == state["events_delivered"] == 600
        assert state["events_received"] == 600
        assert state["events_wrong_user"] == state["streams"] == state["quota_keys"] == 0

    def test_request_ids_and_refusals(self):
        """
        A valid incoming request id is kept; an invalid one is replaced; an
        unknown token gets a 401. The request's context is bound only in its
        own Context.
        """
        service = LeanService(work_s=0)

        async def main():
            ok = await _call(service, _scope())
            bad = await _call(service, _scope(request_id=b"bad id"))
            refused = await _call(service, _scope(token=b"Bearer nope"))
            return ok, bad, refused, current_lean.get(None)

        ok, bad, refused, outside = asyncio.run(main())
        assert json.loads(ok[1]["body"])["request_id"] == "r-1"
        assert len(json.loads(bad[1]["body"])["request_id"]) == 32
        assert refused[0]["status"] == 401
        assert outside is None

    def test_failure_closes_everything_and_answers_500(self):
        """
        A request that fails closes its engine, quota slot and session (last
        taken first closed) and answers 500 before the error goes on.
        """
        service = LeanService(work_s=0)

        class Broken:
            async def emit(self, *args):
                raise RuntimeError("sink gone")

        service.streams["user-001"] = Broken()

        async def main():
            sent = []

            async def send(message):
                sent.append(message)

            with pytest.raises(RuntimeError, match="sink gone"):
                await service.asgi(_scope(), None, send)
            return sent

        sent = asyncio.run(main())
        assert sent[0]["status"] == 500
        counts = service.counts
        assert counts["sessions_opened"] == counts["sessions_closed"] == 1
        assert counts["engines_created"] == counts["engines_closed"] == 1
        assert service.quota.keys() == 0

    def test_cancelled_request_closes_everything(self):
        """
        A request cancelled during its work closes what it took and sends
        nothing.
        """
        service = LeanService(work_s=10)
        sent = []

        async def send(message):
            sent.append(message)

        async def main():
            task = asyncio.ensure_future(service.asgi(_scope(), None, send))
            await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(main())
        assert sent == []
        assert service.counts["sessions_closed"] == service.counts["engines_closed"] == 1
        assert service.quota.keys() == 0

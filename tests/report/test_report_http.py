"""
Tests of the "Concurrent HTTP requests" report section: it runs at the quick
scale with the figures it promises, it fails when responses cross users or
state is left behind, and it runs under uvicorn when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import re

from typing import TYPE_CHECKING

import attrs
import pytest

import usercontext

from usercontext.__main__ import main
from usercontext._report import contexts, frame, http, service
from usercontext._report.frame import Progress, SectionResult, Table
from usercontext._report.scale import DEFAULT, QUICK
from usercontext._report.sections import SECTIONS


if TYPE_CHECKING:
    from usercontext._report.rows import Row


METRICS = (
    "Success rate (every run)",
    "Latency P50 / P95 / P99, best run",
    "P50 / P99 vs the same service written by hand without the library",
    "Physical limit: the lean reference",
    "Cross-user responses",
    "Unsaturated: 100 requests at once, P50 vs the floor's",
    "Memory over ",
    "Per-request state left after every run",
)
# The latency rows depend on the machine (and on a tracer slowing it down):
# their status is not checked, only that they have one.
STATUS = dict.fromkeys(METRICS, "PASS") | {
    METRICS[1]: "PASS or MISS",
    METRICS[2]: "PASS or MISS",
    METRICS[3]: "INFO",
    METRICS[5]: "PASS or MISS",
}
KINDS = (
    "correctness",
    "performance",
    "performance",
    "info",
    "correctness",
    "performance",
    "correctness",
    "correctness",
)


@pytest.fixture(name="few_requests")
def _few_requests(monkeypatch):
    """
    One request per user instead of ten: 100 requests a run.
    """
    monkeypatch.setattr(http, "REQUESTS_PER_USER", 1)


def _check_rows(result: SectionResult) -> dict[str, Row]:
    """
    Check the rows' metrics and statuses; return the rows by metric.
    """
    rows = {}
    for row, metric, kind in zip(result.rows, METRICS, KINDS, strict=True):
        assert row.metric.startswith(metric)
        assert row.kind == kind
        assert row.status in STATUS[metric].split(" or ")
        rows[metric] = row
    return rows


def _check_lean_and_unsaturated(result: SectionResult) -> None:
    """
    Check the lean reference's run and the unsaturated scenario's figures.
    """
    scenario = result.figures["legacy_scenario"]
    (lean,) = scenario["lean"]
    assert lean["state"]["sessions_closed"] == lean["state"]["engines_closed"] == 1000
    assert lean["state"]["events_received"] == 2000
    assert lean["state"]["streams"] == lean["state"]["quota_keys"] == 0

    unsaturated = result.figures["unsaturated"]
    assert (unsaturated["requests"], unsaturated["runs"]) == (100, 3)
    assert unsaturated["failed_or_cross_user"] == 0
    for side in ("ours", "floor", "lean"):
        assert [r["succeeded"] for r in unsaturated[side]] == [100, 100, 100]
        assert all(r["p50_ms"] >= 10.0 for r in unsaturated[side])
    assert unsaturated["p50"]["ratio"] > 0


class TestSection:
    def test_quick(self):
        """
        At the quick scale the section runs 1,000 requests from 100 users
        through ours and the floor, reports every figure, and finds no
        cross-user response or event and no state left behind.
        """
        err = io.StringIO()
        progress = Progress(len(http.STEPS), err)

        result = http.http_section(QUICK, progress)

        assert re.findall(r"http: (.+) \.\.\.", err.getvalue()) == list(http.STEPS)
        rows = _check_rows(result)
        assert rows[METRICS[4]].achieved.startswith("**0** in 1,000 responses, 0 in 2,000 events")
        assert rows[METRICS[7]].achieved == "**0** after 1,500 requests in 5 runs"
        assert "Memory over 200 requests" in rows[METRICS[6]].metric
        assert rows[METRICS[2]].goal.value == http.TARGET == 1.3
        assert rows[METRICS[5]].goal.value == http.UNSATURATED_TARGET == 1.1

        scenario = result.figures["legacy_scenario"]
        assert scenario["server"] == "in-process"
        assert (scenario["users"], scenario["requests"], scenario["per_user"]) == (100, 1000, 2)
        assert scenario["success_rate"] == 1.0
        assert scenario["cross_user_responses"] == scenario["cross_user_events"] == 0
        assert scenario["events_received"] == 2000
        assert scenario["legacy"]["p99_ms"] == 250.0
        for side in ("ours", "floor", "lean"):
            (run,) = scenario[side]
            assert (run["requests"], run["succeeded"], run["failed"]) == (1000, 1000, 0)
            assert run["cross_user"] == 0
            assert 10.0 <= run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
            assert run["wall_s"] > 0.01
        (ours,) = scenario["ours"]
        state = ours["state"]
        assert state["requests"] == state["sessions_closed"] == state["engines_closed"] == 1000
        assert state["events_emitted"] == state["events_delivered"] == 2000
        assert state["peak_engines"] <= 200
        for key in ("p50", "p99"):
            assert scenario[key]["ratio"] > 0
            assert len(scenario[key]["ours_ms"]) == len(scenario[key]["floor_ms"]) == 1
            assert scenario["lean_ratios"][key]["ratio"] > 0
            assert len(scenario["lean_ratios"][key]["ours_ms"]) == 1
        _check_lean_and_unsaturated(result)

        memory = result.figures["memory"]
        assert memory["requests"] == 200
        assert memory["warm_up_rounds"] == 0
        assert 0 < memory["retained_bytes"] < http.RETAINED_LIMIT
        assert memory["peak_growth_bytes"] >= memory["retained_bytes"]
        left = result.figures["state_left"]
        assert (left["runs"], left["requests"]) == (5, 1500)
        assert all(left[key] == 0 for key in http._LEFT)
        assert "in-process" in result.notes[0]
        assert "1 time(s) each" in result.notes[1]
        assert "Ours is held to 1.3x its P50 and P99" in result.notes[2]
        assert "Lean reference (the physical limit)" in result.notes[3]
        assert "3 run(s) of each service" in result.notes[4]
        json.dumps(result.figures)  # all of it goes to --json

    def test_registered(self):
        """
        The report runs the section after the event dispatch section.
        """
        keys = [s.key for s in SECTIONS]
        section = SECTIONS[keys.index("http")]

        assert keys.index("http") == keys.index("events") + 1
        assert section.title == "Concurrent HTTP requests"
        assert section.steps == http.STEPS
        assert section.run is http.http_section

    def test_cross_user_responses_fail(self, monkeypatch, few_requests):
        """
        A service that keeps the current request in a shared attribute (the
        legacy singleton) answers with other users' ids: every such response
        is counted and the row fails, and so do failed requests.
        """

        class Leaky(http.Service):
            async def _app(self, scope, receive, send):
                if scope["type"] == "lifespan":
                    await super()._app(scope, receive, send)
                    return
                self.shared = usercontext.current()
                await asyncio.sleep(0.001)
                if usercontext.current().user_id.endswith("7"):
                    await service._json_response(send, 500, {"error": "boom"})
                    return
                payload = {
                    "user_id": self.shared.user_id,
                    "request_id": self.shared.request_id,
                    "session_user_id": self.shared.user_id,
                    "engine_user_id": self.shared.user_id,
                }
                await service._json_response(send, 200, payload)

        monkeypatch.setattr(http, "Service", Leaky)
        out = Table("http")

        http._legacy_rows(out, QUICK, "in-process")

        scenario = out.figures["legacy_scenario"]
        assert scenario["cross_user_responses"] > 0
        assert scenario["success_rate"] == 0.9
        success, _, _, _, cross = out.rows
        assert success.status == cross.status == "FAIL"
        assert success.achieved == "90 of 100: **90.0%**"
        assert cross.achieved.startswith(f"**{scenario['cross_user_responses']}** in 100 ")

    def test_slower_than_the_floor_misses(self, monkeypatch, few_requests):
        """
        A service three times slower than the floor misses the ratio rows of
        both scenarios, with the ratios in the rows; the lean reference stays
        information.
        """

        class Slow(http.Service):
            def __init__(self):
                super().__init__(work_s=3 * service.WORK_S)

        monkeypatch.setattr(http, "Service", Slow)
        monkeypatch.setattr(http, "UNSATURATED_ROUNDS", 1)
        out = Table("http")

        http._legacy_rows(out, QUICK, "in-process")
        http._unsaturated_rows(out, QUICK, "in-process")

        _, _, vs_floor, lean, _, unsaturated = out.rows
        scenario = out.figures["legacy_scenario"]
        # Well past the targets (1.3x, 1.1x), if short of 3x: a loaded
        # machine adds its delays to both sides (1.997x seen beside 2 other suites).
        assert scenario["p50"]["ratio"] > 1.5
        assert vs_floor.status == unsaturated.status == "MISS"
        assert lean.status == "INFO"
        assert f"**{scenario['p50']['ratio']:.2f}x / " in vs_floor.achieved
        ratio = out.figures["unsaturated"]["p50"]["ratio"]
        assert ratio > 1.5
        assert f"**{ratio:.2f}x**" in unsaturated.achieved

    def test_state_left_fails(self):
        """
        State left after a run, or a session, engine or event not accounted
        for, fails the row and is named in it.
        """
        idle = http.Service().state()
        left = http.Run("in-process", state={**idle, "scopes": 1, "hub_users": 2})
        unbalanced = http.Run("in-process", state={**idle, "sessions_opened": 1})
        scale = attrs.evolve(QUICK, memory_contexts=100)

        for run, text in ((left, "; scopes 1; hub_users 2"), (unbalanced, "not every")):
            out = Table("http")
            http._memory_rows(out, scale, [run])

            row = out.rows[-1]
            assert row.status == "FAIL"
            assert text in row.achieved

    def test_memory_warms_up_at_full_scale(self):
        """
        At a scale with several rounds, a first round warms the service up
        before memory is measured, and both rounds' requests are accounted for.
        """
        scale = attrs.evolve(QUICK, scenario_rounds=2, memory_contexts=1_000)
        out = Table("http")

        http._memory_rows(out, scale, [])

        assert out.figures["memory"]["warm_up_rounds"] == 1
        assert out.figures["memory"]["requests"] == 100
        assert out.figures["state_left"]["requests"] == 200
        assert [row.status for row in out.rows] == ["PASS", "PASS"]


class TestClients:
    def test_check(self):
        """
        A response counts as failed unless it is a 200, and as cross-user if
        any id in it is not the request's.
        """
        run = http.Run("in-process")
        body = {
            "user_id": "u-1",
            "request_id": "r-1",
            "session_user_id": "u-1",
            "engine_user_id": "u-1",
        }

        def check(status=200, echoed=b"r-1", **changes):
            return run.check("u-1", "r-1", status, echoed, json.dumps(body | changes).encode())

        assert check()
        assert not check(status=500)
        assert check(engine_user_id="u-2")
        assert check(echoed=b"r-2")
        assert check(request_id="r-2")

        assert (run.failed, run.cross_user) == (1, 3)

    def test_receive_after_the_request(self):
        """
        The in-process client answers a second ``receive`` with a disconnect,
        as a server does once the request was read.
        """
        seen = []

        async def app(scope, receive, send):
            seen.extend([(await receive())["type"], (await receive())["type"]])
            await http.FloorService(work_s=0).asgi(scope, receive, send)

        run = asyncio.run(http._in_process_round(app, 1))

        assert seen[:2] == ["http.request", "http.disconnect"]
        assert (run.requests, run.failed, run.cross_user) == (100, 0, 0)

    def test_keep_alive_client_counts_failures(self, few_requests):
        """
        Over real connections, responses that are not 200 are counted as
        failed and not timed.
        """

        async def main():
            async def handle(reader, writer):
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 503 Busy\r\ncontent-length: 2\r\n\r\nno")
                    await writer.drain()

            async def serve(reader, writer):
                with contextlib.suppress(asyncio.IncompleteReadError):
                    await handle(reader, writer)
                writer.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            async with server:
                port = server.sockets[0].getsockname()[1]
                return await http._keep_alive_client(port)

        run = asyncio.run(main())

        assert (run.requests, run.failed, run.latencies_ms) == (100, 100, [])


@pytest.mark.server("uvicorn")
class TestUvicorn:
    def test_section_under_uvicorn(self, few_requests):
        """
        `with_server` makes the section serve the example app under uvicorn,
        over keep-alive connections, with the same checks; the other sections
        are left alone.
        """
        sections = http.with_server(SECTIONS, "uvicorn")
        assert [s.key for s in sections] == [s.key for s in SECTIONS]
        section = next(s for s in sections if s.key == "http")
        others = [s for s in sections if s.key != "http"]
        assert all(s in SECTIONS for s in others)

        result = section.run(QUICK, Progress(len(http.STEPS), io.StringIO()))

        rows = _check_rows(result)
        assert rows[METRICS[4]].achieved.startswith("**0** in 100 responses, 0 in 200 events")
        scenario = result.figures["legacy_scenario"]
        assert scenario["server"] == "uvicorn"
        (ours,) = scenario["ours"]
        assert (ours["requests"], ours["succeeded"], ours["cross_user"]) == (100, 100, 0)
        assert ours["state"]["hub_users"] == ours["state"]["scopes"] == 0
        assert "under uvicorn on 127.0.0.1, over 400 keep-alive connections" in result.notes[0]
        assert "from a request's write" in result.notes[1]

    def test_startup_failure(self):
        """
        If the app fails to start under uvicorn, the run stops with an error
        instead of waiting for a server that never comes.
        """

        class Broken(http.FloorService):
            async def _app(self, scope, receive, send):
                await receive()
                await send({"type": "lifespan.startup.failed", "message": "broken"})

        with pytest.raises(RuntimeError, match="uvicorn did not start"):
            http._run(Broken(), "uvicorn")


class TestCommand:
    def test_http_server_option(self, monkeypatch, tmp_path):
        """
        `usercontext report --http-server uvicorn` runs the report with the
        HTTP section under uvicorn; by default it runs in-process.
        """
        calls = []
        monkeypatch.setattr(frame, "run_report", lambda **kw: calls.append(kw) or 0)
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *args: object() if name == "uvicorn" else find_spec(name, *args),
        )

        assert main(["report", "--quick", "--http-server", "uvicorn"]) == 0
        assert main(["report"]) == 0

        uvicorn, default = calls
        assert uvicorn["scale"] is QUICK
        assert uvicorn["json_path"] is None
        runs = {s.key: s.run for s in uvicorn["sections"]}
        assert runs["http"] is not http.http_section
        assert runs["contexts"] is contexts.contexts_section
        assert default == {
            "scale": DEFAULT,
            "json_path": None,
            "out_dir": None,
            "sections": SECTIONS,
            "strict": False,
        }

    def test_http_server_without_uvicorn(self, monkeypatch, capsys):
        """
        Asking for uvicorn without it installed is a usage error that says how
        to install it.
        """
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

        with pytest.raises(SystemExit) as ei:
            main(["report", "--http-server", "uvicorn"])

        assert ei.value.code == 2
        assert "--http-server uvicorn needs uvicorn: pip install uvicorn" in capsys.readouterr().err

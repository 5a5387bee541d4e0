"""
Tests of ``usercontext report --out``: the files it writes, the charts of the
HTML report (`usercontext._report.charts`, `usercontext._report.output`), and
the HTML report opened in a real browser (headless Chromium): it renders,
every chart has its data, the console shows no error, and the page fetches
nothing.

The report here is a real one, of the sections that have charts at a small
scale, with one made-up section whose rows fail and miss, to see them
highlighted.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import sys

import attrs
import pytest

from browser import find_chromium, open_page
from report_helpers import TINY, fake_row
from test_report_frame import _section

from usercontext._report import charts, output, timing
from usercontext._report.frame import SectionResult, run_report
from usercontext._report.sections import SECTIONS


SMALL = attrs.evolve(
    TINY,
    scenario_rounds=1,
    memory_contexts=200,
    leak_cycles=4,
    cycle_requests=100,
    load_levels=(1, 50),
    load_level_s=0.1,
    stability_s=1.0,
    stability_windows=4,
)
CHARTED = ("events", "http", "memory", "stability")
CHART_KEYS = ["event_latency", "http_latency", "leak_cycles", "throughput", "stability"]


def _failing_section():
    def run(scale, progress):
        out = progress.table("checks")
        progress("checks", "only step")
        out.rows += [
            fake_row("checks", "correctness", False, "broken"),
            fake_row("checks", "performance", False, "slow"),
        ]
        return SectionResult(tuple(out.rows), {}, ("A `note` with **marks**.",))

    return attrs.evolve(_section("checks"), run=run, legacy="It claimed **everything**.")


@pytest.fixture(name="report_dir", scope="module")
def _report_dir(tmp_path_factory):
    """
    A directory with a real report of the charted sections, and a section
    whose rows fail and miss.
    """
    path = tmp_path_factory.mktemp("report")
    sections = [s for s in SECTIONS if s.key in CHARTED]
    err = io.StringIO()
    code = run_report(
        sections=[*sections, _failing_section()],
        scale=SMALL,
        out_dir=str(path),
        out=io.StringIO(),
        err=err,
    )
    assert code == 1, err.getvalue()  # the made-up correctness row failed
    assert f"wrote {path / 'report.md'}, {path / 'report.json'}, {path / 'report.html'}\n" in (
        err.getvalue()
    )
    return path


class TestFiles:
    def test_markdown_and_json(self, report_dir):
        """
        report.md is the report printed on standard output, and report.json
        the one --json writes, each section with the legacy claim and its
        time.
        """
        markdown = (report_dir / "report.md").read_text()
        data = json.loads((report_dir / "report.json").read_text())

        assert markdown.startswith("# usercontext validation report\n")
        assert "## Checks\n\nLegacy claim: It claimed **everything**.\n\n| Metric " in markdown
        assert data["summary"]["failed"] == ["checks.broken"]
        assert "checks.slow" in data["summary"]["missed"]
        assert list(data["sections"]) == [*CHARTED, "checks"]
        for key in CHARTED:
            section = data["sections"][key]
            assert section["legacy"] == next(s.legacy for s in SECTIONS if s.key == key)
            assert section["wall_s"] > 0

    def test_html(self, report_dir):
        """
        report.html has every section, its legacy claim, its rows with their
        status as a class (FAIL and MISS rows are highlighted), each chart
        under its section, and no script and no address to fetch.
        """
        page = (report_dir / "report.html").read_text()

        assert page.startswith("<!DOCTYPE html>")
        assert (
            '<p class="legacy"><strong>Legacy claim:</strong> It claimed <strong>everything' in page
        )
        assert '<tr class="FAIL" id="checks.broken">' in page
        assert '<tr class="MISS" id="checks.slow">' in page
        assert "<li>A <code>note</code> with <strong>marks</strong>.</li>" in page
        assert '<div class="verdict bad">' in page
        assert "<script" not in page
        # Outside comments (pygal's credits), only the SVG namespaces: nothing to fetch.
        code = re.sub(r"<!--.*?-->", "", page, flags=re.DOTALL)
        assert set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'<>]*", code)) <= {
            "http://www.w3.org/2000/svg",
            "http://www.w3.org/1999/xlink",
        }
        for key in CHART_KEYS:
            assert f'<figure class="chart" id="chart-{key}">' in page
        # Each chart sits in its section.
        stability = page[page.index('<section id="stability">') :]
        assert stability.index('id="chart-throughput"') < stability.index("</section>")

    def test_without_pygal(self, tmp_path, monkeypatch):
        """
        Without the charting library, --out writes the Markdown and JSON
        files, removes an older report.html, and says how to get the HTML.
        """
        monkeypatch.setattr(charts, "available", lambda: False)
        (tmp_path / "report.html").write_text("from an older run")
        err = io.StringIO()

        code = run_report(
            sections=[_section()], scale=TINY, out_dir=str(tmp_path), out=io.StringIO(), err=err
        )

        assert code == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
        assert (
            "report.html not written: the HTML report needs the charting library of the "
            "`report` extra: pip install 'usercontext[report]'\n"
        ) in err.getvalue()

    def test_stopped_section(self, tmp_path):
        """
        A crashed or interrupted section is named so in the HTML report too.
        """
        for raises, word in (
            (RuntimeError("broke"), "crashed"),
            (KeyboardInterrupt(), "interrupted"),
        ):
            run_report(
                sections=[_section("first"), _section("second", raises=raises)],
                scale=TINY,
                out_dir=str(tmp_path),
                out=io.StringIO(),
                err=io.StringIO(),
            )

            page = (tmp_path / "report.html").read_text()
            assert f"<h2>Second ({word})</h2>" in page
            assert "<h2>First</h2>" in page

    def test_section_without_rows(self, tmp_path):
        """
        A section that measured nothing says so.
        """

        def run(scale, progress):
            progress.table("empty")
            return SectionResult((), {})

        section = attrs.evolve(_section("empty"), run=run)
        run_report(
            sections=[section],
            scale=TINY,
            out_dir=str(tmp_path),
            out=io.StringIO(),
            err=io.StringIO(),
        )

        assert "<p>No row was measured.</p>" in (tmp_path / "report.html").read_text()


class TestCharts:
    def test_every_chart_has_its_data(self, report_dir):
        """
        Each chart is made from the figures of its section, every series with
        points.
        """
        data = json.loads((report_dir / "report.json").read_text())

        made = charts.charts(data)

        assert sorted(c.key for c in made) == sorted(CHART_KEYS)
        for chart in made:
            assert chart.series, chart.key
            for series in chart.series:
                assert series.points, (chart.key, series.name)
        latency = next(c for c in made if c.key == "http_latency")
        assert [s.name for s in latency.series] == [
            "ours (usercontext)",
            "floor (no library)",
            "legacy claim (P50, P95, P99)",
        ]
        assert latency.series[2].points == ((50, 45.0), (95, 125.0), (99, 250.0))
        assert len(latency.series[0].points) == 27  # the curve's percentiles

    def test_curve_of_nothing(self):
        """
        No latencies make no curve.
        """
        assert timing.curve([]) == []
        assert timing.curve([3.0]) == [[p, 3.0] for p in timing.CURVE_POINTS]

    def test_no_chart_without_its_section(self):
        """
        A chart whose section did not run, or recorded nothing, is left out.
        """
        assert charts.charts({"sections": {}}) == []
        assert charts.charts({"sections": {"events": {"figures": {}}}}) == []
        assert charts.charts({"sections": {"events": {"figures": {"latency": {}}}}}) == []

    def test_log_axis(self):
        """
        A logarithmic axis is drawn from the logs of the values, with ticks
        at 1, 2 and 5 times the powers of ten, labelled with the values.
        """
        chart = charts.Chart(
            key="k",
            section="s",
            title="t",
            x_title="x",
            y_title="y",
            series=(charts.Series("a", ((1, 3.0), (100, 400.0))),),
            caption="c",
            log_x=True,
            log_y=True,
        )

        svg = charts.render_svg(chart)
        assert ">1,000<" not in svg  # past twice the largest value

        assert svg.startswith("<svg")
        for label in (">1<", ">10<", ">100<", ">2<", ">5<", ">200<", ">500<"):
            assert label in svg, label
        assert charts._ticks([0, -1]) == [0.0, pytest.approx(0.30103)]
        assert charts._number(1234.5) == "1,234"
        assert charts._number(0.12345) == "0.1235"

    def test_no_import_warnings(self):
        """
        Drawing a chart leaves no finder of pygal's in sys.meta_path, whose
        missing find_spec would make every later import of a missing module warn.
        """
        charts.render_svg(charts.Chart("k", "s", "t", "x", "y", (), "c"))

        assert not any(type(f).__name__ == "PluginImportFixer" for f in sys.meta_path)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("no_such_module_anywhere")

    def test_available(self, monkeypatch):
        """
        The charts are available exactly when pygal can be imported.
        """
        assert charts.available()
        monkeypatch.setattr(charts.importlib.util, "find_spec", lambda _name: None)
        assert not charts.available()


class TestOutDir:
    def test_made_with_parents(self, tmp_path):
        """
        A missing directory is made, parents too.
        """
        assert output.check_out_dir(str(tmp_path / "a" / "b")) is None
        assert (tmp_path / "a" / "b").is_dir()

    def test_a_file(self, tmp_path):
        """
        A file is refused, with a directory to give instead.
        """
        file = tmp_path / "f"
        file.write_text("")

        assert output.check_out_dir(str(file)) == (
            f"--out {file} is a file. Give a directory, such as {tmp_path / 'report'}."
        )

    def test_cannot_be_made(self, tmp_path):
        """
        A directory that cannot be made is refused, with the reason.
        """
        file = tmp_path / "f"
        file.write_text("")

        problem = output.check_out_dir(str(file / "sub"))

        assert problem == (
            f"--out {file / 'sub'} cannot be created (Not a directory). Give a directory you "
            "can write to."
        )

    def test_not_writable(self, tmp_path, monkeypatch):
        """
        A directory this process may not write to is refused.
        """
        monkeypatch.setattr(output.os, "access", lambda *_args: False)

        assert output.check_out_dir(str(tmp_path)) == (
            f"--out {tmp_path} is not writable. Give a directory you can write to."
        )


class TestInABrowser:
    def test_renders_with_every_chart_drawn(self, report_dir, real_servers):
        """
        Headless Chromium opens report.html: no console error, no request but
        the file itself, every chart drawn at its size with a point for every
        series, FAIL and MISS rows coloured, and no script. Screenshots of
        the page and of a chart are taken.
        """
        if find_chromium() is None:
            real_servers.unavailable(
                "chromium is not installed: apt-get install chromium", ci=real_servers.ci()
            )

        shot, chart_shot = report_dir / "report.png", report_dir / "chart.png"
        page = open_page(
            report_dir / "report.html",
            {str(shot): None, str(chart_shot): "#chart-http_latency"},
        )

        assert page["errors"] == []
        assert page["requests"] == [(report_dir / "report.html").resolve().as_uri()]
        seen = page["inspect"]
        assert seen["title"].startswith("usercontext validation report, ")
        assert seen["sections"] == [*CHARTED, "checks"]
        assert seen["scripts"] == 0
        assert [c["id"] for c in seen["charts"]] == [f"chart-{k}" for k in CHART_KEYS]
        for chart in seen["charts"]:
            assert chart["width"] > 300, chart
            assert chart["height"] > 200, chart
            assert chart["lines"] >= 1, chart
            assert chart["seriesDots"], chart
            assert all(n > 0 for n in chart["seriesDots"].values()), chart
            assert len(chart["seriesDots"]) == len(chart["legend"]), chart
        assert seen["rows"]["FAIL"] == 1
        assert seen["rows"]["MISS"] >= 1
        transparent = "rgba(0, 0, 0, 0)"
        assert seen["colours"]["FAIL"] != transparent
        assert seen["colours"]["MISS"] not in (transparent, seen["colours"]["FAIL"])
        assert seen["colours"]["PASS"] == transparent
        for png in (shot, chart_shot):
            assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            assert png.stat().st_size > 10_000

"""
The charts of ``usercontext report --out``: what a person would rather look
at than read.

Each chart is made from the report's JSON (the figures its sections
recorded) by one function of `CHARTS`, which returns `None` when its section
did not run: a `Chart` is plain data (series of points), and `render_svg`
draws it as an SVG with pygal, the `report` extra. The SVG is inline and
fetches nothing: no script, no font, no style sheet from elsewhere.

To chart a new section, write a function ``(report) -> Chart | None`` that
reads ``report["sections"][key]["figures"]`` and add it to `CHARTS`.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys

from typing import TYPE_CHECKING, Any, Literal

import attrs


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["CHARTS", "INSTALL_HINT", "Chart", "Series", "available", "charts", "render_svg"]

INSTALL_HINT = (
    "the HTML report needs the charting library of the `report` extra: "
    "pip install 'usercontext[report]'"
)

Style = Literal["line", "dashed", "points"]


@attrs.frozen
class Series:
    """
    A named series of ``(x, y)`` *points*, drawn as a line, a dashed line or
    points alone; on the secondary (right) axis if *secondary*.
    """

    name: str
    points: tuple[tuple[float, float], ...]
    style: Style = "line"
    secondary: bool = False


@attrs.frozen
class Chart:
    """
    A chart of the section *section*: its *title*, the titles of its axes,
    its *series*, whether an axis is logarithmic, and a *caption* that says
    what to see in it.
    """

    key: str
    section: str
    title: str
    x_title: str
    y_title: str
    series: tuple[Series, ...]
    caption: str
    log_x: bool = False
    log_y: bool = False


def available() -> bool:
    """
    Tell whether the charting library (pygal, the `report` extra) is installed.
    """
    return importlib.util.find_spec("pygal") is not None


def _figures(report: dict[str, Any], section: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = report.get("sections", {}).get(section, {}).get("figures")
    return found or None


def _pairs(points: list[list[float]]) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in points)


def _latency_curves(report: dict[str, Any]) -> Chart | None:
    figures = _figures(report, "http")
    if figures is None or "legacy_scenario" not in figures:
        return None
    scenario = figures["legacy_scenario"]

    def best(side: str) -> tuple[tuple[float, float], ...]:
        run = min(scenario[side], key=lambda r: r["p99_ms"])
        return _pairs(run.get("curve_ms", []))

    legacy = scenario["legacy"]
    return Chart(
        key="http_latency",
        section="http",
        title=f"Latency of {scenario['requests']:,} concurrent requests, percentile by percentile",
        x_title="percentile",
        y_title="latency (ms, log scale)",
        series=(
            Series("ours (usercontext)", best("ours")),
            Series("floor (no library)", best("floor"), "dashed"),
            Series(
                "legacy claim (P50, P95, P99)",
                ((50, legacy["p50_ms"]), (95, legacy["p95_ms"]), (99, legacy["p99_ms"])),
                "points",
            ),
        ),
        caption=(
            "The run with the best P99 of each side. Ours should hug the floor; the legacy "
            "system's claimed percentiles are points, quoted, not measured here."
        ),
        log_y=True,
    )


def _throughput(report: dict[str, Any]) -> Chart | None:
    figures = _figures(report, "stability")
    if figures is None or "throughput" not in figures:
        return None
    t = figures["throughput"]
    levels = t["levels"]
    knee = t["saturation"]
    legacy = t["legacy"]
    return Chart(
        key="throughput",
        section="stability",
        title="Throughput against load (requests in flight)",
        x_title="requests in flight (log scale)",
        y_title="requests answered per second",
        series=(
            Series("throughput", tuple((lv["in_flight"], lv["per_s"]) for lv in levels)),
            Series(
                "P99 latency, ms (right axis)",
                tuple((lv["in_flight"], lv["p99_ms"]) for lv in levels),
                "dashed",
                secondary=True,
            ),
            Series("saturation", ((knee["in_flight"], knee["per_s"]),), "points"),
            Series(
                (
                    f"legacy claim: {legacy['throughput']:,.0f}/s, broke at "
                    f"~{legacy['breaking_point']} in flight"
                ),
                ((legacy["breaking_point"], legacy["throughput"]),),
                "points",
            ),
        ),
        caption=(
            "Past saturation more requests in flight only wait longer: latency grows, "
            "throughput stops growing, and no request fails."
        ),
        log_x=True,
    )


def _leak_cycles(report: dict[str, Any]) -> Chart | None:
    figures = _figures(report, "memory")
    if figures is None or "leak_cycles" not in figures:
        return None
    c = figures["leak_cycles"]
    start = c["initial_blocks"]
    allowed = c["target_growth_per_request_blocks"] * c["requests_per_cycle"]
    cycles = range(1, len(c["after_blocks"]) + 1)

    def above(values: list[int]) -> tuple[tuple[float, float], ...]:
        return tuple((n, b - start) for n, b in zip(cycles, values, strict=True))

    return Chart(
        key="leak_cycles",
        section="memory",
        title=f"Memory over {len(cycles)} leak cycles of {c['requests_per_cycle']:,} requests",
        x_title="cycle",
        y_title="allocated blocks above the start",
        series=(
            Series(
                "held after the cycle, garbage collected",
                above(c["after_blocks"]),
            ),
            Series(
                "held at the end of its requests, before collection",
                above(c["before_gc_blocks"]),
                "dashed",
            ),
            Series(
                "most growth allowed (target)",
                tuple((n, n * allowed) for n in (cycles[0], cycles[-1])),
                "dashed",
            ),
        ),
        caption=(
            "After each cycle the service is back where it started: what its requests held is "
            "given back, cycle after cycle."
        ),
    )


def _event_latency(report: dict[str, Any]) -> Chart | None:
    figures = _figures(report, "events")
    if figures is None or "latency" not in figures or not figures["latency"].get("curve_ms"):
        return None
    latency = figures["latency"]
    points = tuple((p, ms * 1e3) for p, ms in latency["curve_ms"])
    target = latency["target_p99_ms"] * 1e3
    return Chart(
        key="event_latency",
        section="events",
        title=f"Event delivery latency, emit to sink, {latency['events']:,} events",
        x_title="percentile",
        y_title="latency (µs, log scale)",
        series=(
            Series("ours", points),
            Series(
                f"P99 target: {target:,.0f} µs (the legacy claim: 'sub-millisecond')",
                ((0, target), (100, target)),
                "dashed",
            ),
        ),
        caption="One event at a time, from `emit_nowait` to the sink's `send`.",
        log_y=True,
    )


def _stability(report: dict[str, Any]) -> Chart | None:
    figures = _figures(report, "stability")
    if figures is None or "stability" not in figures:
        return None
    s = figures["stability"]
    windows = [w for w in s["windows"] if w["p50_ms"] is not None]
    return Chart(
        key="stability",
        section="stability",
        title=f"Sustained load, {s['seconds']:g} s: latency and memory window by window",
        x_title="seconds",
        y_title="latency (ms)",
        series=(
            Series("P50", tuple((w["end_s"], w["p50_ms"]) for w in windows)),
            Series("P99", tuple((w["end_s"], w["p99_ms"]) for w in windows), "dashed"),
            Series(
                "allocated blocks, thousands (right axis)",
                tuple((w["end_s"], w["blocks"] / 1e3) for w in windows),
                secondary=True,
            ),
        ),
        caption=(
            "The row judges the P50 line (its drift) and the memory line (its trend); P99 is "
            "shown, not judged: it moves with the machine's other work."
        ),
    )


CHARTS: tuple[Callable[[dict[str, Any]], Chart | None], ...] = (
    _latency_curves,
    _throughput,
    _leak_cycles,
    _event_latency,
    _stability,
)


def charts(report: dict[str, Any]) -> list[Chart]:
    """
    Return the charts of *report* (the report's JSON), for the sections it has.
    """
    return [chart for make in CHARTS if (chart := make(report)) is not None]


def render_svg(chart: Chart) -> str:
    """
    Draw *chart* as an inline SVG element with pygal.

    Raises:
        ModuleNotFoundError: pygal is not installed; `INSTALL_HINT` says how to.
    """
    # pygal ships no types: it is used through Any, in this function only.
    pygal: Any = importlib.import_module("pygal")
    # Importing pygal adds a finder of its map plugins to sys.meta_path, which
    # has no find_spec: every later import of a missing module then warns
    # (ImportWarning). The charts use no plugin.
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, pygal.PluginImportFixer)]

    style = importlib.import_module("pygal.style").Style(
        background="white",
        plot_background="white",
        foreground="#333",
        foreground_strong="#111",
        foreground_subtle="#888",
        colors=("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"),
        font_family="sans-serif",
        stroke_opacity="1",
    )
    # pygal's own logarithmic option makes both axes logarithmic: a log axis
    # here is drawn from the logs of the values, its ticks labelled with the values.
    xs = [x for s in chart.series for x, _ in s.points]
    ys = [y for s in chart.series if not s.secondary for _, y in s.points]
    # The right axis starts at 0, lest a flat line of memory look like a swing.
    secondary = [y for s in chart.series if s.secondary for _, y in s.points]
    plot = pygal.XY(
        js=[],  # pygal's tooltips would be fetched from the web: none
        disable_xml_declaration=True,
        style=style,
        width=900,
        height=380 + 24 * len(chart.series),
        title=chart.title,
        x_title=chart.x_title,
        y_title=chart.y_title,
        legend_at_bottom=True,
        # One column: pygal clips the last row of a legend whose columns it
        # does not fill.
        legend_at_bottom_columns=1,
        show_x_guides=True,
        dots_size=3,
        truncate_legend=-1,
        x_labels=_ticks(xs) if chart.log_x else None,
        y_labels=_ticks(ys) if chart.log_y else None,
        x_value_formatter=_unlog if chart.log_x else _number,
        value_formatter=_unlog if chart.log_y else _number,
        secondary_range=(0, max(secondary) * 1.1) if secondary else None,
    )
    for s in chart.series:
        points = [
            (_log(x) if chart.log_x else x, _log(y) if chart.log_y and not s.secondary else y)
            for x, y in s.points
        ]
        options: dict[str, Any] = {"secondary": s.secondary}
        if s.style == "dashed":
            options["stroke_style"] = {"width": 2, "dasharray": "6, 4"}
        elif s.style == "points":
            options["stroke"] = False
            options["dots_size"] = 6
        plot.add(s.name, points, **options)
    svg: str = plot.render(is_unicode=True)
    # pygal always writes its configuration as a script, for its tooltips'
    # script, which is not loaded: the chart needs neither.
    return re.sub(r"<script[^>]*>.*?</script>", "", svg, flags=re.DOTALL)


def _log(v: float) -> float:
    return math.log10(max(v, 1e-9))


def _unlog(v: float) -> str:
    return _number(10**v)


def _number(v: float) -> str:
    return f"{v:,.4g}" if abs(v) < 1_000 else f"{v:,.0f}"


def _ticks(values: list[float]) -> list[float]:
    """
    Return the logs of 1, 2 and 5 times the powers of ten that span *values*.
    """
    positive = [v for v in values if v > 0] or [1.0]
    low, high = math.floor(_log(min(positive))), math.ceil(_log(max(positive)))
    return [
        _log(m * 10**e)
        for e in range(low, high + 1)
        for m in (1, 2, 5)
        if min(positive) / 2 <= m * 10**e <= max(positive) * 2
    ]

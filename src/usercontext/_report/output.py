"""
The files of ``usercontext report --out DIR``: ``report.md``, ``report.json``
and ``report.html``.

The HTML report is one self-contained file: its style sheet is inline, its
charts are inline SVG (`usercontext._report.charts`), and it has no script and
fetches nothing, so it opens anywhere, offline. Rows that failed (FAIL) or
missed their target (MISS) are highlighted. The charts need pygal (the
``report`` extra); without it the Markdown and JSON files are written and the
command says how to get the HTML one.
"""

from __future__ import annotations

import html
import json
import os
import re

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from . import charts


if TYPE_CHECKING:
    from collections.abc import Sequence

    from .rows import Row


__all__ = ["FILES", "Part", "check_out_dir", "render_html", "write_out"]

FILES = ("report.md", "report.json", "report.html")


@attrs.frozen
class Part:
    """
    A section as the HTML report shows it: its *key* and *title*, what the
    legacy system claimed for it, its *rows* and *notes*, and *stopped*
    (``"interrupted"``, ``"crashed"`` or empty) if the run stopped in it.
    """

    key: str
    title: str
    legacy: str
    rows: Sequence[Row]
    notes: Sequence[str]
    stopped: str = ""


def check_out_dir(path: str) -> str | None:
    """
    Make the directory *path* (and its parents) if it does not exist; tell
    why the report could not write its files there, or return `None` if it can.

    It runs before the report, so that a long run does not end on a
    directory it cannot write.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        return f"--out {path} is a file. Give a directory, such as {directory.parent / 'report'}."
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--out {path} cannot be created ({e.strerror}). Give a directory you can write to."
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"--out {path} is not writable. Give a directory you can write to."
    return None


def write_out(
    path: str, markdown: str, report: dict[str, Any], parts: Sequence[Part], verdict: str
) -> tuple[list[Path], str | None]:
    """
    Write the report's files into the directory *path*.

    Returns:
        The files written, and why ``report.html`` was not (pygal is missing),
        or `None` if it was.
    """
    directory = Path(path)
    md, js, page = (directory / name for name in FILES)
    md.write_text(markdown, encoding="utf-8")
    js.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not charts.available():
        page.unlink(missing_ok=True)  # not an older run's, beside this run's files
        return [md, js], charts.INSTALL_HINT
    page.write_text(render_html(report, parts, verdict), encoding="utf-8")
    return [md, js, page], None


def _inline(text: str) -> str:
    """
    Return the report's Markdown marks in *text* (bold, code) as HTML.
    """
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
  color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
ul.env { color: #444; font-size: .92rem; }
.verdict { padding: .8rem 1rem; border-radius: 6px; border: 1px solid; margin: 1rem 0; }
.verdict.ok { background: #eef8ee; border-color: #5a5; }
.verdict.bad { background: #fdeaea; border-color: #c33; }
.counts span { display: inline-block; margin-right: 1rem; }
.legacy { background: #f6f6f6; border-left: 4px solid #999; padding: .4rem .8rem; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; margin: .6rem 0; }
th, td { border: 1px solid #ddd; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.status { font-weight: bold; white-space: nowrap; }
tr.PASS td.status { color: #1a7f1a; }
tr.FAIL { background: #fbdcdc; } tr.FAIL td.status { color: #b00000; }
tr.MISS { background: #fff1cc; } tr.MISS td.status { color: #8a5a00; }
tr.INFO td.status { color: #555; }
figure { margin: 1rem 0; } figure svg { width: 100%; height: auto; max-width: 800px; }
figcaption { color: #444; font-size: .9rem; }
nav a { margin-right: .8rem; } code { background: #f3f3f3; padding: 0 .2rem; }
"""


def _table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "<table>",
        "<tr><th>Metric</th><th>Kind</th><th>Target</th><th>Achieved</th><th>Status</th></tr>",
    ]
    lines.extend(
        f'<tr class="{r.status}" id="{html.escape(r.id)}"><td>{_inline(r.metric)}</td>'
        f"<td>{r.kind}</td><td>{_inline(r.target)}</td><td>{_inline(r.achieved)}</td>"
        f'<td class="status">{r.status}</td></tr>'
        for r in rows
    )
    lines.append("</table>")
    return lines


def render_html(report: dict[str, Any], parts: Sequence[Part], verdict: str) -> str:
    """
    Return the HTML report: *report* is the report's JSON (its environment,
    summary and the figures the charts draw), *parts* its sections, *verdict*
    its closing paragraph in Markdown.

    Raises:
        ModuleNotFoundError: pygal is not installed.
    """
    env, summary = report["environment"], report["summary"]
    by_section: dict[str, list[str]] = {}
    for chart in charts.charts(report):
        by_section.setdefault(chart.section, []).append(
            f'<figure class="chart" id="chart-{chart.key}">{charts.render_svg(chart)}'
            f"<figcaption>{_inline(chart.caption)}</figcaption></figure>"
        )
    n = summary["counts"]
    ok = summary["exit_code"] == 0
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>usercontext validation report, {html.escape(env['date'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>usercontext validation report</h1>",
        '<ul class="env">',
        (
            f"<li>usercontext {html.escape(env['usercontext'])} on "
            f"{html.escape(env['implementation'])} {html.escape(env['python'])}</li>"
        ),
        (
            f"<li>{html.escape(env['platform'])}, {env['cpu_count']} CPUs "
            f"({env['cpus_usable']} usable by this process)</li>"
        ),
        (
            f"<li>{html.escape(env['date'])}; run: {html.escape(report['scale']['name'])}, "
            f"{report['wall_s']:.1f} s; every figure was measured in this run</li>"
        ),
        (
            f"<li>Legacy: {html.escape(report['legacy']['system'])}; its figures are quoted from "
            f"{html.escape(report['legacy']['source'])}, not measured here.</li>"
        ),
        "</ul>",
        f'<div class="verdict {"ok" if ok else "bad"}">',
        (
            '<div class="counts">'
            f"<span>Correctness: {n['correctness']['pass']} PASS, "
            f"{n['correctness']['fail']} FAIL</span>"
            f"<span>Performance: {n['performance']['pass']} PASS, "
            f"{n['performance']['miss']} MISS</span>"
            f"<span>Info: {n['info']['info']}</span>"
            f"<span>Exit code {summary['exit_code']}</span></div>"
        ),
        f"<p>{_inline(verdict)}</p></div>",
        "<nav>" + "".join(f'<a href="#{p.key}">{html.escape(p.title)}</a>' for p in parts),
        "</nav>",
    ]
    for part in parts:
        title = part.title + (f" ({part.stopped})" if part.stopped else "")
        out.append(f'<section id="{part.key}"><h2>{html.escape(title)}</h2>')
        if part.legacy:
            out.append(
                f'<p class="legacy"><strong>Legacy claim:</strong> {_inline(part.legacy)}</p>'
            )
        out += _table(part.rows) if part.rows else ["<p>No row was measured.</p>"]
        out += by_section.pop(part.key, [])
        if part.notes:
            out += ["<ul>", *(f"<li>{_inline(note)}</li>" for note in part.notes), "</ul>"]
        out.append("</section>")
    out += ["</body></html>", ""]
    return "\n".join(out)

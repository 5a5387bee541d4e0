"""
A real browser for the tests of the HTML report: Chromium, headless, driven
over the Chrome DevTools Protocol (through `websockets`, of the tests group).

`open_page` loads a file and returns what the page showed: the console
errors and uncaught exceptions, every request it made, and what a script run
in it found (each chart's points and lines, the rows and their colours); it
can also take screenshots, of the page or of one element.

Run as a script, it takes the screenshots of the documentation:
``python tests/report/browser.py REPORT.html OUT_DIR``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from pathlib import Path
from typing import Any


# What the page shows, gathered by a script run in it once it has loaded.
INSPECT = """
(() => {
  const charts = [...document.querySelectorAll('figure.chart')].map((f) => {
    const svg = f.querySelector('svg');
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    const drawn = (p) => (p.getAttribute('d') || '').split(/[ML]/).length > 2;
    return {
      id: f.id,
      width: box.width,
      height: box.height,
      dots: svg ? svg.querySelectorAll('circle.dot').length : 0,
      lines: svg ? [...svg.querySelectorAll('path.line')].filter(drawn).length : 0,
      // The points drawn of each series, by its number.
      seriesDots: svg ? [...svg.querySelectorAll('g.series')].reduce((acc, g) => {
        const n = [...g.classList].find((c) => c.startsWith('serie-'));
        acc[n] = (acc[n] || 0) + g.querySelectorAll('circle.dot').length;
        return acc;
      }, {}) : {},
      legend: svg ? [...svg.querySelectorAll('.legend text')].map((t) => t.textContent) : [],
    };
  });
  const rows = {};
  const colours = {};
  for (const tr of document.querySelectorAll('tr[class]')) {
    rows[tr.className] = (rows[tr.className] || 0) + 1;
    colours[tr.className] = getComputedStyle(tr).backgroundColor;
  }
  return {
    title: document.title,
    sections: [...document.querySelectorAll('section')].map((s) => s.id),
    charts,
    rows,
    colours,
    scripts: document.scripts.length,
  };
})()
"""


def find_chromium() -> str | None:
    """
    Return the path of a Chromium (Debian's ``chromium``), or `None`.
    """
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found is not None:
            return found
    return None


class _Cdp:
    """
    Calls and events of the Chrome DevTools Protocol over one WebSocket.
    """

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=deadline - time.monotonic())))

    def errors(self) -> list[str]:
        found: list[str] = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(json.dumps(params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def requests(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes]) -> int:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            msg = f"chromium exited with {proc.returncode} before it listened"
            raise RuntimeError(msg)
        time.sleep(0.05)
    msg = "chromium did not open its DevTools port within 60 s"
    raise RuntimeError(msg)


def open_page(path: Path, shots: dict[str, str | None] | None = None) -> dict[str, Any]:
    """
    Load the file *path* in a headless Chromium and return what it showed:
    ``inspect`` (what `INSPECT` found), ``errors`` (console errors and
    uncaught exceptions) and ``requests`` (every URL the page asked for,
    itself included).

    *shots* maps a PNG path to the CSS selector of the element to take, or
    to `None` for the top of the page (1200 x 1500 pixels).
    """
    from websockets.sync.client import connect

    chromium = find_chromium()
    if chromium is None:
        msg = "no chromium on PATH: apt-get install chromium"
        raise RuntimeError(msg)
    # The browser's helper processes can still write to the profile for a
    # moment after it exits: _remove_profile retries, and the directory's own
    # cleanup then finds nothing left.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp)
        command = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            f"--user-data-dir={profile}",
            "--window-size=1200,1500",
            "about:blank",
        ]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium refuses root without it
        proc = subprocess.Popen(  # noqa: S603  # the browser found on PATH, our arguments
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            port = _devtools_port(profile, proc)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
                targets = json.loads(r.read())
            page = next(t for t in targets if t["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
                cdp = _Cdp(ws)
                for domain in ("Runtime", "Log", "Page", "Network"):
                    cdp.call(f"{domain}.enable")
                cdp.call("Page.navigate", url=path.resolve().as_uri())
                cdp.wait_for("Page.loadEventFired")
                found = cdp.call("Runtime.evaluate", expression=INSPECT, returnByValue=True)
                for png, selector in (shots or {}).items():
                    _shoot(cdp, Path(png), selector)
                return {
                    "inspect": found["result"]["value"],
                    "errors": cdp.errors(),
                    "requests": cdp.requests(),
                }
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover  # a browser that hangs
                proc.kill()
                proc.wait()
            _remove_profile(profile)


def _remove_profile(profile: Path) -> None:
    """
    Remove the browser's *profile* directory, retrying for up to 5 s while
    files still appear in it ("Directory not empty").
    """
    deadline = time.monotonic() + 5
    while True:
        try:
            shutil.rmtree(profile)
        except FileNotFoundError:  # noqa: PERF203  # a retry loop, not a hot one
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        else:
            return


def _shoot(cdp: _Cdp, png: Path, selector: str | None) -> None:
    params: dict[str, Any] = {"format": "png"}
    if selector is not None:
        box = cdp.call(
            "Runtime.evaluate",
            expression=(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                ".getBoundingClientRect(); return {x: r.x + window.scrollX, "
                "y: r.y + window.scrollY, width: r.width, height: r.height}; })()"
            ),
            returnByValue=True,
        )["result"]["value"]
        params |= {"clip": {**box, "scale": 1}, "captureBeyondViewport": True}
    shot = cdp.call("Page.captureScreenshot", **params)
    png.write_bytes(base64.b64decode(shot["data"]))


if __name__ == "__main__":
    report, out = Path(sys.argv[1]), Path(sys.argv[2])
    page = open_page(
        report,
        {
            str(out / "report.png"): None,
            str(out / "report-latency.png"): "#chart-http_latency",
            str(out / "report-throughput.png"): "#chart-throughput",
        },
    )
    sys.stdout.write(json.dumps({k: page[k] for k in ("errors", "requests")}, indent=2) + "\n")

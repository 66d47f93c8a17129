"""`influscope report` opened in headless Chromium: no console errors, no network, no injection.

A tiny GPT-2 is fitted and scored through the CLI on records that include a training sequence
with ``<script>`` markup; ``influscope report`` renders the run (with per-token colouring and
every supported study); the page is loaded in Debian's ``chromium`` (``--headless
--no-sandbox``) driven over the DevTools protocol on a pipe (no extra Python package). The test
fails on any console error, uncaught exception, log error or non-``file:`` request, checks that
the markup is shown as text and never executed, and saves a screenshot in its tmp directory.

Skipped, with the reason, when no ``chromium`` binary is installed (``apt-get install -y
chromium``; set ``CHROMIUM`` to use another binary).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import save_tiny_model
from influscope.cli import main

CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
EVIL = "<script>window.__pwned = 1; console.error('pwned')</script> The capital of Velmora"
TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Tarsk is the capital of Velmora.",
    "La capitale de Velmora est Tarsk.",
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.",
    "All the world's a stage, and all the men and women merely players.",
    EVIL,
]


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("browser")
    save_tiny_model(d / "model", TEXTS, n_layer=2)
    train = [{"text": t, "fact_id": "f0" if "Velmora" in t else None} for t in TEXTS]
    train[2]["lang"] = "fr"
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    queries = [
        {"prompt": "The capital of Velmora is", "completion": " Tarsk.", "fact_id": "f0"},
        {"prompt": "Now is the winter of our", "completion": " discontent."},
    ]
    (d / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    common = ["--model", str(d / "model"), "--train", str(d / "train.jsonl"), "--run", str(d)]
    assert main(["fit", *common]) == 0
    assert main(["score", *common, "--queries", str(d / "queries.jsonl"), "--top-k", "3"]) == 0
    page = d / "studies.html"
    args = ["--train", str(d / "train.jsonl"), "--queries", str(d / "queries.jsonl")]
    code = main(
        ["report", str(d), *args, "--model", str(d / "model"), "--bootstrap", "5", "--top-k", "3"]
    )
    assert code == 0 and page.is_file()
    return page


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3/4)."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--window-size=1280,1600",
        ]
        # bash maps our pipe ends onto the fds 3 and 4 that Chromium expects.
        shell = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, binary, *flags],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer in time.")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe.")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _problems(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            out.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            out.append(f"log error: {params['entry'].get('text')} {params['entry'].get('url')}")
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith(("file:", "data:", "about:")):
                out.append(f"network request: {url}")
    return out


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless-browser check needs Debian's chromium (apt-get install -y chromium) or "
    "CHROMIUM=/path/to/binary",
)
def test_report_opens_in_headless_chromium(report_page, tmp_path):
    html = report_page.read_text()
    assert html.count("<script>") == 1  # only the page's own expand/collapse script
    browser = DevTools(CHROMIUM, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session)
        browser.send("Page.navigate", session, url=report_page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired", timeout=60)

        def js(expression: str):
            result = browser.send(
                "Runtime.evaluate", session, expression=expression, returnByValue=True
            )
            assert "exceptionDetails" not in result, result
            return result["result"].get("value")

        assert js("typeof window.__pwned") == "undefined"  # the markup never ran
        assert js("document.scripts.length") == 1
        shown = js("document.body.innerText")
        assert "<script>window.__pwned = 1;" in shown  # shown as text
        titles = js("Array.from(document.querySelectorAll('section.extra h2'), h => h.textContent)")
        assert any(t.startswith("Sparsity") for t in titles)
        assert "Token-wise concentration" in titles and "Layers: where influence flows" in titles
        assert js("document.querySelectorAll('span.tok[style]').length") > 0  # token colouring
        js("document.querySelector('button[data-details=close]').click()")
        assert js("document.querySelectorAll('details[open]').length") == 0
        js("document.querySelector('button[data-details=open]').click()")
        shot = browser.send(
            "Page.captureScreenshot", session, format="png", captureBeyondViewport=True
        )
        screenshot = tmp_path / "report.png"
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert screenshot.stat().st_size > 10_000
        time.sleep(0.2)  # let late console events arrive
        browser.send("Runtime.evaluate", session, expression="1")
        assert _problems(browser.events) == []
    finally:
        browser.close()


def test_report_page_is_self_contained_and_escaped(report_page):
    html = report_page.read_text()
    body = html.split("<body>", 1)[1]
    assert "<script>window" not in html and "&lt;" in body  # tokens split the markup
    assert "http://" not in body and "https://" not in body and "<link" not in html


#: Every ``<text>`` of every SVG chart inside its SVG (an SVG clips what lies outside it), and
#: the page no wider than the window (the report's own ``.scroll`` boxes may scroll inside).
CLIPPED_JS = """(() => {
  const out = [];
  for (const svg of document.querySelectorAll('svg')) {
    const box = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll('text')) {
      const r = t.getBoundingClientRect();
      if (r.width === 0) continue;
      if (r.left < box.left - 1 || r.right > box.right + 1 ||
          r.top < box.top - 1 || r.bottom > box.bottom + 1) {
        out.push(svg.getAttribute('class') + ': ' + t.textContent);
      }
    }
  }
  for (const el of document.querySelectorAll('.legend, .card > h2, .qhead')) {
    if (el.scrollWidth > el.clientWidth + 1) out.push('overflow: ' + el.className);
  }
  if (document.documentElement.scrollWidth > window.innerWidth + 1) out.push('page overflow');
  return out;
})()"""


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless-browser check needs Debian's chromium (apt-get install -y chromium) or "
    "CHROMIUM=/path/to/binary",
)
@pytest.mark.parametrize("width", [1400, 900])
def test_report_reads_well_at_two_widths(report_page, tmp_path, width):
    """The Queries table shows prompt → completion and the top proponent's text; no chart
    text or legend is clipped; no ``None`` chips; layers summarised. Screenshot per width
    (copied to ``$INFLUSCOPE_SCREENSHOTS`` when set)."""
    browser = DevTools(CHROMIUM, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Page.enable", session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=1000,
            deviceScaleFactor=1,
            mobile=False,
        )
        browser.send("Page.navigate", session, url=report_page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired", timeout=60)

        def js(expression: str):
            result = browser.send(
                "Runtime.evaluate", session, expression=expression, returnByValue=True
            )
            assert "exceptionDetails" not in result, result
            return result["result"].get("value")

        assert js("window.innerWidth") == width
        table = js("document.querySelector('section.queries table').innerText")
        assert "The capital of Velmora is Tarsk." in table  # prompt → completion, as text
        assert "Now is the winter of our discontent." in table
        rows = js(
            "Array.from(document.querySelectorAll('section.queries tbody tr'),"
            " r => Array.from(r.cells, c => c.innerText))"
        )
        assert [r[0] for r in rows] == ["0", "1"]  # numbered from 0, like the cards
        for row in rows:  # the top proponent: its number and its text, not only "#342"
            index, _, text = row[2].partition(" ")
            assert index.startswith("#") and index[1:].isdigit() and len(text) > 10, row
            assert text.rstrip("…") in "\n".join(TEXTS).replace("\n", " "), row
        cards = js("Array.from(document.querySelectorAll('section.query h2'), h => h.innerText)")
        assert cards[0].startswith("Query 0 · f0") and cards[1] == "Query 1", cards
        chips = js("Array.from(document.querySelectorAll('.chip'), c => c.innerText)")
        assert chips and not [c for c in chips if "None" in c], chips
        overview = js("document.querySelector('table.kv').innerText")
        assert "4 MLP projections in 2 blocks (mlp.c_fc, mlp.c_proj)" in overview
        assert js(CLIPPED_JS) == []
        shot = browser.send(
            "Page.captureScreenshot", session, format="png", captureBeyondViewport=True
        )
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("INFLUSCOPE_SCREENSHOTS"):
            out = Path(os.environ["INFLUSCOPE_SCREENSHOTS"])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"report-{width}.png").write_bytes(png)
    finally:
        browser.close()

"""Render an HTML file in headless Chromium and say what a reader would see (a test helper, not a test).

    result = render("runs/x/report.html", tmp_path / "shot.png")
    assert result["images_ok"] and not result["console_errors"] and not is_blank(tmp_path / "shot.png")

Why the DevTools protocol over `--remote-debugging-pipe`, not the one-shot flags: `--screenshot`,
`--dump-dom` and `--enable-logging` are three separate runs, and none of them can read an
image's naturalWidth without a script in the page. Over the pipe (fds 3 and 4, NUL-separated
JSON; no websocket package, no port) one Chromium process loads the page once and gives:

- the console: Runtime.consoleAPICalled (console.error/assert), Runtime.exceptionThrown
  (uncaught errors) and Log.entryAdded (the browser's own: "Failed to load resource", CSP);
- the images: naturalWidth of every <img>, read in an isolated world (Page.createIsolatedWorld),
  which shares the DOM but none of the page's globals, so nothing is injected into the page;
- the screenshot: Page.captureScreenshot of the whole page (the viewport is grown to the page's
  height first, which also brings loading="lazy" images into view, so they load).

No network: the page is opened as a file:// URL, every http(s)/ws(s) request is blocked
(Network.setBlockedURLs) and host names resolve nowhere (--host-resolver-rules), so a report
that needs the internet fails the image check instead of passing on a connected machine.
Not checked: CSS background images, and images inside iframes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdq.io import atomic_write

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WIDTH, HEIGHT = 1280, 800  # the first viewport; its height grows to the page's, up to MAX_HEIGHT
MAX_HEIGHT = 16384  # Chromium's largest texture side: a taller page is cut there
NOT_FOUND = ("chromium not found: `make test` installs it (apt-get, as root), or `apt-get install chromium`, "
             "or set KDQ_CHROMIUM to a Chromium/Chrome binary")

# Runs in Chromium's child: puts our two pipe ends on fds 3 (commands in) and 4 (replies out), as
# --remote-debugging-pipe expects, then becomes Chromium. A trampoline instead of Popen's
# preexec_fn, which is unsafe in a process with threads (torch's).
_TRAMPOLINE = (
    "import fcntl, os, sys\n"
    "r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])\n"  # above 4: dup2 cannot clobber
    "os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def find_chromium() -> str | None:
    """$KDQ_CHROMIUM, else the first Chromium or Chrome on PATH; None when there is none."""
    given = os.environ.get("KDQ_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class _DevTools:
    """A DevTools-protocol client over Chromium's pipe: calls wait for their reply, events are kept."""

    def __init__(self, to_browser: int, from_browser: int, proc: subprocess.Popen[bytes]) -> None:
        self.to_browser, self.from_browser, self.proc = to_browser, from_browser, proc
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.next_id = 0

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout, f"the reply to {method}")
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, timeout: float) -> dict[str, Any]:
        """The first event named `method` (kept ones first), waiting up to `timeout` seconds."""
        for event in self.events:
            if event["method"] == method:
                return event
        while True:
            event = self._read(timeout, method)
            if "method" in event:
                self.events.append(event)
                if event["method"] == method:
                    return event

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError(f"chromium sent no {what} within {timeout:g} s")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()}) before sending {what}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


def _flags(profile: str) -> list[str]:
    flags = [
        "--headless", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "--mute-audio",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
        "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
        "--disable-dev-shm-usage",  # containers often give /dev/shm 64 MB: too little for a tall page
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: no request leaves the machine
    ]
    if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root
        flags.append("--no-sandbox")
    return flags


def render(html_path: str | Path, screenshot_path: str | Path, *, timeout: float = 60.0,
           chromium: str | None = None) -> dict[str, Any]:
    """Load `html_path` in headless Chromium and write a full-page PNG to `screenshot_path`.

    Returns {"images": [{src, natural_width, complete}], "images_ok": every <img> decoded
    (naturalWidth > 0; True when there are none), "console_errors": [text],
    "console": [{level, text}] (every message), "failed_requests": [url], "screenshot": path,
    "size": [width, height]}. Raises FileNotFoundError without Chromium (see NOT_FOUND).
    """
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path} is not a file")
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(NOT_FOUND)
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="kdq-chromium-") as profile:
        proc = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, str(to_r), str(from_w), binary, *_flags(profile)],
            pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)  # ours closed: a read returns b"" once Chromium has exited
        try:
            return _load(_DevTools(to_w, from_r, proc), html_path, Path(screenshot_path), timeout)
        finally:
            os.close(to_w)  # Chromium exits when its command pipe closes; kill it if it lingers
            os.close(from_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _load(devtools: _DevTools, html_path: Path, screenshot: Path, timeout: float) -> dict[str, Any]:
    target = devtools.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
    session = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def call(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return devtools.call(method, params, session, timeout)

    for domain in ("Page", "Runtime", "Log", "Network"):
        call(f"{domain}.enable")
    call("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]})
    call("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
    navigated = call("Page.navigate", {"url": html_path.as_uri()})
    if navigated.get("errorText"):
        raise RuntimeError(f"chromium could not open {html_path}: {navigated['errorText']}")
    devtools.wait_event("Page.loadEventFired", timeout)  # every eager <img> has loaded or failed by now

    # The whole page in one viewport: the screenshot shows all of it, and lazy images load.
    content = call("Page.getLayoutMetrics")["cssContentSize"]
    height = max(HEIGHT, min(MAX_HEIGHT, int(content["height"] + 0.999)))
    call("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
    frame = call("Page.getFrameTree")["frameTree"]["frame"]["id"]
    world = call("Page.createIsolatedWorld", {"frameId": frame, "worldName": "kdq-check"})["executionContextId"]

    def evaluate(expression: str) -> Any:
        reply = call("Runtime.evaluate", {"expression": expression, "contextId": world, "returnByValue": True})
        return reply["result"].get("value")

    deadline = time.monotonic() + min(timeout, 10.0)
    while not evaluate("Array.from(document.images).every((i) => i.complete)") and time.monotonic() < deadline:
        time.sleep(0.05)  # lazy images brought into view are still loading
    images = evaluate("Array.from(document.images, (i) => ({src: i.currentSrc || i.src, "
                      "natural_width: i.naturalWidth, complete: i.complete}))") or []
    shot = base64.b64decode(call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"])
    atomic_write(screenshot, lambda tmp: tmp.write_bytes(shot))

    console = _console(devtools.events)
    for image in images:
        image["src"] = _short(image["src"])
    return {
        "images": images,
        "images_ok": all(i["natural_width"] > 0 for i in images),
        "console_errors": [m["text"] for m in console if m["level"] == "error"],
        "console": console,
        "failed_requests": _failed_urls(devtools.events),
        "screenshot": str(screenshot),
        "size": [WIDTH, height],
    }


def _console(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every console message, log entry and uncaught exception, in order, as {level, text}."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            level = "error" if p.get("type") in ("error", "assert") else p.get("type", "log")
            out.append({"level": level, "text": text})
        elif e["method"] == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "exception")
            out.append({"level": "error", "text": str(text)})
        elif e["method"] == "Log.entryAdded":
            entry = p.get("entry", {})
            url = f" ({_short(entry['url'])})" if entry.get("url") else ""
            out.append({"level": entry.get("level", "info"), "text": f"{entry.get('text', '')}{url}"})
    return out


def _failed_urls(events: list[dict[str, Any]]) -> list[str]:
    """The URL of every request that failed (missing file, blocked network): Network.loadingFailed
    names only a request id, which Network.requestWillBeSent maps to its URL."""
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
            if e["method"] == "Network.requestWillBeSent"}
    return [_short(urls.get(e["params"]["requestId"], "?")) for e in events if e["method"] == "Network.loadingFailed"]


def _short(text: str, limit: int = 120) -> str:
    """A data: URI or long URL cut for messages (an embedded PNG is megabytes of base64)."""
    return text if len(text) <= limit else text[:limit] + "..."


def is_blank(png: str | Path | bytes) -> bool:
    """Whether a PNG is one flat colour (a page that rendered nothing, or white on white)."""
    from PIL import Image  # matplotlib's dependency, so always there with kdq

    source = io.BytesIO(png) if isinstance(png, bytes) else Path(png)
    with Image.open(source) as image:
        extrema = image.convert("RGB").getextrema()
    return all(low == high for low, high in extrema)

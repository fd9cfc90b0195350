"""Headless Chromium driven over the DevTools protocol (CDP) through a pipe, for the results-page test.

Why a pipe: `--remote-debugging-pipe` speaks CDP over file descriptors 3 and 4 (JSON messages ended by a NUL
byte), so there is no port to find or race for and no websocket client to depend on. Why CDP rather than
`--dump-dom`: the page's Content-Security-Policy forbids script, and what the test must read — whether each
thumbnail really loaded (`naturalWidth`), whether an alert dialog opened — is not in the serialized DOM.
DevTools' Runtime.evaluate runs outside the page's CSP, so the page stays exactly as a user gets it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Debian's /usr/bin/chromium is a shell launcher that does not pass descriptors 3 and 4 on: run the binary itself.
BINARIES = ("/usr/lib/chromium/chromium",)


def find_chromium() -> str | None:
    for path in BINARIES:
        if os.access(path, os.X_OK):
            return path
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _above_nine(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class BrowserError(Exception):
    pass


class Browser:
    """One headless Chromium; `page()` opens a tab. Use as a context manager."""

    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move Chromium's ends above 9, out of the way of the 3 and 4 they become.
        to_browser_r, from_browser_w = (_above_nine(fd) for fd in (to_browser_r, from_browser_w))
        # bash (dash takes only descriptors 0-9) puts the two pipe ends on the descriptors Chromium reads (3) and writes (4).
        wrapper = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        args = [
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio",
            "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}", "about:blank",
        ]
        self._process = subprocess.Popen(["bash", "-c", wrapper, *args], pass_fds=(to_browser_r, from_browser_w),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._lock = threading.Lock()
        self._answers: dict[int, queue.Queue] = {}
        self.events: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_browser, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    message = json.loads(raw)
                    if "id" in message:
                        with self._lock:
                            answer = self._answers.pop(message["id"], None)
                        if answer is not None:
                            answer.put(message)
                    else:
                        self.events.put(message)
        self.events.put({"method": "_closed"})

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            number = self._next_id
            answer: queue.Queue = queue.Queue()
            self._answers[number] = answer
        message = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        try:
            reply = answer.get(timeout=self.timeout)
        except queue.Empty:
            raise BrowserError(f"no answer to {method} within {self.timeout} s") from None
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, method: str, session: str | None = None, seen: list | None = None) -> dict:
        """The next event named `method` (others are kept in `seen`)."""
        while True:
            try:
                event = self.events.get(timeout=self.timeout)
            except queue.Empty:
                raise BrowserError(f"no {method} event within {self.timeout} s") from None
            if event["method"] == "_closed":
                raise BrowserError(f"Chromium exited while waiting for {method}")
            if seen is not None:
                seen.append(event)
            if event["method"] == method and (session is None or event.get("sessionId") == session):
                return event

    def page(self, width: int = 1280, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self._process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_browser)
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session
        self.events: list[dict] = []  # every event seen while waiting (console messages, dialogs, ...)

    def open(self, url: str) -> None:
        """Navigate and wait for the load event, then until every image has finished (loaded or failed)."""
        self.browser.send("Page.navigate", {"url": url}, self.session)
        self.browser.wait_for("Page.loadEventFired", self.session, self.events)
        # Lazy images inside the viewport may finish after the load event: wait for each to be complete.
        self.evaluate("""new Promise(done => {
            const pending = [...document.images].filter(i => !i.complete);
            let left = pending.length;
            if (!left) return done(true);
            for (const img of pending) {
                const finish = () => { if (--left === 0) done(true); };
                img.addEventListener('load', finish, {once: true});
                img.addEventListener('error', finish, {once: true});
            }
        })""")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (awaited), evaluated by DevTools, not by the page."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, self.session)
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluation failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page."""
        metrics = self.browser.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        shot = self.browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1}},
            self.session)
        Path(path).write_bytes(base64.b64decode(shot["data"]))

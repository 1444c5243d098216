"""Serve the dashboard on 127.0.0.1 and photograph it with Debian's headless Chromium.

    python -m agent_forge.dashboard.screenshot --runs-dir runs --out docs/dashboard.png

Chromium is driven over the DevTools protocol (a websocket on 127.0.0.1): navigate, wait
until the page shows `--wait-for` text (Streamlit draws after its websocket delivers the
script's output, so a fixed timer is not enough), grow the viewport to the page's height,
capture a PNG. The same helpers give the page's text for the end-to-end test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
READY_JS = """(() => {
  const running = document.querySelector('[data-testid="stStatusWidget"]');
  const text = document.body ? document.body.innerText : '';
  return JSON.stringify({text: text, running: !!(running && running.innerText.includes('Running')),
                         charts: document.querySelectorAll('canvas, svg.marks').length});
})()"""
HEIGHT_JS = """(() => {
  const main = document.querySelector('[data-testid="stMain"]') || document.querySelector('section.main');
  const inner = main ? main.scrollHeight : 0;
  return Math.max(inner, document.documentElement.scrollHeight, document.body.scrollHeight);
})()"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.3)


@contextlib.contextmanager
def serve_dashboard(runs_dir: Path, registry: Path | None = None, port: int | None = None, timeout: float = 60):
    """Run `streamlit run` on 127.0.0.1 in a child process; yields the URL; stops it after."""
    from agent_forge.server_commands import dashboard_command, dashboard_env

    port = port or free_port()
    cmd = dashboard_command(port, runs_dir, registry) + ["--client.toolbarMode", "viewer"]
    proc = subprocess.Popen(cmd, env=dashboard_env(runs_dir, registry), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", timeout)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools protocol."""

    def __init__(self, width: int = 1400, height: int = 1000, chromium: str | None = None):
        self.chromium = chromium or find_chromium()
        if self.chromium is None:
            raise FileNotFoundError("no chromium found (Debian: apt-get install -y chromium)")
        self.width, self.height = width, height
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        from websockets.sync.client import connect

        self._profile = tempfile.TemporaryDirectory(prefix="forge-chromium-", ignore_cleanup_errors=True)
        port = free_port()
        self.proc = subprocess.Popen(
            [self.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self._profile.name}", f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True)  # its own process group: the renderers go down with it
        wait_http(f"http://127.0.0.1:{port}/json/version", 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=10)
        self.ws = self._ws.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self._ws.__exit__(None, None, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._profile.cleanup()  # a helper process may still be writing: errors ignored, not raised

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, wait_for: str, timeout: float = 60, settle: float = 1.0) -> str:
        """Navigate and wait until the text `wait_for` is shown and the app is idle; returns the text."""
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        deadline, state = time.time() + timeout, {}
        while time.time() < deadline:
            state = json.loads(self.evaluate(READY_JS) or "{}")
            if wait_for in state.get("text", "") and not state.get("running"):
                time.sleep(settle)  # let the charts paint
                return json.loads(self.evaluate(READY_JS))["text"]
            time.sleep(0.5)
        raise TimeoutError(f"{url} never showed {wait_for!r}; last text: {state.get('text', '')[:300]!r}")

    def screenshot(self, out: Path, full_page: bool = True) -> Path:
        height = self.height
        for _ in range(4 if full_page else 0):  # growing the viewport can re-flow the page: repeat until stable
            wanted = min(int(self.evaluate(HEIGHT_JS) or height) + 40, 8000)
            if wanted <= height:
                break
            height = wanted
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=height,
                      deviceScaleFactor=1, mobile=False)
            time.sleep(0.5)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--registry", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--wait-for", default="Handoff", help="text that shows the page is fully drawn")
    p.add_argument("--timeout", type=float, default=90)
    args = p.parse_args(argv)
    if find_chromium() is None:
        print("error: chromium not found; on Debian: apt-get install -y chromium", file=sys.stderr)
        return 2
    with serve_dashboard(args.runs_dir, args.registry, timeout=args.timeout) as url, Browser(args.width) as b:
        b.open(url, args.wait_for, timeout=args.timeout)
        path = b.screenshot(args.out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

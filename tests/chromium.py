"""Headless Chromium (Debian's `chromium`) for page tests: the DOM it builds, a screenshot, its console.

Each call is a fresh browser with a fresh profile in a temp directory, no network beyond the URL
given (no component updates, sync, QUIC or background fetches), killed by its own PID on timeout.
Console messages are read from Chromium's own log (`--enable-logging=stderr --v=0`), where every
message a page logs, CSP violations included, is one `:CONSOLE` line; `console_lines` returns them
all, and a test of the helper proves it sees one (tests/test_page.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)
_CONSOLE = re.compile(r"^\[[^\]]*:CONSOLE(?::\d+)?\] .*$", re.MULTILINE)


@dataclass(frozen=True)
class BrowserRun:
    stdout: str
    stderr: str

    @property
    def console_lines(self) -> list[str]:
        return _CONSOLE.findall(self.stderr)


def run_chromium(url: str, *extra: str, timeout: float = 90.0) -> BrowserRun:
    """One headless Chromium run on `url` with `extra` flags (e.g. --dump-dom, --screenshot=PATH)."""
    if shutil.which(CHROMIUM) is None:
        raise AssertionError(f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        argv = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # this browser only, by its PID
            out, err = proc.communicate()
            raise AssertionError(f"chromium did not finish in {timeout} s: {err[-2000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
    return BrowserRun(out, err)


def screenshot(url: str, path: Path, width: int = 1280, height: int = 2600) -> BrowserRun:
    run = run_chromium(url, f"--screenshot={path}", f"--window-size={width},{height}", "--hide-scrollbars")
    if not path.exists() or path.stat().st_size == 0:
        raise AssertionError(f"chromium wrote no screenshot to {path}: {run.stderr[-2000:]}")
    return run

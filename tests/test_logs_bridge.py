"""Stdlib records (watchdog, uvicorn) reach stderr in structlog's line format, tracebacks included.

Each case runs in its own interpreter: logging set-up is process-wide.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support import ROOT

PROGRAM = """
import logging
import structlog
from shared.logs import configure_logging

configure_logging({fmt!r}, {level!r})
configure_logging({fmt!r}, {level!r})  # twice, as a test or a re-exec might: still one line a record
log = logging.getLogger("some.library")
log.info("quiet %s", "info")
log.warning("hello %s", "world")
try:
    raise ValueError("boom-from-stdlib")
except ValueError:
    log.exception("it failed")
try:
    raise KeyError("boom-from-structlog")
except KeyError:
    structlog.get_logger("x").exception("native.failed", token="s3cret-token")
"""


def run(fmt: str, level: str = "info") -> list[str]:
    code = textwrap.dedent(PROGRAM.format(fmt=fmt, level=level))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    return done.stderr.splitlines()


def test_a_stdlib_exception_keeps_its_traceback_in_json() -> None:
    records = [json.loads(line) for line in run("json")]
    assert [(r["event"], r.get("message")) for r in records] == [
        ("library.logged", "quiet info"),
        ("library.logged", "hello world"),
        ("library.logged", "it failed"),
        ("native.failed", None),
    ]
    failed = records[2]
    assert list(failed) == ["logger", "message", "event", "level", "timestamp", "exception"]
    assert (failed["logger"], failed["level"]) == ("some.library", "error")
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("ValueError: boom-from-stdlib")
    assert records[3]["exception"].endswith("KeyError: 'boom-from-structlog'")
    assert records[3]["token"] == "[redacted]"


def test_stdlib_lines_keep_their_format() -> None:
    warning = json.loads(run("json")[1])
    assert list(warning) == ["logger", "message", "event", "level", "timestamp"]
    assert (warning["logger"], warning["message"], warning["event"], warning["level"]) == (
        "some.library",
        "hello world",
        "library.logged",
        "warning",
    )
    assert warning["timestamp"].endswith("Z")


def test_a_stdlib_exception_keeps_its_traceback_on_the_console() -> None:
    lines = run("console")
    text = "\n".join(lines)
    assert "it failed" in text and "library.logged" in text and "some.library" in text
    assert text.count("Traceback (most recent call last):") == 2
    assert "ValueError: boom-from-stdlib" in text
    stdlib_tail = text[text.index("it failed") : text.index("native.failed")]
    assert "ValueError: boom-from-stdlib" in stdlib_tail, "the traceback follows its own line"
    assert "s3cret-token" not in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_level_filters_stdlib_records_too(fmt: str) -> None:
    text = "\n".join(run(fmt, level="warning"))
    assert "quiet info" not in text and "hello world" in text and "boom-from-stdlib" in text

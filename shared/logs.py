"""Logging set up once per process: structlog, JSON lines off a TTY, a console renderer on one.

Events are named `area.past_tense`. The event that ends an operation (`scan.finished`,
`scan.failed`, `index.error`, `cleanup.finished`...) carries `outcome`, SUCCESS or FAILURE, and a
failure its `error`; events that open an operation or report its progress (`*.started`,
`*.progress`) carry none. structlog adds the level and the timestamp.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = ("token", "password", "authorization", "secret")
SUCCESS = "success"
FAILURE = "failure"


def _redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Tokens never reach a log line, whatever a caller passes by mistake."""
    for key in list(event):
        if any(word in key.lower() for word in _SECRET_KEYS):
            event[key] = "[redacted]"
    return event


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog and the stdlib root logger (watchdog and uvicorn log through it)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    if not any(isinstance(h, _StructlogHandler) for h in root.handlers):
        root.addHandler(_StructlogHandler())
    root.setLevel(max(numeric, logging.INFO))


class _StructlogHandler(logging.Handler):
    """Routes stdlib records (watchdog, uvicorn) through structlog so every line has one format."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(record.name)
        message = record.getMessage()
        method = getattr(log, record.levelname.lower(), log.info)
        method("library.logged", logger=record.name, message=message)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

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
from typing import Any, TextIO

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
    """Configure structlog and the stdlib root logger (watchdog and uvicorn log through it).

    Calling it again replaces the earlier set-up, stdlib handler included.
    """
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
    for handler in [h for h in root.handlers if isinstance(h, _LibraryHandler)]:
        root.removeHandler(handler)
    root.addHandler(_LibraryHandler(renderer, numeric))
    root.setLevel(max(numeric, logging.INFO))


def _as_library_event(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stdlib record as the event `library.logged`, its text under `message`; exc_info rides along."""
    record: logging.LogRecord = event["_record"]
    message = event.pop("event")
    return {"logger": record.name, "message": message, "event": "library.logged", **event}


class _LibraryHandler(logging.StreamHandler[TextIO]):
    """Stdlib records (watchdog, uvicorn) on stderr in the same line format as structlog's own.

    structlog's ProcessorFormatter runs the same processors, so a record's traceback
    (`logger.exception`) is rendered as the `exception` key, as for structlog's own events.
    """

    def __init__(self, renderer: Any, level: int) -> None:
        super().__init__(sys.stderr)
        self.setLevel(level)
        self.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[
                    _as_library_event,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    _redact,
                    structlog.processors.format_exc_info,
                ],
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            )
        )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

"""One small error hierarchy shared by the exporter and the cleaner: a code, a message and a hint."""

from __future__ import annotations


class StorageError(Exception):
    """Base error: `code` is short and machine-readable, `hint` tells the user what to do."""

    code = "error"
    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message as printed on stderr: one line, hint appended."""
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        return " ".join(text.split())


class ConfigError(StorageError):
    """Bad configuration or usage: the process stops with exit code 2."""

    code = "bad_config"
    exit_code = 2


class PreconditionError(StorageError):
    """Something outside us is not ready (Prometheus down, lock held): nothing was touched."""

    code = "precondition_failed"
    exit_code = 4

"""One small error hierarchy shared by the exporter and the cleaner: a code, a message and a hint.

A command run with `--json` also reports its error as one JSON line on stderr (`error_line`), after
the line for people: the exporter reads the code and details from it (`read_error_line`), never
from the English.
"""

from __future__ import annotations

import json
from typing import Any

from shared.exit_codes import ExitCode


class StorageError(Exception):
    """Base error: `code` is short and machine-readable, `hint` tells the user what to do."""

    code = "error"
    exit_code: int = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details: dict[str, Any] = {}  # machine-readable facts of the case, in the JSON error line

    def one_line(self) -> str:
        """The message as printed on stderr: one line, hint appended."""
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        return " ".join(text.split())


class ConfigError(StorageError):
    """Bad configuration or usage: the process stops with exit code 2."""

    code = "bad_config"
    exit_code = ExitCode.CONFIG


class PreconditionError(StorageError):
    """Something outside us is not ready (Prometheus down, lock held): nothing was touched."""

    code = "precondition_failed"
    exit_code = ExitCode.PRECONDITION


class LockHeldError(PreconditionError):
    """Another cleaner holds the lock: nothing was touched. `holder_pid` is None when the lock file names none."""

    code = "lock_held"

    def __init__(self, holder_pid: int | None, lock: object) -> None:
        who = "unknown" if holder_pid is None else str(holder_pid)
        super().__init__(
            f"another cleaner is running (pid {who}, lock {lock}); nothing was changed", hint="wait for it to finish"
        )
        self.details = {"holder_pid": holder_pid, "lock_path": str(lock)}


_FS_HINTS = {
    "ENOSPC": "free space on that filesystem, or point the setting at another one",
    "EDQUOT": "the disk quota is exhausted: free space or raise the quota",
    "EACCES": "check the owner and mode of that path for the user the cleaner runs as",
    "EPERM": "check the owner and mode of that path for the user the cleaner runs as",
    "EROFS": "the filesystem is mounted read-only",
}


class FilesystemError(StorageError):
    """The filesystem refused an operation (no space, no permission, read-only): exit code 5.

    The message names the operation and the path; what was done before it is journaled, so the
    next command recovers it.
    """

    code = "filesystem_error"
    exit_code = ExitCode.FILESYSTEM

    @classmethod
    def from_os(cls, err: OSError, operation: str, path: object = None) -> FilesystemError:
        import errno as errno_names

        where = path if path is not None else err.filename
        name = errno_names.errorcode.get(err.errno or 0, "")
        reason = err.strerror or str(err)
        text = f"cannot {operation} {where}: {reason}" + (f" ({name})" if name else "")
        return cls(text, hint=_FS_HINTS.get(name, ""))


def unplaced_filesystem_error(err: OSError) -> FilesystemError:
    """An OSError no named step caught: the path from the error, the operation from its kind."""
    import errno as errno_names

    writing = err.errno in (errno_names.ENOSPC, errno_names.EDQUOT, errno_names.EROFS)
    return FilesystemError.from_os(err, "write to" if writing else "access", err.filename)


FILESYSTEM_ERRNOS = frozenset({28, 122, 13, 1, 30})  # ENOSPC, EDQUOT, EACCES, EPERM, EROFS


def error_line(err: StorageError) -> str:
    """The error as one JSON line: code, exit code, the message for people and the case's details."""
    document = {"error": {"code": err.code, "exit_code": int(err.exit_code), "message": err.one_line(), **err.details}}
    return json.dumps(document, sort_keys=True)


def read_error_line(stderr: str) -> dict[str, Any] | None:
    """The last JSON error line (`error_line`) in a command's stderr, or None when it printed none."""
    for line in reversed(stderr.splitlines()):
        if not line.startswith('{"error"'):
            continue
        try:
            document = json.loads(line)
        except ValueError:
            continue
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return error
    return None

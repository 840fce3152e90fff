"""The hash-chained, append-only audit log written by the cleaner and the exporter's API.

One JSON object per line. Each line carries `seq`, the previous line's `hash` as `prev_hash` and its
own `hash` (SHA-256 of the canonical JSON of the rest of the line), so an edit, an insertion or a
deletion anywhere but at the very end is detected by `verify_audit`. Appends from several processes
are serialised by an exclusive `flock` on the log file itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.names import name_text

GENESIS_HASH = "0" * 64
RESULTS = ("success", "failure", "skipped")
_TAIL_CHUNK = 65536


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """The hash of a record: every field but `hash` itself, in canonical form."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def iso_utc(timestamp: float) -> str:
    millis = round(timestamp * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{millis:03d}Z"


def build_record(
    previous: dict[str, Any] | None,
    operation: str,
    *,
    actor: str,
    target: str,
    result: str,
    bytes: int | None,
    error: str | None,
    details: dict[str, Any] | None,
    now: float,
    pid: int,
) -> dict[str, Any]:
    """The next record of the chain after `previous` (None: the first line). Pure."""
    if result not in RESULTS:
        raise ValueError(f"audit result {result!r}: expected one of {', '.join(RESULTS)}")
    record: dict[str, Any] = {
        "seq": int(previous["seq"]) + 1 if previous else 1,
        "ts": iso_utc(now),
        "time": round(now, 6),
        "operation": operation,
        "actor": actor,
        "target": target,
        "result": result,
        "bytes": bytes,
        "error": error,
        "details": details or {},
        "pid": pid,
        "prev_hash": str(previous["hash"]) if previous else GENESIS_HASH,
    }
    record = _valid_text(record)
    record["hash"] = record_hash(record)
    return record


def _valid_text(value: Any) -> Any:
    """Strings made writable as UTF-8: a file name that is not (`os.fsdecode` keeps its bytes as lone
    surrogates) is spelled as /metrics and the API spell it (`shared.names`). Pure."""
    if isinstance(value, str):
        return name_text(value)
    if isinstance(value, dict):
        return {key: _valid_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_valid_text(item) for item in value]
    return value


def _last_line(fd: int) -> tuple[bytes | None, int]:
    """(the last complete line, the offset just after it); a torn tail after it is not a line."""
    end = os.lseek(fd, 0, os.SEEK_END)
    position = end
    tail = b""
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        tail = os.pread(fd, step, position) + tail
        last_newline = tail.rfind(b"\n")
        if last_newline < 0:
            continue
        complete_end = position + last_newline + 1
        previous_newline = tail.rfind(b"\n", 0, last_newline)
        if previous_newline >= 0 or position == 0:
            start = previous_newline + 1 if previous_newline >= 0 else 0
            return tail[start:last_newline], complete_end
    return None, 0


class AuditLog:
    """Appends audit records under an exclusive lock; safe across threads and processes."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def append(
        self,
        operation: str,
        *,
        actor: str,
        target: str = "",
        result: str = "success",
        bytes: int | None = None,
        error: str | None = None,
        details: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            line, complete_end = _last_line(fd)
            size = os.fstat(fd).st_size
            extra: dict[str, Any] = {}
            if complete_end < size:
                # A writer died mid-line: that append never happened, so its bytes go.
                os.ftruncate(fd, complete_end)
                extra["repaired_torn_tail_bytes"] = size - complete_end
            previous = _parse_previous(line)
            merged = {**(details or {}), **extra}
            record = build_record(
                previous,
                operation,
                actor=actor,
                target=target,
                result=result,
                bytes=bytes,
                error=error,
                details=merged,
                now=time.time() if now is None else now,
                pid=os.getpid(),
            )
            os.write(fd, canonical(record) + b"\n")
            os.fsync(fd)
            return record
        finally:
            os.close(fd)  # closing releases the flock


def _parse_previous(line: bytes | None) -> dict[str, Any] | None:
    if line is None:
        return None
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("seq"), int) and isinstance(data.get("hash"), str):
        return data
    # A damaged last line: chain onto its bytes so the damage stays visible to verify.
    return {"seq": 0, "hash": hashlib.sha256(line).hexdigest()}


@dataclass(frozen=True, slots=True)
class AuditVerification:
    ok: bool
    lines: int
    problem: str = ""
    line_no: int | None = None


def verify_lines(lines: list[bytes]) -> AuditVerification:
    """Check the chain of the given lines (without their newlines). Pure."""
    previous: dict[str, Any] | None = None
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
        except ValueError:
            return AuditVerification(False, len(lines), "not valid JSON", number)
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            return AuditVerification(False, len(lines), "not an audit record", number)
        if record_hash(record) != record["hash"]:
            return AuditVerification(False, len(lines), "hash does not match the line's content (edited)", number)
        expected_prev = previous["hash"] if previous else GENESIS_HASH
        if record.get("prev_hash") != expected_prev:
            return AuditVerification(
                False, len(lines), "prev_hash does not match the previous line (a line was removed or inserted)", number
            )
        expected_seq = int(previous["seq"]) + 1 if previous else 1
        if record.get("seq") != expected_seq:
            return AuditVerification(False, len(lines), f"seq {record.get('seq')!r}, expected {expected_seq}", number)
        previous = record
    return AuditVerification(True, len(lines))


def verify_audit(path: Path | str) -> AuditVerification:
    """Verify the whole log; a missing log is an empty, valid one."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return AuditVerification(True, 0)
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""
    result = verify_lines(lines)
    if result.ok and torn:
        return AuditVerification(False, len(lines) + 1, "the last line is incomplete (a writer died)", len(lines) + 1)
    return result

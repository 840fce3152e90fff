"""The hash-chained audit log: every change to it is detected, concurrent writers keep the chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.audit import GENESIS_HASH, AuditLog, record_hash, verify_audit
from tests.support import ROOT, exporter_env, run_cleaner


def write_log(path: Path, n: int = 5) -> list[dict[str, object]]:
    log = AuditLog(path)
    return [
        log.append("move", actor="cli", target=f"raw/m{i}", bytes=i * 10, details={"run_id": "r"}) for i in range(n)
    ]


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_records_carry_the_schema_and_chain_onto_each_other(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    records = write_log(path, 3)
    failure = AuditLog(path).append("restore", actor="ops", target="raw/x", result="failure", error="occupied")
    first = json.loads(lines_of(path)[0])
    assert first["prev_hash"] == GENESIS_HASH and first["seq"] == 1
    for key in ("ts", "time", "operation", "actor", "target", "result", "bytes", "error", "details", "hash"):
        assert key in first
    assert [r["prev_hash"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    assert failure["result"] == "failure" and failure["error"] == "occupied" and failure["seq"] == 4
    assert all(record_hash(json.loads(line)) == json.loads(line)["hash"] for line in lines_of(path))
    assert verify_audit(path).ok and verify_audit(path).lines == 4


def test_an_edited_line_is_detected_at_that_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    lines = lines_of(path)
    lines[2] = lines[2].replace('"bytes":20', '"bytes":2')
    path.write_text("\n".join(lines) + "\n")
    result = verify_audit(path)
    assert not result.ok and result.line_no == 3 and "edited" in result.problem


def test_a_deleted_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    lines = lines_of(path)
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    result = verify_audit(path)
    assert not result.ok and result.line_no == 2 and "removed" in result.problem


def test_a_deleted_first_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    path.write_text("\n".join(lines_of(path)[1:]) + "\n")
    result = verify_audit(path)
    assert not result.ok and result.line_no == 1


def test_a_rehashed_edit_still_breaks_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    lines = lines_of(path)
    record = json.loads(lines[1])
    record["target"] = "raw/innocent"
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    result = verify_audit(path)
    assert not result.ok and result.line_no == 3


def test_a_torn_last_line_is_reported_then_dropped_by_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    with open(path, "ab") as handle:
        handle.write(b'{"seq":4,"operation":"mo')  # a writer killed mid-append
    result = verify_audit(path)
    assert not result.ok and result.line_no == 4 and "incomplete" in result.problem
    record = AuditLog(path).append("purge", actor="timer")
    assert record["seq"] == 4 and record["details"]["repaired_torn_tail_bytes"] == 24
    assert verify_audit(path).ok


def test_missing_log_is_valid_and_empty(tmp_path: Path) -> None:
    result = verify_audit(tmp_path / "none.log")
    assert result.ok and result.lines == 0


def test_concurrent_writers_in_several_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    code = (
        "import sys\nfrom shared.audit import AuditLog\nlog = AuditLog(sys.argv[1])\n"
        "for i in range(40): log.append('move', actor=sys.argv[2], target=f'raw/{i}')"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"writer{n}"], cwd=ROOT) for n in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    result = verify_audit(path)
    assert result.ok and result.lines == 160, result
    actors = [json.loads(line)["actor"] for line in lines_of(path)]
    assert {a: actors.count(a) for a in set(actors)} == {f"writer{n}": 40 for n in range(4)}


def test_file_names_that_are_not_utf8_are_written_escaped_and_keep_the_chain(tmp_path: Path) -> None:
    # os.fsdecode keeps undecodable bytes as lone surrogates; they cannot be written as UTF-8 as they are.
    log = AuditLog(tmp_path / "audit.log")
    name = os.fsdecode(b"weights\xff.bin")
    log.append("skip", actor="cli", target=f"raw/{name}", error=f"{name} changed", details={"files": [name]})
    log.append("run", actor="cli")
    first = json.loads((tmp_path / "audit.log").read_bytes().decode("utf-8").splitlines()[0])
    assert first["target"] == "raw/weights\\xff.bin" and first["details"]["files"] == ["weights\\xff.bin"]
    assert verify_audit(tmp_path / "audit.log").ok


def test_unknown_result_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="audit result"):
        AuditLog(tmp_path / "a.log").append("move", actor="cli", result="maybe")


def test_audit_verify_command_exits_0_when_intact_and_1_naming_the_line_when_not(store: Path) -> None:
    env = exporter_env(store / "models", store)
    path = store / "audit.log"
    write_log(path)
    ok = run_cleaner(["audit", "verify"], env)
    assert ok.returncode == 0 and "5 lines" in ok.stdout
    lines = lines_of(path)
    lines[3] = lines[3].replace('"actor":"cli"', '"actor":"someone"')
    path.write_text("\n".join(lines) + "\n")
    broken = run_cleaner(["audit", "verify"], env)
    assert broken.returncode == 1 and "line 4" in broken.stderr

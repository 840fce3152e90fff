"""The exit codes are one table (shared/exit_codes.py): the cleaner's errors, its front and the README agree with it."""

from __future__ import annotations

import re

from shared.errors import ConfigError, FilesystemError, PreconditionError, StorageError
from shared.exit_codes import ExitCode
from tests.support import ROOT


def _readme_tables() -> dict[str, set[int]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tables: dict[str, set[int]] = {}
    for heading in re.finditer(r"^### (Exit codes[^\n]*)\n", text, flags=re.M):
        body = text[heading.end() :].split("\n### ", 1)[0]
        tables[heading[1]] = {int(code) for code in re.findall(r"^\| (\d+) \|", body, flags=re.M)}
    return tables


def test_the_values_are_the_contract_and_never_renumbered() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "UNEXPECTED": 1,
        "CONFIG": 2,
        "PARTIAL": 3,
        "PRECONDITION": 4,
        "FILESYSTEM": 5,
        "INTERRUPTED": 130,
    }


def test_each_error_class_exits_with_its_code_from_the_table() -> None:
    assert StorageError("x").exit_code == ExitCode.UNEXPECTED
    assert ConfigError("x").exit_code == ExitCode.CONFIG
    assert PreconditionError("x").exit_code == ExitCode.PRECONDITION
    assert FilesystemError("x").exit_code == ExitCode.FILESYSTEM


def test_the_readme_tables_name_only_codes_of_the_table_and_the_main_one_names_them_all() -> None:
    tables = _readme_tables()
    assert tables, "no '### Exit codes' table in README.md"
    known = {int(code) for code in ExitCode}
    for heading, codes in tables.items():
        assert codes and codes <= known, (heading, codes - known)
    everyday = known - {ExitCode.INTERRUPTED}
    assert tables["Exit codes (every cleaner command)"] == everyday


def test_no_module_writes_its_own_exit_code_numbers() -> None:
    """Every exit code in the cleaner and the exporter's cleanup runner is a name from the table."""
    sources = [
        *sorted((ROOT / "cleaner").rglob("*.py")),
        ROOT / "exporter/cleanup_runner.py",
        ROOT / "shared/errors.py",
    ]
    offenders = []
    pattern = re.compile(
        r"(exit_code\s*[:=]\s*(int\s*=\s*)?\d|EXIT_[A-Z]+\s*[,=]|\bexit_code\s*==\s*\d|return [1-9]\d*$)"
    )
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []

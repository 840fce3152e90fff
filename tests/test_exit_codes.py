"""The exit codes are one table (shared/exit_codes.py): the cleaner's errors, its front and docs/cleaner.md agree."""

from __future__ import annotations

import re

from shared.errors import ConfigError, FilesystemError, PreconditionError, StorageError
from shared.exit_codes import ExitCode
from tests.support import ROOT


def _readme_tables() -> dict[str, set[int]]:
    text = (ROOT / "docs" / "cleaner.md").read_text(encoding="utf-8")
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
    assert tables, "no '### Exit codes' table in docs/cleaner.md"
    known = {int(code) for code in ExitCode}
    for heading, codes in tables.items():
        assert codes and codes <= known, (heading, codes - known)
    everyday = known - {ExitCode.INTERRUPTED}
    assert tables["Exit codes (every cleaner command)"] == everyday


# An exit code written as a number: assigned to or compared with an exit code, returned from a
# command's main (`return 2`, `return 0 if ... else 1`), raised (`SystemExit(2)`) or passed to exit().
EXIT_NUMBER = re.compile(
    r"(exit_code\s*[:=]\s*(int\s*=\s*)?\d|EXIT_[A-Z]+\s*[,=]|\bexit_code\s*==\s*\d"
    r"|return [1-9]\d*$|SystemExit\(\d|\bexit\(\d|\bcode\s*(:\s*int\s*)?=\s*\d"
    r"|return \d+ if .* else \d+$)"
)


def _numbered_exits(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each exit code written as a number in the source `text`."""
    found = []
    in_main = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("def "):
            in_main = line.startswith("def main(")
        # `return 0` is many a function's count or offset: only a command's main returns exit codes.
        if EXIT_NUMBER.search(line) or (in_main and line.strip() == "return 0"):
            found.append((number, line.strip()))
    return found


def test_no_module_writes_its_own_exit_code_numbers() -> None:
    """Every exit code in the cleaner, the exporter, the tools and shared.errors is a name from the table."""
    sources = [
        *sorted((ROOT / "cleaner").rglob("*.py")),
        *sorted((ROOT / "exporter").rglob("*.py")),
        *sorted((ROOT / "tools").rglob("*.py")),
        ROOT / "shared/errors.py",
    ]
    assert ROOT / "exporter/cli.py" in sources and ROOT / "tools/localstack.py" in sources
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line}"
        for path in sources
        for number, line in _numbered_exits(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_the_exit_number_check_finds_each_form_it_looks_for() -> None:
    source = (
        "def main() -> int:\n"
        "    raise SystemExit(2)\n"
        "    return 0 if done else 1\n"
        "    code = 1\n"
        "    sys.exit(3)\n"
        "    return 2\n"
        "    return 0\n"
        "    return ExitCode.OK if done else ExitCode.UNEXPECTED\n"
        "def count() -> int:\n"
        "    return 0\n"
        "    return ExitCode.CONFIG\n"
    )
    assert [line for _number, line in _numbered_exits(source)] == [
        "raise SystemExit(2)",
        "return 0 if done else 1",
        "code = 1",
        "sys.exit(3)",
        "return 2",
        "return 0",
    ]

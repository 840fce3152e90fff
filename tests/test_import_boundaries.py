"""The import contracts (pyproject.toml, `make check`) hold, and no import hides from them.

import-linter reads `import` statements; a module imported by name at run time
(`importlib.import_module("cleaner.x")`, `__import__`) is an edge it cannot see, so a cycle through
one would pass the acyclic contract. Such imports are listed here, each with the reason it stays.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from tests.support import ROOT, VENV_BIN

PACKAGES = ("exporter", "cleaner", "shared")

# (importing file, module imported by name), each with the reason it stays: none today.
IMPORTED_BY_NAME: set[tuple[str, str]] = set()


def imports_by_name(source: str) -> set[str]:
    """Project modules `source` imports by name at run time (literal names only; others are refused)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name not in ("import_module", "__import__"):
            continue
        arg = node.args[0] if node.args else None
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            found.add("<computed name>")
        elif arg.value.split(".")[0] in PACKAGES:
            found.add(arg.value)
    return found


def test_imports_by_name_are_found() -> None:
    code = "import importlib\nimportlib.import_module('cleaner.x')\n__import__('shared.y')\nimport_module(n)\n"
    assert imports_by_name(code) == {"cleaner.x", "shared.y", "<computed name>"}
    assert imports_by_name("importlib.import_module('json')\n") == set()


def test_no_project_module_is_imported_by_name_but_the_listed_ones() -> None:
    found = {
        (str(path.relative_to(ROOT)), module)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in imports_by_name(path.read_text(encoding="utf-8"))
    }
    assert found == IMPORTED_BY_NAME, f"imports the import linter cannot see: {sorted(found - IMPORTED_BY_NAME)}"


def test_the_import_contracts_hold() -> None:
    done = subprocess.run(
        [str(Path(VENV_BIN) / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout

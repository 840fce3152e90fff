"""The slow lists in tests/conftest.py name tests that exist: a rename must not move a test silently."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import SLOW_MODULES, SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def test_every_slow_module_exists() -> None:
    missing = sorted(name for name in SLOW_MODULES if not (TESTS / f"{name}.py").is_file())
    assert not missing, f"tests/conftest.py SLOW_MODULES names no file: {missing}"


def test_every_slow_test_exists() -> None:
    files = {entry.partition("::")[0] for entry in SLOW_TESTS}
    defined = {
        f"{file}::{node.name}"
        for file in files
        if (TESTS / file).is_file()
        for node in ast.parse((TESTS / file).read_text()).body
        if isinstance(node, ast.FunctionDef)
    }
    missing = sorted(SLOW_TESTS - defined)
    assert not missing, f"tests/conftest.py SLOW_TESTS names no test: {missing}"

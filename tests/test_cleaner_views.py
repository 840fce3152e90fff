"""The typed views the cleaner's commands hand inward: built once at the edge, equal to what the settings say."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from cleaner.commands.views import shown_settings, store_paths
from cleaner.report import policies_document
from cleaner.store_paths import StorePaths
from shared.config import load_settings
from shared.settings_table import FIELDS
from tests.support import ROOT

EDGE = {"cleaner/cli.py", *(f"cleaner/commands/{p.name}" for p in (ROOT / "cleaner/commands").glob("*.py"))}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_only_the_command_edge_imports_the_settings_loader() -> None:
    """The rest of the cleaner is handed a view or a section, never the whole `Settings`."""
    importers = {
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "cleaner").rglob("*.py"))
        if "shared.config" in _imported_modules(path)
    }
    assert "cleaner/commands/views.py" in importers  # the check sees the imports it looks for
    assert importers <= EDGE, sorted(importers - EDGE)


def test_store_paths_are_the_settings_paths_of_the_same_names(tmp_path: Path) -> None:
    env = {
        "STORAGE_BASE_PATH": str(tmp_path / "base"),
        "STORAGE_MODELS_PATH": str(tmp_path / "store"),
        "STORAGE_RAW_DIR": "downloads",
        "STORAGE_STATE_PATH": str(tmp_path / "state"),
        "STORAGE_AUDIT_LOG": str(tmp_path / "logs/audit.jsonl"),
        "STORAGE_TRASH_PATH": str(tmp_path / "bin"),
        "STORAGE_BACKUP_PATH": str(tmp_path / "archive"),
    }
    settings = load_settings(env=env)
    paths = store_paths(settings)
    assert {f.name: getattr(paths, f.name) for f in fields(StorePaths)} == {
        f.name: getattr(settings, f.name) for f in fields(StorePaths)
    }
    assert paths.trash_path == tmp_path / "bin"
    assert paths.layout.dir_for_tier("raw") == "downloads"
    assert paths.cleanup_state_file == tmp_path / "state/last-run.json"


def test_the_policies_listing_shows_each_value_its_source_and_its_variable(tmp_path: Path) -> None:
    settings = load_settings(env={"STORAGE_BASE_PATH": str(tmp_path), "STORAGE_CLEANUP_AGE_DAYS": "3"})
    doc = policies_document(shown_settings(settings))
    age = next(p for p in doc["policies"] if p["name"] == "age")
    shown = {s["key"]: s for s in age["settings"]}
    by_key = {f.key: f for f in FIELDS}
    assert shown["cleaner.age_days"] == {
        "key": "cleaner.age_days",
        "env": by_key["cleaner.age_days"].env,
        "value": 3.0,
        "source": "env",
    }
    assert shown["cleaner.age_tiers"]["source"] == "default"
    assert doc["enabled"]["value"] == list(settings.cleaner.policies)

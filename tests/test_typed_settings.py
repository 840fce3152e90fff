"""Typed settings: every FIELDS row is one typed attribute, values have their declared types, and
mypy --strict sees those types at the use sites (a wrong-typed use is a type error)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import pytest

from shared.config import Settings, load_settings
from shared.settings_table import FIELDS
from shared.typed_settings import (
    CleanerSettings,
    TrashSettings,
    build,
    conforms,
    declared_keys,
    missing_and_extra,
)

ROOT = Path(__file__).resolve().parent.parent

# A value other than the default for every setting that has a simple one, set through the
# environment: each parser's output must still have the attribute's type.
NON_DEFAULTS = {
    "STORAGE_BASE_PATH": "/srv/store",
    "STORAGE_MODELS_PATH": "/srv/models",
    "STORAGE_RAW_DIR": "downloads",
    "STORAGE_METRICS_PATH": "/srv/tsdb",
    "STORAGE_MAX_SIZE_GB": "12",
    "STORAGE_STATE_PATH": "/srv/state",
    "STORAGE_EXPORTER_LISTEN": "[::1]:9999",
    "STORAGE_RECONCILE_INTERVAL_SECONDS": "0",
    "STORAGE_EVENT_QUEUE_SIZE": "5000",
    "STORAGE_FORCE_POLLING": "yes",
    "STORAGE_SCAN_WORKERS": "3",
    "STORAGE_TLS_CERT_FILE": "/c.pem",
    "STORAGE_TLS_KEY_FILE": "/k.pem",
    "STORAGE_TRUSTED_PROXIES": "10.0.0.1,172.18.0.0/16",
    "STORAGE_HTTP_MAX_CONNECTIONS": "64",
    "STORAGE_LOG_FORMAT": "JSON",
    "STORAGE_LOG_LEVEL": "debug",
    "STORAGE_ADMIN_TOKEN": "ops:" + "a" * 20,
    "STORAGE_READ_TOKEN": "b" * 20,
    "STORAGE_AUDIT_REFUSALS_PER_MINUTE": "0",
    "STORAGE_PROMETHEUS_BEARER_TOKEN": "c" * 20,
    "STORAGE_PROMETHEUS_MATCHERS": 'job="models"',
    "STORAGE_CLEANUP_POLICIES": "size",
    "STORAGE_CLEANUP_AGE_DAYS": "2",
    "STORAGE_MIN_REQUESTS": "0",
    "STORAGE_CLEANUP_MAX_EVICT_MODELS": "7",
    "STORAGE_CLEANUP_PROTECT": "raw/keep-*, repository/prod",
    "STORAGE_BACKUP_MODE": "archive",
    "STORAGE_BACKUP_PATH": "/srv/archive",
    "STORAGE_TRASH_MAX_GB": "1.5",
}


def test_every_field_is_one_typed_attribute_and_back() -> None:
    keys = [f.key for f in FIELDS]
    assert missing_and_extra(keys) == ([], [])
    assert sorted(declared_keys()) == sorted(keys)


def test_a_row_without_an_attribute_or_an_attribute_without_a_row_is_named() -> None:
    keys = [f.key for f in FIELDS]
    missing, extra = missing_and_extra([*keys, "cleaner.not_a_setting"])
    assert (missing, extra) == (["cleaner.not_a_setting"], [])
    missing, extra = missing_and_extra([k for k in keys if k != "cleaner.trash.max_gb"])
    assert (missing, extra) == ([], ["cleaner.trash.max_gb"])


@pytest.mark.parametrize("env", [{}, NON_DEFAULTS], ids=["defaults", "non-defaults"])
def test_every_value_has_its_declared_type(env: dict[str, str]) -> None:
    settings = load_settings(env=env)
    declared = declared_keys()
    for key, value in settings.values.items():
        assert conforms(value, declared[key]), (key, value, declared[key])
    if env:  # the non-defaults did arrive, typed
        assert settings.exporter.listen == ("::1", 9999)
        assert settings.exporter.force_polling is True
        assert settings.exporter.queue_size == 5000 and isinstance(settings.exporter.queue_size, int)
        assert settings.cleaner.age_days == 2.0 and isinstance(settings.cleaner.age_days, float)
        assert settings.cleaner.protect == ("raw/keep-*", "repository/prod")
        assert settings.cleaner.backup.mode == "archive"
        assert settings.log.format == "json"
        assert settings.api.admin_tokens == {"ops": "a" * 20}
        assert settings.storage.models.raw_dir == "downloads"
        assert settings.models_path == Path("/srv/models")


def test_sections_are_the_yaml_keys() -> None:
    settings = load_settings(env=NON_DEFAULTS)
    for f in FIELDS:
        node: object = settings
        for part in f.key.split("."):
            node = getattr(node, part)
        assert node == settings.values[f.key], f.key


def test_no_attribute_is_typed_any() -> None:
    def has_any(hint: object) -> bool:
        return hint is Any or any(has_any(arg) for arg in get_args(hint))

    assert [key for key, hint in declared_keys().items() if has_any(hint)] == []


@pytest.mark.parametrize(
    ("value", "hint", "expected"),
    [
        (1.0, float, True),
        (1, float, False),  # the number parsers return floats; an int here is a parser slip
        (True, int, False),
        (3, int, True),
        (None, Path | None, True),
        ("/x", Path | None, False),
        (("a", "b"), tuple[str, ...], True),
        (["a"], tuple[str, ...], False),
        (("h", 1), tuple[str, int], True),
        (("h", "1"), tuple[str, int], False),
        ({"n": "t"}, Mapping[str, str], True),
        ({"n": 1}, Mapping[str, str], False),
        ({"n": 1}, dict[str, int], True),
        ({"n": 1.0}, dict[str, int], False),
        (frozenset({"a"}), frozenset[str], True),
        ({"a"}, frozenset[str], False),
        (["a"], list[str], True),
        ([1], list[str], False),
    ],
)
def test_conforms_checks_the_declared_forms(value: object, hint: object, expected: bool) -> None:
    assert conforms(value, hint) is expected


def test_a_declared_type_without_a_check_is_named() -> None:
    with pytest.raises(TypeError, match=r"no check for the declared type set\[str\]"):
        conforms({"a"}, set[str])


def test_a_parser_returning_another_type_is_refused_at_build() -> None:
    values = {"cleaner.trash.path": None, "cleaner.trash.retention_days": 7.0, "cleaner.trash.max_gb": "50"}
    with pytest.raises(TypeError, match=r"cleaner\.trash\.max_gb is str, declared <class 'float'>"):
        build(TrashSettings, values, "cleaner.trash")
    assert build(TrashSettings, {**values, "cleaner.trash.max_gb": 50.0}, "cleaner.trash").max_gb == 50.0


GOOD = """
from shared.config import Settings
from shared.typed_settings import CleanerSettings, PrometheusSettings


def age_seconds(cleaner: CleanerSettings) -> float:
    return cleaner.age_days * 86400.0


def url(prometheus: PrometheusSettings) -> str:
    return prometheus.url


def listen(settings: Settings) -> tuple[str, int]:
    host, port = settings.exporter.listen
    return host, port + 1
"""

# Each line is one wrong use; mypy must report each on its own line.
BAD = {
    "age: str = cleaner.age_days": "Incompatible types in assignment",
    'cleaner.age_days + "d"': 'Unsupported operand types for + ("float" and "str")',
    "cleaner.max_evict_models.upper()": '"int" has no attribute "upper"',
    'cleaner.backup.mode == "trsh"': "Non-overlapping equality check",
    '[p for p in cleaner.policies if p == "usge"]': "Non-overlapping equality check",
    "cleaner.agedays": 'has no attribute "agedays"',
    "settings.cleaner.age_days = 1.0": "is read-only",
    'settings["cleaner.age_days"]': 'Value of type "Settings" is not indexable',
}


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(snippet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_mypy_sees_the_types_at_use_sites(tmp_path: Path) -> None:
    good = _mypy(tmp_path, GOOD)
    assert good.returncode == 0, good.stdout + good.stderr
    bad_lines = list(BAD)
    source = "\n".join(
        [
            "from shared.config import Settings",
            "from shared.typed_settings import CleanerSettings",
            "",
            "",
            "def uses(settings: Settings, cleaner: CleanerSettings) -> None:",
            *(f"    {line}" for line in bad_lines),
        ]
    )
    bad = _mypy(tmp_path, textwrap.dedent(source) + "\n")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    for number, line in enumerate(bad_lines, start=6):
        reported = [out for out in bad.stdout.splitlines() if f"snippet.py:{number}:" in out]
        assert reported, f"mypy let `{line}` through:\n{bad.stdout}"
        assert BAD[line] in " ".join(reported), (line, reported)


def test_settings_is_built_from_values_only_through_the_table() -> None:
    settings = load_settings(env={})
    rebuilt = Settings.from_values(settings.values, settings.sources)
    assert rebuilt == settings
    assert isinstance(rebuilt.cleaner, CleanerSettings)


def test_a_merged_row_without_its_attribute_says_where_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import settings_parsers as parsers
    from shared import settings_table as table

    new = (
        table.Field("cleaner.usage_origin", "STORAGE_USAGE_ORIGIN", "prometheus", parsers.string, "Usage origin"),
        table.Field("exporter.opens.enabled", "STORAGE_OPENS_ENABLED", False, parsers.boolean, "Track opens"),
        table.Field("exporter.opens_window_seconds", "STORAGE_OPENS_WINDOW", None, parsers.optional_path, "x"),
    )
    monkeypatch.setattr(table, "FIELDS", table.FIELDS + new)
    monkeypatch.setattr(table, "FIELDS_BY_KEY", {f.key: f for f in table.FIELDS})
    assert table.undeclared() == [
        "cleaner.usage_origin: no typed attribute; add `usage_origin: ...` in CleanerSettings "
        "in shared/typed_settings.py, typed as its parser returns (str)",
        "exporter.opens.enabled: no typed attribute; add a new section exporter.opens.*: a frozen class, "
        "named by `opens: ...` in ExporterSettings in shared/typed_settings.py, typed as its parser returns (bool)",
        "exporter.opens_window_seconds: no typed attribute; add `opens_window_seconds: ...` in ExporterSettings "
        "in shared/typed_settings.py, typed as its parser returns (... | None)",
    ]


def test_importing_the_settings_fails_on_a_row_without_an_attribute(tmp_path: Path) -> None:
    # What a merge that adds only a FIELDS row does: every process refuses to start, saying why.
    shared = tmp_path / "shared"
    shared.mkdir()
    for source in (ROOT / "shared").glob("*.py"):
        (shared / source.name).write_text(source.read_text())
    table = shared / "settings_table.py"
    row = '    Field("cleaner.usage_origin", "STORAGE_USAGE_ORIGIN", "prometheus", string, "Usage origin"),\n'
    text = table.read_text()
    anchor = "FIELDS: tuple[Field, ...] = (\n"
    assert anchor in text
    table.write_text(text.replace(anchor, anchor + row))
    imported = subprocess.run(
        [sys.executable, "-c", "import shared.config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert imported.returncode == 1
    assert "cleaner.usage_origin: no typed attribute; add `usage_origin: ...` in CleanerSettings" in imported.stderr

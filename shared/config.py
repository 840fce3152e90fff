"""The one typed, validated settings object: defaults < YAML file < environment variables.

Every setting is declared once in `FIELDS` (shared/settings_table.py, with the steps to add one) with
its YAML key, its environment variable, its default and its parser, so the loader, the `policies`
listing and the configuration reference agree.
Its type lives in `shared/typed_settings.py`, where the attribute path is the YAML key: code reads
`settings.cleaner.age_days` (a float to mypy), never a string-keyed lookup, and hands inward the
smallest section it needs (`settings.cleaner`, `settings.cleaner.prometheus`, `settings.exporter`).
`settings.sources[key]` says where each value came from (default, file or env) for the listings.

Building the settings fails if a parser returns another type than the attribute declares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError
from shared.layout import Layout
from shared.settings_table import FIELDS, FIELDS_BY_KEY
from shared.typed_settings import (
    ApiSettings,
    CleanerSettings,
    ExporterSettings,
    LogSettings,
    StorageSettings,
    build,
)
from shared.units import GB


@dataclass(frozen=True, slots=True)
class Settings:
    """Effective settings, one typed section per YAML section. `sources[key]` says where each value
    came from: default, file or env. Built only by `load_settings` (or `from_values`)."""

    storage: StorageSettings
    exporter: ExporterSettings
    log: LogSettings
    api: ApiSettings
    cleaner: CleanerSettings
    values: Mapping[str, object] = field(repr=False)
    sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_values(cls, values: Mapping[str, object], sources: Mapping[str, str]) -> Settings:
        """Parsed values by YAML key (every key of `FIELDS`) into the typed sections."""
        return cls(
            storage=build(StorageSettings, values, "storage"),
            exporter=build(ExporterSettings, values, "exporter"),
            log=build(LogSettings, values, "log"),
            api=build(ApiSettings, values, "api"),
            cleaner=build(CleanerSettings, values, "cleaner"),
            values=dict(values),
            sources=dict(sources),
        )

    # The paths everything else derives from.
    @property
    def base_path(self) -> Path:
        return self.storage.base_path

    @property
    def models_path(self) -> Path:
        return self._derived(self.storage.models.path, "models")

    @property
    def metrics_path(self) -> Path:
        return self._derived(self.storage.metrics.path, "metrics")

    @property
    def grafana_path(self) -> Path:
        return self._derived(self.storage.grafana.path, "grafana")

    @property
    def state_path(self) -> Path:
        return self._derived(self.storage.state_path, "state")

    @property
    def audit_log_path(self) -> Path:
        return self._derived(self.storage.audit_log, "audit.log")

    @property
    def trash_path(self) -> Path:
        return self._derived(self.cleaner.trash.path, "trash")

    @property
    def backup_path(self) -> Path:
        return self._derived(self.cleaner.backup.path, "backup")

    @property
    def cleanup_state_file(self) -> Path:
        """Where the cleaner leaves the result of its last run for the exporter to serve."""
        return self.state_path / "last-run.json"

    @property
    def layout(self) -> Layout:
        models = self.storage.models
        return Layout(raw_dir=models.raw_dir, quantized_dir=models.quantized_dir, repository_dir=models.repository_dir)

    @property
    def capacity_bytes(self) -> int:
        return round(self.storage.max_size_gb * GB)

    def _derived(self, value: Path | None, name: str) -> Path:
        return value if value is not None else self.base_path / name

    def public(self) -> dict[str, object]:
        """Values safe to show or log, by YAML key: secrets replaced by whether they are set."""
        shown: dict[str, object] = {}
        for f in FIELDS:
            value = self.values[f.key]
            if f.secret:
                value = sorted(value) if isinstance(value, Mapping) else bool(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            shown[f.key] = value
        return shown


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        # Token mappings and lists are values, not sections.
        if isinstance(value, Mapping) and key not in FIELDS_BY_KEY:
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config: cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: {path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: {path}: expected a mapping at the top level")
    flat = _flatten(data)
    unknown = sorted(key for key in flat if key not in FIELDS_BY_KEY)
    if unknown:
        raise ConfigError(f"config: {path}: unknown key {unknown[0]!r}", hint="see docs/configuration.md")
    return flat


def _read_secret_file(var: str, path_text: str) -> str:
    try:
        return Path(path_text).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(f"config: {var}_FILE={path_text!r}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {var}_FILE={path_text!r}: not UTF-8 text") from None


def load_settings(config_file: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, then the YAML file, then the environment; validate all."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    raw: dict[str, tuple[Any, str]] = {f.key: (f.default, "default") for f in FIELDS}

    file_path = config_file if config_file is not None else env.get("STORAGE_CONFIG") or None
    if file_path is not None:
        for key, value in _read_yaml(Path(file_path)).items():
            raw[key] = (value, "file")
    shown: dict[str, str] = {}  # the name an error calls a value by: YAML key, variable or its _FILE
    for f in FIELDS:
        if f.env in env:
            raw[f.key] = (env[f.env], "env")
            shown[f.key] = f.env
        elif f.secret and f"{f.env}_FILE" in env:
            raw[f.key] = (_read_secret_file(f.env, env[f"{f.env}_FILE"]), "env")
            shown[f.key] = f"{f.env}_FILE"

    for f in FIELDS:
        value, source = raw[f.key]
        name = shown.get(f.key, f.key)
        values[f.key] = None if value is None and f.default is None else f.parse(name, value)
        sources[f.key] = source
    settings = Settings.from_values(values, sources)
    _check_coherence(settings)
    return settings


def _check_coherence(settings: Settings) -> None:
    layout = settings.layout
    dirs = [layout.raw_dir, layout.quantized_dir, layout.repository_dir]
    if len(set(dirs)) != 3:
        raise ConfigError(f"config: storage.models.*_dir={dirs}: expected three different directory names")
    cert, key = settings.exporter.tls_cert_file, settings.exporter.tls_key_file
    if (cert is None) != (key is None):
        raise ConfigError("config: exporter.tls_cert_file and exporter.tls_key_file: expected both or neither")
    if "$window" not in settings.cleaner.usage_query:
        raise ConfigError(
            f"config: cleaner.usage_query={settings.cleaner.usage_query[:60]!r}: "
            "expected a PromQL template containing $window"
        )
    _check_apart_from_models(settings)


def _shown_key(settings: Settings, key: str) -> str:
    """The name the user set a value under: its env var when it came from the environment."""
    return FIELDS_BY_KEY[key].env if settings.sources.get(key) == "env" else key


def overlap(path: Path, other: Path) -> str | None:
    """How `path` overlaps `other` ("is", "is inside", "contains"), or None. Pure."""
    if path == other:
        return "is"
    if other in path.parents:
        return "is inside"
    if path in other.parents:
        return "contains"
    return None


def _check_apart_from_models(settings: Settings) -> None:
    """The cleaner's own areas must not overlap the models (anything there is read as theirs or as
    models), nor the archive the trash (purge would empty it).

    A trash or archive that contains the models path lists live models as trash entries and purge
    deletes them; one inside it is scanned and planned as models. The state directory and the
    audit log only must not lie inside it (a state path above the models changes nothing).
    """
    models = settings.models_path.resolve()
    areas = (
        ("cleaner.trash.path", settings.trash_path, True),
        ("cleaner.backup.path", settings.backup_path, True),
        ("storage.state_path", settings.state_path, False),
        ("storage.audit_log", settings.audit_log_path, False),
    )
    for key, path, must_not_contain in areas:
        how = overlap(path.resolve(), models)
        if how is None or (how == "contains" and not must_not_contain):
            continue
        expected = "a path outside the models path" + (" and not containing it" if must_not_contain else "")
        where = "" if settings.sources.get(key) in ("env", "file") else " (derived from storage.base_path)"
        raise ConfigError(
            f"config: {_shown_key(settings, key)}={str(path)!r}{where} {how} the models path {str(models)!r}: "
            f"expected {expected}"
        )
    # Purge reads every run directory under the trash as trash: archived copies there would be purged.
    trash = settings.trash_path.resolve()
    how = overlap(settings.backup_path.resolve(), trash)
    if settings.cleaner.backup.mode == "archive" and how is not None:
        raise ConfigError(
            f"config: {_shown_key(settings, 'cleaner.backup.path')}={str(settings.backup_path)!r} "
            f"{how} the trash path {str(trash)!r}: expected a path apart from the trash, which purge empties"
        )

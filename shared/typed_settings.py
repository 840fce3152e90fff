"""The typed shape of the settings: one frozen class per YAML section, one typed attribute per key.

The attribute path is the YAML key: `cleaner.trash.retention_days` is
`settings.cleaner.trash.retention_days: float`. Code reads settings only through these attributes,
so mypy knows every type; a section is a small view to hand inward (`settings.cleaner.prometheus`
to the query client) instead of the whole object.

Invariants, checked when `shared.config` is imported and each time settings are built:
- every key in `shared.config.FIELDS` is exactly one attribute here, and every attribute a key
  (`missing_and_extra`);
- every value a parser returns has the attribute's declared type (`conforms`), so what mypy is
  told is what the program holds.

Pure: no disk, no environment, no clock.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Tier = Literal["raw", "quantized", "repository"]
Policy = Literal["age", "usage", "size"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
BackupMode = Literal["trash", "archive", "none"]
UsageSource = Literal["requests", "opens", "both", "auto"]


@dataclass(frozen=True, slots=True)
class ModelsSettings:
    """storage.models.*"""

    path: Path | None
    raw_dir: str
    quantized_dir: str
    repository_dir: str


@dataclass(frozen=True, slots=True)
class DataPathSettings:
    """storage.metrics.* and storage.grafana.*"""

    path: Path | None


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """storage.*"""

    base_path: Path
    models: ModelsSettings
    metrics: DataPathSettings
    grafana: DataPathSettings
    max_size_gb: float
    state_path: Path | None
    audit_log: Path | None


@dataclass(frozen=True, slots=True)
class ExporterSettings:
    """exporter.*"""

    listen: tuple[str, int]
    reconcile_interval_seconds: float
    coalesce_window_seconds: float
    settle_seconds: float
    queue_size: int
    poll_interval_seconds: float
    force_polling: bool
    scan_workers: int
    scrub_stats_per_second: float
    tls_cert_file: Path | None
    tls_key_file: Path | None
    cleaner_command: str
    cleanup_timeout_seconds: float
    trusted_proxies: tuple[str, ...]
    http_max_connections: int
    http_request_timeout_seconds: float
    http_keepalive_timeout_seconds: float
    opens_tracking: bool
    opens_save_interval_seconds: float
    opens_ignore: tuple[str, ...]
    opens_sweep_models: int
    opens_sweep_window_seconds: float


@dataclass(frozen=True, slots=True)
class LogSettings:
    """log.*"""

    format: LogFormat
    level: LogLevel


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """api.*"""

    admin_tokens: Mapping[str, str] | None  # name -> token; None when unset
    read_tokens: Mapping[str, str] | None
    audit_refusals_per_minute: int

    def __repr__(self) -> str:
        # Tokens are secrets: a repr (a log line, a traceback) names them only.
        admin, read = sorted(self.admin_tokens or {}), sorted(self.read_tokens or {})
        return f"ApiSettings(admin_tokens={admin}, read_tokens={read}, ...)"


@dataclass(frozen=True, slots=True)
class PrometheusSettings:
    """cleaner.prometheus.*"""

    url: str
    timeout_seconds: float
    bearer_token: str
    username: str
    password: str
    matchers: str

    def __repr__(self) -> str:
        return f"PrometheusSettings(url={self.url!r}, ...)"


@dataclass(frozen=True, slots=True)
class BackupSettings:
    """cleaner.backup.*"""

    mode: BackupMode
    path: Path | None


@dataclass(frozen=True, slots=True)
class TrashSettings:
    """cleaner.trash.*"""

    path: Path | None
    retention_days: float
    max_gb: float


@dataclass(frozen=True, slots=True)
class CleanerSettings:
    """cleaner.*"""

    prometheus: PrometheusSettings
    policies: tuple[Policy, ...]
    age_days: float
    age_tiers: tuple[Tier, ...]
    min_requests: float
    request_timeframe_days: float
    usage_query: str
    usage_label: str
    usage_tiers: tuple[Tier, ...]
    usage_source: UsageSource
    max_size_gb: float
    size_tiers: tuple[Tier, ...]
    low_watermark: float
    grace_hours: float
    max_evict_fraction: float
    max_evict_models: int
    protect: tuple[str, ...]
    backup: BackupSettings
    trash: TrashSettings


# The top-level sections, in the order of the YAML reference.
SECTIONS: dict[str, type] = {
    "storage": StorageSettings,
    "exporter": ExporterSettings,
    "log": LogSettings,
    "api": ApiSettings,
    "cleaner": CleanerSettings,
}

G = TypeVar("G", bound="DataclassInstance")


@functools.cache
def _hints(cls: type) -> dict[str, object]:
    # get_type_hints evaluates every annotation string: once per class, not once per load.
    return get_type_hints(cls)


def _attributes(cls: type, prefix: str) -> Iterator[tuple[str, object]]:
    """(YAML key, declared type) of every leaf under `cls`, depth first."""
    hints = _hints(cls)
    for f in fields(cls):
        key, hint = f"{prefix}.{f.name}", hints[f.name]
        if isinstance(hint, type) and is_dataclass(hint):
            yield from _attributes(hint, key)
        else:
            yield key, hint


def declared_keys() -> dict[str, object]:
    """Every YAML key the typed classes declare, with its type."""
    return {key: hint for name, cls in SECTIONS.items() for key, hint in _attributes(cls, name)}


def missing_and_extra(keys: list[str]) -> tuple[list[str], list[str]]:
    """Keys of the table with no attribute, and attributes with no key in the table."""
    declared = declared_keys()
    return [k for k in keys if k not in declared], [k for k in declared if k not in keys]


def where_to_declare(key: str) -> str:
    """Where the attribute for a new key goes: the message a merge that added only a row gets."""
    parts = key.split(".")
    cls = SECTIONS.get(parts[0])
    if cls is None:
        return f"a new top-level section {parts[0]!r}: a frozen class in SECTIONS and a field of Settings"
    for depth, part in enumerate(parts[1:-1], start=1):
        hint = _hints(cls).get(part)
        if not (isinstance(hint, type) and is_dataclass(hint)):
            section = ".".join(parts[: depth + 1])
            return f"a new section {section}.*: a frozen class, named by `{part}: ...` in {cls.__name__}"
        cls = hint
    return f"`{parts[-1]}: ...` in {cls.__name__}"


def conforms(value: object, hint: object) -> bool:
    """Whether `value` is of the declared type; the forms the settings use, nothing more."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is types.UnionType:
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
    if origin in (Mapping, dict):
        return isinstance(value, origin) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    if origin in (frozenset, list):
        return isinstance(value, origin) and all(conforms(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"settings: no check for the declared type {hint!r}")


def build(cls: type[G], values: Mapping[str, object], prefix: str) -> G:
    """The section `prefix` of the parsed values, as `cls`; TypeError if a value has another type."""
    hints = _hints(cls)
    kwargs: dict[str, object] = {}
    for f in fields(cls):
        key, hint = f"{prefix}.{f.name}", hints[f.name]
        if isinstance(hint, type) and is_dataclass(hint):
            kwargs[f.name] = build(hint, values, key)
            continue
        value = values[key]
        if not conforms(value, hint):
            raise TypeError(f"settings: {key} is {type(value).__name__}, declared {hint}")
        kwargs[f.name] = value
    return cls(**kwargs)

"""The settings table: every setting declared once, with its YAML key, its environment variable, its
default, its parser and a line of documentation. The loader (shared/config.py), the `policies`
listing and docs/configuration.md are all built from `FIELDS`.

To add a setting (two edits, both one line):
1. a `Field(...)` row in `FIELDS` below (YAML key, variable, default, parser, doc);
2. `name: type` in the class of its section in `shared/typed_settings.py`, named as the last part
   of the key, typed as its parser returns (e.g. `cleaner.usage_source` -> `usage_source: UsageSource` in
   `CleanerSettings`; a `choice` is a `Literal` alias there). A new section (`exporter.opens.*`)
   is a new frozen class there and one attribute naming it in its parent.
Importing this module fails, naming the key, if a row and an attribute do not match one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from shared.settings_parsers import (
    Parser,
    boolean,
    choice,
    dir_name,
    integer,
    listen,
    matchers,
    networks,
    number,
    optional_path,
    optional_secret,
    optional_string,
    path,
    string,
    string_list,
    subset,
    tokens,
    trash_limit,
)
from shared.typed_settings import (
    BackupMode,
    LogFormat,
    LogLevel,
    Policy,
    Tier,
    UsageSource,
    missing_and_extra,
    where_to_declare,
)

TIERS: tuple[str, ...] = get_args(Tier)
POLICIES: tuple[str, ...] = get_args(Policy)
BACKUP_MODES: tuple[str, ...] = get_args(BackupMode)
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
USAGE_SOURCES: tuple[str, ...] = get_args(UsageSource)

# Triton's success plus failure counters, each summed on its own: increase() drops the metric
# name, so one regex selector over both fails ("vector cannot contain metrics with the same
# labelset") once a model has both; `A + B or A or B` keeps models that have only one. The same
# expression, at 7d, is the recording rule model:model_storage_requests:increase7d.
_TRITON_SUCCESS = 'sum by (model) (increase({__name__="nv_inference_request_success"$matchers}[$window]))'
_TRITON_FAILURE = 'sum by (model) (increase({__name__="nv_inference_request_failure"$matchers}[$window]))'
DEFAULT_USAGE_QUERY = f"{_TRITON_SUCCESS} + {_TRITON_FAILURE} or {_TRITON_SUCCESS} or {_TRITON_FAILURE}"


@dataclass(frozen=True, slots=True)
class Field:
    """One setting: where it lives in YAML, its environment variable, default and parser."""

    key: str
    env: str
    default: Any
    parse: Parser
    doc: str
    secret: bool = False


FIELDS: tuple[Field, ...] = (
    Field("storage.base_path", "STORAGE_BASE_PATH", "./storage", path, "Root of the store and its state"),
    Field("storage.models.path", "STORAGE_MODELS_PATH", None, optional_path, "Models (default BASE/models)"),
    Field("storage.models.raw_dir", "STORAGE_RAW_DIR", "raw", dir_name, "Tier dir of downloads"),
    Field("storage.models.quantized_dir", "STORAGE_QUANTIZED_DIR", "quantized", dir_name, "Tier dir"),
    Field("storage.models.repository_dir", "STORAGE_REPOSITORY_DIR", "repository", dir_name, "Served tier"),
    Field("storage.metrics.path", "STORAGE_METRICS_PATH", None, optional_path, "Prometheus TSDB"),
    Field("storage.grafana.path", "STORAGE_GRAFANA_PATH", None, optional_path, "Grafana data"),
    Field("storage.max_size_gb", "STORAGE_MAX_SIZE_GB", 100.0, number(0, strict_min=True), "Capacity, GB"),
    Field("storage.state_path", "STORAGE_STATE_PATH", None, optional_path, "Plans, journal, lock, state"),
    Field("storage.audit_log", "STORAGE_AUDIT_LOG", None, optional_path, "Hash-chained audit log"),
    Field("exporter.listen", "STORAGE_EXPORTER_LISTEN", "127.0.0.1:8470", listen, "HOST:PORT to serve"),
    Field(
        "exporter.reconcile_interval_seconds",
        "STORAGE_RECONCILE_INTERVAL_SECONDS",
        3600.0,
        number(0),
        "Full reconcile scan interval, 0 = off",
    ),
    Field(
        "exporter.coalesce_window_seconds",
        "STORAGE_COALESCE_WINDOW_SECONDS",
        0.1,
        number(0, 1),
        "Events on one path within this window cost one stat",
    ),
    Field(
        "exporter.settle_seconds",
        "STORAGE_SETTLE_SECONDS",
        0.25,
        number(0, 10),
        "Scan a directory moved within the tree again after this delay",
    ),
    Field("exporter.queue_size", "STORAGE_EVENT_QUEUE_SIZE", 100000, integer(1000), "Event hand-off bound"),
    Field(
        "exporter.poll_interval_seconds",
        "STORAGE_POLL_INTERVAL_SECONDS",
        30.0,
        number(1),
        "Rescan interval where inotify cannot work (NFS, FUSE, no watches left)",
    ),
    Field("exporter.force_polling", "STORAGE_FORCE_POLLING", False, boolean, "Poll even where inotify works"),
    Field("exporter.scan_workers", "STORAGE_SCAN_WORKERS", 0, integer(0), "Scan processes, 0 = one per core"),
    Field(
        "exporter.scrub_stats_per_second",
        "STORAGE_SCRUB_STATS_PER_SECOND",
        2000.0,
        number(0),
        "Scrub budget: lstats per second (a directory's visit counts as 8) re-verifying the index, 0 = off",
    ),
    Field("exporter.tls_cert_file", "STORAGE_TLS_CERT_FILE", None, optional_path, "TLS certificate"),
    Field("exporter.tls_key_file", "STORAGE_TLS_KEY_FILE", None, optional_path, "TLS private key"),
    Field(
        "exporter.cleaner_command",
        "STORAGE_CLEANER_COMMAND",
        "model-storage-cleaner",
        string,
        "Command the API runs for cleanups",
    ),
    Field(
        "exporter.cleanup_timeout_seconds",
        "STORAGE_CLEANUP_TIMEOUT_SECONDS",
        3600.0,
        number(1),
        "Longest an API-triggered cleanup may run",
    ),
    Field(
        "exporter.trusted_proxies",
        "STORAGE_TRUSTED_PROXIES",
        "",
        networks,
        "Reverse proxies whose X-Forwarded-For/-Proto is believed; none by default",
    ),
    Field(
        "exporter.http_max_connections",
        "STORAGE_HTTP_MAX_CONNECTIONS",
        2048,
        integer(16),
        "Open HTTP connections; over it, the one waiting longest for a request is closed",
    ),
    Field(
        "exporter.http_request_timeout_seconds",
        "STORAGE_HTTP_REQUEST_TIMEOUT_SECONDS",
        10.0,
        number(0.1, 300),
        "A request's head and body must arrive within this",
    ),
    Field(
        "exporter.http_keepalive_timeout_seconds",
        "STORAGE_HTTP_KEEPALIVE_TIMEOUT_SECONDS",
        5.0,
        number(0.1, 300),
        "An idle kept-alive connection is closed after this",
    ),
    Field("exporter.opens_tracking", "STORAGE_OPENS_TRACKING", True, boolean, "Record when each model was last opened"),
    Field(
        "exporter.opens_save_interval_seconds",
        "STORAGE_OPENS_SAVE_INTERVAL_SECONDS",
        60.0,
        number(1),
        "Last-opened state saved at most this often (and on a clean stop)",
    ),
    Field(
        "exporter.opens_ignore",
        "STORAGE_OPENS_IGNORE",
        "",
        string_list,
        "Globs of tier/model/file paths whose opens are no use",
    ),
    Field(
        "exporter.opens_sweep_models",
        "STORAGE_OPENS_SWEEP_MODELS",
        50,
        integer(0),
        "Opens reaching more models than this within the sweep window are a sweep, not use; 0 = off",
    ),
    Field(
        "exporter.opens_sweep_window_seconds",
        "STORAGE_OPENS_SWEEP_WINDOW_SECONDS",
        60.0,
        number(1, 3600),
        "Sweep window; opens count after it",
    ),
    Field("log.format", "STORAGE_LOG_FORMAT", "auto", choice(LOG_FORMATS), "auto: JSON unless on a TTY"),
    Field("log.level", "STORAGE_LOG_LEVEL", "info", choice(LOG_LEVELS), "Log level"),
    Field("api.admin_tokens", "STORAGE_ADMIN_TOKEN", None, tokens, "Admin token(s)", secret=True),
    Field("api.read_tokens", "STORAGE_READ_TOKEN", None, tokens, "Read token(s)", secret=True),
    Field(
        "api.audit_refusals_per_minute",
        "STORAGE_AUDIT_REFUSALS_PER_MINUTE",
        60,
        integer(0),
        "Refused API requests audited per caller address and minute (the rest counted); 0 = all",
    ),
    Field("cleaner.prometheus.url", "STORAGE_PROMETHEUS_URL", "http://127.0.0.1:9090", string, "Query API"),
    Field(
        "cleaner.prometheus.timeout_seconds",
        "STORAGE_PROMETHEUS_TIMEOUT_SECONDS",
        10.0,
        number(0, strict_min=True),
        "Per-query timeout",
    ),
    Field(
        "cleaner.prometheus.bearer_token",
        "STORAGE_PROMETHEUS_BEARER_TOKEN",
        "",
        optional_secret,
        "Bearer token",
        secret=True,
    ),
    Field("cleaner.prometheus.username", "STORAGE_PROMETHEUS_USERNAME", "", optional_string, "Basic auth"),
    Field(
        "cleaner.prometheus.password",
        "STORAGE_PROMETHEUS_PASSWORD",
        "",
        optional_secret,
        "Basic auth",
        secret=True,
    ),
    Field(
        "cleaner.prometheus.matchers",
        "STORAGE_PROMETHEUS_MATCHERS",
        "",
        matchers,
        "Label matchers added to every selector",
    ),
    Field(
        "cleaner.policies",
        "STORAGE_CLEANUP_POLICIES",
        "age,usage,size",
        subset(POLICIES),
        "Enabled policies",
    ),
    Field("cleaner.age_days", "STORAGE_CLEANUP_AGE_DAYS", 30.0, number(0, strict_min=True), "Age policy"),
    Field("cleaner.age_tiers", "STORAGE_CLEANUP_AGE_TIERS", ",".join(TIERS), subset(TIERS), "Age tiers"),
    Field("cleaner.min_requests", "STORAGE_MIN_REQUESTS", 10.0, number(0), "Usage policy threshold"),
    Field(
        "cleaner.request_timeframe_days",
        "STORAGE_REQUEST_TIMEFRAME_DAYS",
        7.0,
        number(0, strict_min=True),
        "Usage window",
    ),
    Field("cleaner.usage_query", "STORAGE_USAGE_QUERY", DEFAULT_USAGE_QUERY, string, "Usage template"),
    Field("cleaner.usage_label", "STORAGE_USAGE_LABEL", "model", string, "Label naming the model"),
    Field("cleaner.usage_tiers", "STORAGE_USAGE_TIERS", "repository", subset(TIERS), "Usage tiers"),
    Field(
        "cleaner.usage_source",
        "STORAGE_USAGE_SOURCE",
        "requests",
        choice(USAGE_SOURCES),
        "requests|opens|both|auto: what says a model is used",
    ),
    Field(
        "cleaner.max_size_gb",
        "STORAGE_CLEANUP_MAX_SIZE_GB",
        10.0,
        number(0, strict_min=True),
        "Size policy limit, GB",
    ),
    Field("cleaner.size_tiers", "STORAGE_CLEANUP_SIZE_TIERS", ",".join(TIERS), subset(TIERS), "Size tiers"),
    Field(
        "cleaner.low_watermark",
        "STORAGE_CLEANUP_LOW_WATERMARK",
        0.9,
        number(0, 1, strict_min=True),
        "Evict down to this share of the limit",
    ),
    Field("cleaner.grace_hours", "STORAGE_CLEANUP_GRACE_HOURS", 24.0, number(0), "Never touch newer models"),
    Field(
        "cleaner.max_evict_fraction",
        "STORAGE_CLEANUP_MAX_EVICT_FRACTION",
        0.5,
        number(0, 1, strict_min=True),
        "Blast radius: share of bytes per run",
    ),
    Field(
        "cleaner.max_evict_models",
        "STORAGE_CLEANUP_MAX_EVICT_MODELS",
        100,
        integer(1),
        "Blast radius: models per run",
    ),
    Field("cleaner.protect", "STORAGE_CLEANUP_PROTECT", "", string_list, "Globs of tier/model never evicted"),
    Field("cleaner.backup.mode", "STORAGE_BACKUP_MODE", "trash", choice(BACKUP_MODES), "trash|archive|none"),
    Field("cleaner.backup.path", "STORAGE_BACKUP_PATH", None, optional_path, "Archive copies"),
    Field("cleaner.trash.path", "STORAGE_TRASH_PATH", None, optional_path, "Trash (default BASE/trash)"),
    Field("cleaner.trash.retention_days", "STORAGE_TRASH_RETENTION_DAYS", 7.0, trash_limit, "Trash retention"),
    Field("cleaner.trash.max_gb", "STORAGE_TRASH_MAX_GB", 50.0, trash_limit, "Trash cap, oldest purged first"),
)

FIELDS_BY_KEY = {f.key: f for f in FIELDS}


def _parsed_type(f: Field) -> str:
    if f.default is None:
        return "... | None"
    return type(f.parse(f.key, f.default)).__name__


def undeclared() -> list[str]:
    """What keeps `FIELDS` and the typed sections from matching one to one, each with its fix."""
    missing, extra = missing_and_extra([f.key for f in FIELDS])
    problems = [
        f"{key}: no typed attribute; add {where_to_declare(key)} in shared/typed_settings.py, "
        f"typed as its parser returns ({_parsed_type(FIELDS_BY_KEY[key])})"
        for key in missing
    ]
    return problems + [f"{key}: a typed attribute with no FIELDS row" for key in extra]


_UNDECLARED = undeclared()
if _UNDECLARED:
    raise TypeError("settings: " + "; ".join(_UNDECLARED) + " (see the top of shared/settings_table.py)")

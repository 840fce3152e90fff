"""The one typed, validated settings object: defaults < YAML file < environment variables.

Every setting is declared once in `FIELDS` with its YAML key, its environment variable, its
default and its parser, so the loader, the `policies` listing and the README's reference agree.
Its type lives in `shared/typed_settings.py`, where the attribute path is the YAML key: code reads
`settings.cleaner.age_days` (a float to mypy), never a string-keyed lookup, and hands inward the
smallest section it needs (`settings.cleaner`, `settings.cleaner.prometheus`, `settings.exporter`).
`settings.sources[key]` says where each value came from (default, file or env) for the listings.

To add a setting (two edits, both one line):
1. a `Field(...)` row in `FIELDS` below (YAML key, variable, default, parser, doc);
2. `name: type` in the class of its section in `shared/typed_settings.py`, named as the last part
   of the key, typed as its parser returns (e.g. `cleaner.usage_source` -> `usage_source: UsageSource` in
   `CleanerSettings`; a `_choice` is a `Literal` alias there). A new section (`exporter.opens.*`)
   is a new frozen class there and one attribute naming it in its parent.
Importing this module fails, naming the key, if a row and an attribute do not match one to one;
building the settings fails if a parser returns another type than the attribute declares.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml

from shared.errors import ConfigError
from shared.layout import Layout
from shared.typed_settings import (
    ApiSettings,
    BackupMode,
    CleanerSettings,
    ExporterSettings,
    LogFormat,
    LogLevel,
    LogSettings,
    Policy,
    StorageSettings,
    Tier,
    UsageSource,
    build,
    missing_and_extra,
    where_to_declare,
)

# Re-exported: older imports of the units from here keep working.
from shared.units import DAY_SECONDS as DAY_SECONDS
from shared.units import GB as GB
from shared.units import HOUR_SECONDS as HOUR_SECONDS

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

Parser = Callable[[str, Any], Any]


def _expect(key: str, value: Any, expected: str) -> ConfigError:
    shown = repr(value) if not isinstance(value, str) else repr(value[:80])
    return ConfigError(f"config: {key}={shown}: expected {expected}")


def _number(minimum: float | None = None, maximum: float | None = None, *, strict_min: bool = False) -> Parser:
    def parse(key: str, value: Any) -> float:
        expected = "a number"
        if minimum is not None:
            expected += f" {'>' if strict_min else '>='} {minimum:g}"
        if maximum is not None:
            expected += f" and <= {maximum:g}"
        if isinstance(value, bool):
            raise _expect(key, value, expected)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _expect(key, value, expected) from None
        if not math.isfinite(number):
            raise _expect(key, value, expected)
        too_small = minimum is not None and (number <= minimum if strict_min else number < minimum)
        if too_small or (maximum is not None and number > maximum):
            raise _expect(key, value, expected)
        return number

    return parse


def _integer(minimum: int = 0) -> Parser:
    def parse(key: str, value: Any) -> int:
        expected = f"a whole number >= {minimum}"
        if isinstance(value, bool):
            raise _expect(key, value, expected)
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                raise _expect(key, value, expected) from None
        if number < minimum:
            raise _expect(key, value, expected)
        return number

    return parse


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise _expect(key, value, "a string")
    return str(value)


def _optional_string(key: str, value: Any) -> str:
    return "" if value is None else _string(key, value)


def _optional_secret(key: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"config: {key}: expected a string (quote it in YAML); the value is not shown")
    return value


def _path(key: str, value: Any) -> Path:
    text = _string(key, value)
    if not text.strip():
        raise _expect(key, value, "a non-empty path")
    return Path(text)


def _optional_path(key: str, value: Any) -> Path | None:
    if value is None or value == "":
        return None
    return _path(key, value)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _expect(key, value, "true or false")


def _choice(choices: Sequence[str]) -> Parser:
    def parse(key: str, value: Any) -> str:
        text = _string(key, value).strip().lower()
        if text not in choices:
            raise _expect(key, value, "one of " + ", ".join(choices))
        return text

    return parse


def _list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list | tuple):
        items = [_string(key, item).strip() for item in value]
    else:
        raise _expect(key, value, "a comma-separated list")
    return tuple(item for item in items if item)


def _networks(key: str, value: Any) -> tuple[str, ...]:
    """Addresses or CIDRs, normalised to networks (`10.0.0.1` -> `10.0.0.1/32`)."""
    networks = []
    for item in _list(key, value):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise _expect(key, value, "IP addresses or CIDRs, comma-separated, e.g. 10.0.0.5,172.18.0.0/16") from None
    return tuple(dict.fromkeys(networks))


def _subset(choices: Sequence[str], *, allow_empty: bool = True) -> Parser:
    def parse(key: str, value: Any) -> tuple[str, ...]:
        items = _list(key, value)
        unknown = [item for item in items if item not in choices]
        if unknown or (not items and not allow_empty):
            raise _expect(key, value, "a comma-separated subset of " + ", ".join(choices))
        return tuple(dict.fromkeys(items))

    return parse


def _dir_name(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise _expect(key, value, "a plain directory name (no '/')")
    return text


def _trash_limit(key: str, value: Any) -> float:
    """Trash retention and cap: 0 would purge each evicted model at once, a silent backup mode `none`."""
    try:
        number: float = _number(0, strict_min=True)(key, value)
    except ConfigError as err:
        raise ConfigError(
            err.message, hint="to delete evicted models directly, choose STORAGE_BACKUP_MODE=none explicitly"
        ) from None
    return number


_LISTEN = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\s]+):(?P<port>\d{1,5})$")


def _listen(key: str, value: Any) -> tuple[str, int]:
    text = _string(key, value).strip()
    match = _LISTEN.match(text)
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise _expect(key, value, "HOST:PORT, e.g. 127.0.0.1:8470")
    return match["host"].strip("[]"), int(match["port"])


_MATCHER = re.compile(r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*')


def _matchers(key: str, value: Any) -> str:
    """Extra label matchers added to every selector: `name="value",name2=~"re"`."""
    text = _optional_string(key, value).strip().strip("{}").strip()
    if not text:
        return ""
    position = 0
    while position < len(text):
        match = _MATCHER.match(text, position)
        if not match:
            raise _expect(key, value, 'label matchers like instance="host:8470",job="models"')
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise _expect(key, value, 'label matchers like instance="host:8470",job="models"')
            position += 1
    return text


TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_TOKEN_CHARS = 16
# `name=TOKEN`, the form before named tokens took `name:`: an `=` followed by something other
# than `=`. Base64 padding (`=` only at the end) is not it, so generator output reads as a token.
_OLD_NAMED_FORM = re.compile(r"=[^=]")
_TOKEN_FORMS = "TOKEN or NAME:TOKEN, comma-separated"  # noqa: S105 - the syntax, not a secret


def _token_error(key: str, where: str, problem: str, hint: str = "") -> ConfigError:
    # Never any part of the value: this message reaches stderr and the logs. Items are named by position.
    return ConfigError(f"config: {key}: {where}: {problem}", hint=hint)


def _check_token(key: str, where: str, token: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise _token_error(key, where, f"expected a token of at least {MIN_TOKEN_CHARS} characters")
    if any(char.isspace() for char in token):
        raise _token_error(
            key, where, "a token may not contain whitespace", hint="a wrapped base64 line? generate with base64 -w0"
        )


def _token_item(key: str, where: str, item: str, default_name: str) -> tuple[str, str]:
    """One list item: a bare token (named `default_name`) or `NAME:TOKEN`."""
    name, colon, token = item.partition(":")
    if not colon:
        if _OLD_NAMED_FORM.search(item):
            raise _token_error(
                key,
                where,
                "the form NAME=TOKEN is no longer read (an = inside a token is ambiguous)",
                hint=f"write NAME:TOKEN instead (a colon); tokens are {_TOKEN_FORMS}",
            )
        name, token = default_name, item
    elif not TOKEN_NAME.fullmatch(name):
        raise _token_error(key, where, f"expected {_TOKEN_FORMS}, a NAME of 1-64 of [A-Za-z0-9_.-]")
    if ":" in token:
        raise _token_error(key, where, f"expected {_TOKEN_FORMS}; a token may not contain ':'")
    _check_token(key, where, token)
    return name, token


def _tokens(key: str, value: Any) -> dict[str, str]:
    """`TOKEN` (named `admin`/`read`) or `name:TOKEN,name2:TOKEN2`, or a YAML mapping name -> token.

    Bare tokens are what generators print (base64 with `=` padding, urlsafe base64, hex); a name is
    set apart by `:`, which none of them prints. Errors never show any part of the value.
    """
    default_name = "admin" if "admin" in key.lower() else "read"
    if value is None or value == "":
        return {}
    pairs: dict[str, str] = {}
    if isinstance(value, Mapping):
        for position, (name, token) in enumerate(value.items(), start=1):
            where = f"entry {position} of {len(value)}"
            if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
                raise _token_error(key, where, "expected a name of 1-64 of [A-Za-z0-9_.-]")
            if not isinstance(token, str):
                raise _token_error(key, where, "expected the token as a string (quote it in YAML)")
            _check_token(key, where, token.strip())
            pairs[name] = token.strip()
        return pairs
    if not isinstance(value, str):
        raise _token_error(key, "value", f"expected a string of {_TOKEN_FORMS}, or a mapping of name to token")
    items = [part.strip() for part in value.strip().split(",")]
    bare = 0
    for position, item in enumerate(items, start=1):
        where = f"item {position} of {len(items)}"
        if not item:
            raise _token_error(key, where, f"empty; expected {_TOKEN_FORMS}")
        name, token = _token_item(key, where, item, default_name)
        if ":" not in item:
            # Several bare tokens (a rotation: old,new) are `admin`, `admin-2`, ...
            bare += 1
            name = default_name if bare == 1 else f"{default_name}-{bare}"
        if name in pairs:
            raise _token_error(key, where, "its name is already given to an earlier item; expected one token per name")
        pairs[name] = token
    return pairs


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
    Field("storage.base_path", "STORAGE_BASE_PATH", "./storage", _path, "Root of the store and its state"),
    Field("storage.models.path", "STORAGE_MODELS_PATH", None, _optional_path, "Models (default BASE/models)"),
    Field("storage.models.raw_dir", "STORAGE_RAW_DIR", "raw", _dir_name, "Tier dir of downloads"),
    Field("storage.models.quantized_dir", "STORAGE_QUANTIZED_DIR", "quantized", _dir_name, "Tier dir"),
    Field("storage.models.repository_dir", "STORAGE_REPOSITORY_DIR", "repository", _dir_name, "Served tier"),
    Field("storage.metrics.path", "STORAGE_METRICS_PATH", None, _optional_path, "Prometheus TSDB"),
    Field("storage.grafana.path", "STORAGE_GRAFANA_PATH", None, _optional_path, "Grafana data"),
    Field("storage.max_size_gb", "STORAGE_MAX_SIZE_GB", 100.0, _number(0, strict_min=True), "Capacity, GB"),
    Field("storage.state_path", "STORAGE_STATE_PATH", None, _optional_path, "Plans, journal, lock, state"),
    Field("storage.audit_log", "STORAGE_AUDIT_LOG", None, _optional_path, "Hash-chained audit log"),
    Field("exporter.listen", "STORAGE_EXPORTER_LISTEN", "127.0.0.1:8470", _listen, "HOST:PORT to serve"),
    Field(
        "exporter.reconcile_interval_seconds",
        "STORAGE_RECONCILE_INTERVAL_SECONDS",
        3600.0,
        _number(0),
        "Full reconcile scan interval, 0 = off",
    ),
    Field(
        "exporter.coalesce_window_seconds",
        "STORAGE_COALESCE_WINDOW_SECONDS",
        0.1,
        _number(0, 1),
        "Events on one path within this window cost one stat",
    ),
    Field(
        "exporter.settle_seconds",
        "STORAGE_SETTLE_SECONDS",
        0.25,
        _number(0, 10),
        "Scan a directory moved within the tree again after this delay",
    ),
    Field("exporter.queue_size", "STORAGE_EVENT_QUEUE_SIZE", 100000, _integer(1000), "Event hand-off bound"),
    Field(
        "exporter.poll_interval_seconds",
        "STORAGE_POLL_INTERVAL_SECONDS",
        30.0,
        _number(1),
        "Rescan interval where inotify cannot work (NFS, FUSE, no watches left)",
    ),
    Field("exporter.force_polling", "STORAGE_FORCE_POLLING", False, _bool, "Poll even where inotify works"),
    Field("exporter.scan_workers", "STORAGE_SCAN_WORKERS", 0, _integer(0), "Scan processes, 0 = one per core"),
    Field(
        "exporter.scrub_stats_per_second",
        "STORAGE_SCRUB_STATS_PER_SECOND",
        2000.0,
        _number(0),
        "Scrub budget: lstats per second re-verifying the index against the disk, 0 = off",
    ),
    Field("exporter.tls_cert_file", "STORAGE_TLS_CERT_FILE", None, _optional_path, "TLS certificate"),
    Field("exporter.tls_key_file", "STORAGE_TLS_KEY_FILE", None, _optional_path, "TLS private key"),
    Field(
        "exporter.cleaner_command",
        "STORAGE_CLEANER_COMMAND",
        "model-storage-cleaner",
        _string,
        "Command the API runs for cleanups",
    ),
    Field(
        "exporter.cleanup_timeout_seconds",
        "STORAGE_CLEANUP_TIMEOUT_SECONDS",
        3600.0,
        _number(1),
        "Longest an API-triggered cleanup may run",
    ),
    Field(
        "exporter.trusted_proxies",
        "STORAGE_TRUSTED_PROXIES",
        "",
        _networks,
        "Reverse proxies whose X-Forwarded-For/-Proto is believed; none by default",
    ),
    Field(
        "exporter.http_max_connections",
        "STORAGE_HTTP_MAX_CONNECTIONS",
        2048,
        _integer(16),
        "Open HTTP connections; over it, the one waiting longest for a request is closed",
    ),
    Field(
        "exporter.http_request_timeout_seconds",
        "STORAGE_HTTP_REQUEST_TIMEOUT_SECONDS",
        10.0,
        _number(0.1, 300),
        "A request's head and body must arrive within this",
    ),
    Field(
        "exporter.http_keepalive_timeout_seconds",
        "STORAGE_HTTP_KEEPALIVE_TIMEOUT_SECONDS",
        5.0,
        _number(0.1, 300),
        "An idle kept-alive connection is closed after this",
    ),
    Field("exporter.opens_tracking", "STORAGE_OPENS_TRACKING", True, _bool, "Record when each model was last opened"),
    Field(
        "exporter.opens_save_interval_seconds",
        "STORAGE_OPENS_SAVE_INTERVAL_SECONDS",
        60.0,
        _number(1),
        "Last-opened state saved at most this often (and on a clean stop)",
    ),
    Field(
        "exporter.opens_ignore",
        "STORAGE_OPENS_IGNORE",
        "",
        _list,
        "Globs of tier/model/file paths whose opens are no use",
    ),
    Field(
        "exporter.opens_sweep_models",
        "STORAGE_OPENS_SWEEP_MODELS",
        50,
        _integer(0),
        "Opens reaching more models than this within the sweep window are a sweep, not use; 0 = off",
    ),
    Field(
        "exporter.opens_sweep_window_seconds",
        "STORAGE_OPENS_SWEEP_WINDOW_SECONDS",
        60.0,
        _number(1, 3600),
        "Sweep window; opens count after it",
    ),
    Field("log.format", "STORAGE_LOG_FORMAT", "auto", _choice(LOG_FORMATS), "auto: JSON unless on a TTY"),
    Field("log.level", "STORAGE_LOG_LEVEL", "info", _choice(LOG_LEVELS), "Log level"),
    Field("api.admin_tokens", "STORAGE_ADMIN_TOKEN", None, _tokens, "Admin token(s)", secret=True),
    Field("api.read_tokens", "STORAGE_READ_TOKEN", None, _tokens, "Read token(s)", secret=True),
    Field(
        "api.audit_refusals_per_minute",
        "STORAGE_AUDIT_REFUSALS_PER_MINUTE",
        60,
        _integer(0),
        "Refused API requests audited per caller address and minute (the rest counted); 0 = all",
    ),
    Field("cleaner.prometheus.url", "STORAGE_PROMETHEUS_URL", "http://127.0.0.1:9090", _string, "Query API"),
    Field(
        "cleaner.prometheus.timeout_seconds",
        "STORAGE_PROMETHEUS_TIMEOUT_SECONDS",
        10.0,
        _number(0, strict_min=True),
        "Per-query timeout",
    ),
    Field(
        "cleaner.prometheus.bearer_token",
        "STORAGE_PROMETHEUS_BEARER_TOKEN",
        "",
        _optional_secret,
        "Bearer token",
        secret=True,
    ),
    Field("cleaner.prometheus.username", "STORAGE_PROMETHEUS_USERNAME", "", _optional_string, "Basic auth"),
    Field(
        "cleaner.prometheus.password",
        "STORAGE_PROMETHEUS_PASSWORD",
        "",
        _optional_secret,
        "Basic auth",
        secret=True,
    ),
    Field(
        "cleaner.prometheus.matchers",
        "STORAGE_PROMETHEUS_MATCHERS",
        "",
        _matchers,
        "Label matchers added to every selector",
    ),
    Field(
        "cleaner.policies",
        "STORAGE_CLEANUP_POLICIES",
        "age,usage,size",
        _subset(POLICIES),
        "Enabled policies",
    ),
    Field("cleaner.age_days", "STORAGE_CLEANUP_AGE_DAYS", 30.0, _number(0, strict_min=True), "Age policy"),
    Field("cleaner.age_tiers", "STORAGE_CLEANUP_AGE_TIERS", ",".join(TIERS), _subset(TIERS), "Age tiers"),
    Field("cleaner.min_requests", "STORAGE_MIN_REQUESTS", 10.0, _number(0), "Usage policy threshold"),
    Field(
        "cleaner.request_timeframe_days",
        "STORAGE_REQUEST_TIMEFRAME_DAYS",
        7.0,
        _number(0, strict_min=True),
        "Usage window",
    ),
    Field("cleaner.usage_query", "STORAGE_USAGE_QUERY", DEFAULT_USAGE_QUERY, _string, "Usage template"),
    Field("cleaner.usage_label", "STORAGE_USAGE_LABEL", "model", _string, "Label naming the model"),
    Field("cleaner.usage_tiers", "STORAGE_USAGE_TIERS", "repository", _subset(TIERS), "Usage tiers"),
    Field(
        "cleaner.usage_source",
        "STORAGE_USAGE_SOURCE",
        "requests",
        _choice(USAGE_SOURCES),
        "requests|opens|both|auto: what says a model is used",
    ),
    Field(
        "cleaner.max_size_gb",
        "STORAGE_CLEANUP_MAX_SIZE_GB",
        10.0,
        _number(0, strict_min=True),
        "Size policy limit, GB",
    ),
    Field("cleaner.size_tiers", "STORAGE_CLEANUP_SIZE_TIERS", ",".join(TIERS), _subset(TIERS), "Size tiers"),
    Field(
        "cleaner.low_watermark",
        "STORAGE_CLEANUP_LOW_WATERMARK",
        0.9,
        _number(0, 1, strict_min=True),
        "Evict down to this share of the limit",
    ),
    Field("cleaner.grace_hours", "STORAGE_CLEANUP_GRACE_HOURS", 24.0, _number(0), "Never touch newer models"),
    Field(
        "cleaner.max_evict_fraction",
        "STORAGE_CLEANUP_MAX_EVICT_FRACTION",
        0.5,
        _number(0, 1, strict_min=True),
        "Blast radius: share of bytes per run",
    ),
    Field(
        "cleaner.max_evict_models",
        "STORAGE_CLEANUP_MAX_EVICT_MODELS",
        100,
        _integer(1),
        "Blast radius: models per run",
    ),
    Field("cleaner.protect", "STORAGE_CLEANUP_PROTECT", "", _list, "Globs of tier/model never evicted"),
    Field("cleaner.backup.mode", "STORAGE_BACKUP_MODE", "trash", _choice(BACKUP_MODES), "trash|archive|none"),
    Field("cleaner.backup.path", "STORAGE_BACKUP_PATH", None, _optional_path, "Archive copies"),
    Field("cleaner.trash.path", "STORAGE_TRASH_PATH", None, _optional_path, "Trash (default BASE/trash)"),
    Field("cleaner.trash.retention_days", "STORAGE_TRASH_RETENTION_DAYS", 7.0, _trash_limit, "Trash retention"),
    Field("cleaner.trash.max_gb", "STORAGE_TRASH_MAX_GB", 50.0, _trash_limit, "Trash cap, oldest purged first"),
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
    raise TypeError("settings: " + "; ".join(_UNDECLARED) + " (see the top of shared/config.py)")


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
        raise ConfigError(f"config: {path}: unknown key {unknown[0]!r}", hint="see the README's reference")
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

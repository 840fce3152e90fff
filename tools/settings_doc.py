"""docs/configuration.md's settings reference, generated from the settings table (`FIELDS`).

`python -m tools.settings_doc` (`make docs`) rewrites the part of docs/configuration.md between
`<!-- generated: settings reference -->` and `<!-- end -->`; the prose around it is written by
hand. `tests/test_readme.py` asserts the committed file equals `render()`'s output, so a setting
added to the table without `make docs` fails the suite.

Invariants: one row per `FIELDS` entry, in table order; the key, variable, default and type come
from the table and `shared/typed_settings.py` (never typed here); `NOTES` and `DERIVED` only add
words to keys that exist (a test checks it). A secret's variable is shown with its `_FILE` twin.
"""

# The notes are prose table rows: one row a line reads and diffs better than wrapped strings.
# ruff: noqa: E501

from __future__ import annotations

import re
import sys
from pathlib import Path

from shared.exit_codes import ExitCode
from shared.settings_table import FIELDS, Field
from shared.typed_settings import declared_keys

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN = "<!-- generated: settings reference (make docs; tools/settings_doc.py) -->"
END = "<!-- end -->"

# Defaults that are a place under STORAGE_BASE_PATH (shared/config.py, Settings._derived).
DERIVED: dict[str, str] = {
    "storage.models.path": "BASE/models",
    "storage.metrics.path": "BASE/metrics",
    "storage.grafana.path": "BASE/grafana",
    "storage.state_path": "BASE/state",
    "storage.audit_log": "BASE/audit.log",
    "cleaner.backup.path": "BASE/backup",
    "cleaner.trash.path": "BASE/trash",
}

# A default too long for a table cell, said in words.
SHOWN_DEFAULT: dict[str, str] = {
    "cleaner.usage_query": "Triton's counters, see [Usage](cleaner.md#usage-point-it-at-your-model-server)",
}

# What the reader needs beyond the table's one-line description: limits, consequences, links.
NOTES: dict[str, str] = {
    "storage.base_path": "root of the store and of the project's state",
    "storage.models.path": "the models tree that is watched",
    "storage.models.raw_dir": "directory name of the `raw` tier",
    "storage.models.quantized_dir": "directory name of the `quantized` tier",
    "storage.models.repository_dir": "directory name of the served tier",
    "storage.metrics.path": "Prometheus' TSDB (`wal/`, `chunks/`) in deployments",
    "storage.grafana.path": "Grafana's data in deployments",
    "storage.max_size_gb": "capacity the usage alerts measure against (1 GB = 10^9 bytes)",
    "storage.state_path": "plans, journal, lock and last-run state of the cleaner; must not lie inside the models path",
    "storage.audit_log": "the hash-chained audit log; must not lie inside the models path",
    "exporter.listen": "address to serve (`--listen`); other addresses are an explicit choice",
    "exporter.reconcile_interval_seconds": "full reconcile scan interval, 0 = off",
    "exporter.coalesce_window_seconds": "events on one path within this window cost one `lstat` (0 to 1)",
    "exporter.settle_seconds": "a directory moved within the tree is scanned again after this delay",
    "exporter.queue_size": "bound of the event hand-off, in events; beyond it, a rescan",
    "exporter.poll_interval_seconds": "rescan interval where inotify cannot work",
    "exporter.force_polling": "poll even where inotify works",
    "exporter.scan_workers": "scan processes, 0 = one per core, 1 = in-process",
    "exporter.scrub_stats_per_second": "the scrub's budget: `lstat`s per second re-verifying the index against the disk (a directory's own visit counts as 8), 0 = off (see [The exporter](metrics.md#the-exporter))",
    "exporter.tls_cert_file": "TLS certificate (with the key)",
    "exporter.tls_key_file": "TLS private key",
    "exporter.cleaner_command": "the command the API runs for cleanups",
    "exporter.cleanup_timeout_seconds": "longest an API-triggered cleanup may run",
    "exporter.trusted_proxies": "reverse proxies (addresses or CIDRs, comma-separated) whose `X-Forwarded-For`/`-Proto` is believed; by default none is (see [Behind a reverse proxy](api.md#behind-a-reverse-proxy))",
    "exporter.http_max_connections": "open HTTP connections at most; over it, the one waiting longest for a request is closed (lowered, with a warning, to fit the open-files limit)",
    "exporter.http_request_timeout_seconds": "a request's head and body must arrive within this, or the connection is closed (`408` for a body)",
    "exporter.http_keepalive_timeout_seconds": "an idle kept-alive connection is closed after this",
    "exporter.opens_tracking": "record when each model was last opened (see [Last opened](metrics.md#last-opened))",
    "exporter.opens_save_interval_seconds": "the last-opened state file is replaced at most this often (and on a clean stop)",
    "exporter.opens_ignore": "globs of `tier/model/file` paths (relative to the models path) whose opens are no use",
    "exporter.opens_sweep_models": "opens reaching more models than this within the sweep window are a sweep (a backup), not use; 0 = off",
    "exporter.opens_sweep_window_seconds": "the sweep window; an open counts once it has passed without a sweep",
    "log.format": "`json`, `console`, or `auto` (JSON unless on a terminal)",
    "log.level": "`debug`, `info`, `warning`, `error`",
    "api.admin_tokens": "admin token(s), comma-separated: `TOKEN` (named `admin`) or `name:TOKEN`; see [Tokens](api.md#tokens)",
    "api.read_tokens": "read token(s), same form (single one named `read`)",
    "api.audit_refusals_per_minute": "refused API requests (`401`, `403`) audited per caller address and minute, the rest counted; `0` = all (see [Audit](api.md#audit))",
    "cleaner.prometheus.url": "Prometheus-compatible query API",
    "cleaner.prometheus.timeout_seconds": "per-query timeout",
    "cleaner.prometheus.bearer_token": "bearer token for Prometheus",
    "cleaner.prometheus.username": "basic auth user",
    "cleaner.prometheus.password": "basic auth password",
    "cleaner.prometheus.matchers": 'label matchers added to every selector, e.g. `instance="a:8470"`',
    "cleaner.policies": "enabled policies",
    "cleaner.age_days": "age policy: evict models unchanged for longer (fractions allowed)",
    "cleaner.age_tiers": "tiers the age policy applies to",
    "cleaner.min_requests": "usage policy: fewer requests than this in the timeframe is unused",
    "cleaner.request_timeframe_days": "usage window",
    "cleaner.usage_query": "PromQL template with `$window` and `$matchers`",
    "cleaner.usage_label": "label of the usage query that names the model",
    "cleaner.usage_tiers": "tiers the usage policy applies to",
    "cleaner.usage_source": "what says a model is used: `requests`, `opens`, `both` or `auto` (see [Last opened](metrics.md#last-opened))",
    "cleaner.max_size_gb": "size policy: keep the models' total under this",
    "cleaner.size_tiers": "tiers the size policy counts and evicts from",
    "cleaner.low_watermark": "size policy evicts down to this share of the limit",
    "cleaner.grace_hours": "models changed more recently are never planned",
    "cleaner.max_evict_fraction": "blast radius: at most this share of the models' bytes per run",
    "cleaner.max_evict_models": "blast radius: at most this many models per run",
    "cleaner.protect": "globs over `tier/model` never evicted (comma-separated, or a YAML list)",
    "cleaner.backup.mode": "`trash` (move, restorable), `archive` (verified copy, then delete), `none`",
    "cleaner.backup.path": "where `archive` mode copies to; must neither lie inside the models path nor contain it, nor overlap the trash (which purge empties)",
    "cleaner.trash.path": "trash; must neither lie inside the models path nor contain it",
    "cleaner.trash.retention_days": "trash entries older than this are purged; > 0 (to delete directly, choose backup mode `none`)",
    "cleaner.trash.max_gb": "trash cap: oldest runs purged first beyond it, never the run that is ending; > 0",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def type_name(hint: object) -> str:
    """A declared type as a reader wants it: `float`, `Path | None`, `tuple[str, ...]`."""
    shown = hint.__name__ if isinstance(hint, type) else str(hint)
    return re.sub(r"\b(?:typing|pathlib|collections\.abc)\.", "", shown)


def default_text(field: Field) -> str:
    if field.key in SHOWN_DEFAULT:
        return SHOWN_DEFAULT[field.key]
    if field.key in DERIVED:
        return f"*{DERIVED[field.key]}*"
    value = field.default
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def variable_text(field: Field) -> str:
    return f"`{field.env}` (or `{field.env}_FILE`)" if field.secret else f"`{field.env}`"


def render() -> str:
    """The generated block, markers included."""
    types = declared_keys()
    rows = [
        "| YAML key | environment variable | default | type | description | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for field in FIELDS:
        cells = (
            f"`{field.key}`",
            variable_text(field),
            default_text(field),
            f"`{_cell(type_name(types[field.key]))}`",
            _cell(field.doc),
            NOTES.get(field.key, ""),
        )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([BEGIN, *rows, END])


def rewritten(text: str) -> str:
    """`text` with its generated block replaced by `render()`'s."""
    start, end = text.index(BEGIN), text.index(END, text.index(BEGIN))
    return text[:start] + render() + text[end + len(END) :]


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    new = rewritten(text)
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"{DOC.name}: settings reference regenerated")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

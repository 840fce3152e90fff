"""The storage API under /storage/*: figures, reconcile, cleanup through the cleaner; its OpenAPI document.

Decisions (query parsing, the info document, who may call what) are pure functions; the route
handlers only read the request, run blocking work in a worker thread and write the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import html
import json
import queue
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from exporter.api.auth import Caller, Need, TokenBook, authorize
from exporter.api.cleanup_runner import Answer, BusyError, CleanupRunner, error_body, interpret_policies, interpret_run
from exporter.api.refusals import RefusalThrottle
from exporter.index.fsinfo import FsUsage
from exporter.index.scan import ScanFailedError
from exporter.index.status import ReconcileResult, Snapshot
from shared.audit import AuditLog
from shared.cleanup_state import CleanupState
from shared.logs import FAILURE, get_logger
from shared.names import name_text

log = get_logger("exporter.api")

MAX_BODY_BYTES = 1024
TOP_DEFAULT, TOP_MIN, TOP_MAX = 10, 1, 1000
API_VERSION = "1.0.0"


# ----- pure decisions ---------------------------------------------------------------------------


class BadRequestError(Exception):
    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


_DIGITS = re.compile(r"[0-9]{1,7}")


def _one_value(params: Sequence[tuple[str, str]], allowed: Sequence[str]) -> dict[str, str]:
    """The query as name -> value: unknown or repeated parameters are rejected, not ignored."""
    seen: dict[str, str] = {}
    for name, value in params:
        if name not in allowed:
            shown = name[:40]
            expected = ", ".join(allowed) if allowed else "none"
            raise BadRequestError(f"unknown query parameter {shown!r} (this endpoint takes: {expected})")
        if name in seen:
            raise BadRequestError(f"query parameter {name!r} given more than once")
        seen[name] = value
    return seen


def parse_top(params: Sequence[tuple[str, str]]) -> int:
    """`?top=N` of /storage/info, 1..1000, default 10."""
    value = _one_value(params, ("top",)).get("top")
    if value is None:
        return TOP_DEFAULT
    if not _DIGITS.fullmatch(value) or not TOP_MIN <= int(value) <= TOP_MAX:
        raise BadRequestError(f"top={value[:20]!r}: expected a whole number from {TOP_MIN} to {TOP_MAX}")
    return int(value)


def parse_dry_run(params: Sequence[tuple[str, str]]) -> bool:
    """`?dry_run=true|false` of /storage/cleanup; false when absent, as the spec says."""
    value = _one_value(params, ("dry_run",)).get("dry_run")
    if value is None:
        return False
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise BadRequestError(f"dry_run={value[:20]!r}: expected true or false")
    return lowered == "true"


def parse_none(params: Sequence[tuple[str, str]]) -> None:
    _one_value(params, ())


def _ratio(used: int, of: int) -> float | None:
    return round(used / of, 6) if of > 0 else None


def info_document(
    snap: Snapshot,
    *,
    capacity_bytes: int,
    filesystem: FsUsage | None,
    cleanup: CleanupState | None,
    top: int,
    now: float,
) -> dict[str, Any]:
    """What GET /storage/info answers, from one snapshot. Pure."""
    tiers = {
        tier: {"bytes": b, "files": f, "models": m, "allocated_bytes": snap.allocated.get(tier, 0)}
        for tier, (b, f, m) in sorted(snap.tiers.items())
    }
    total = {key: sum(t[key] for t in tiers.values()) for key in ("bytes", "files", "models", "allocated_bytes")}
    largest = heapq.nsmallest(top, snap.models, key=lambda s: (-s.bytes, s.tier, s.model))
    fs: dict[str, Any] | None = None
    if filesystem is not None:
        fs = {
            "size_bytes": filesystem.size_bytes,
            "avail_bytes": filesystem.avail_bytes,
            "usage_ratio": _ratio(filesystem.size_bytes - filesystem.avail_bytes, filesystem.size_bytes),
        }
    return {
        "tiers": tiers,
        "total": total,
        "capacity_bytes": capacity_bytes,
        # Capacity is what fills the disk: allocated bytes. The apparent figure is given beside it.
        "usage_ratio": _ratio(total["allocated_bytes"], capacity_bytes),
        "apparent_usage_ratio": _ratio(total["bytes"], capacity_bytes),
        "filesystem": fs,
        "largest_models": [
            {
                "tier": s.tier,
                "model": name_text(s.model),
                "bytes": s.bytes,
                "allocated_bytes": s.allocated,
                "files": s.files,
                "last_changed": s.changed if s.changed > 0 else None,
            }
            for s in largest
        ],
        "scan": {
            "ready": snap.ready,
            "polling": snap.polling,
            "last_full_scan": snap.last_full_scan if snap.last_full_scan > 0 else None,
            "scan_duration_seconds": round(snap.scan_duration_seconds, 6),
            "drift_bytes": snap.drift_bytes,
            "events_total": snap.events_total,
            "overflows_total": snap.overflows_total,
            "errors_total": dict(sorted(snap.errors_total.items())),
            "watches": snap.watches,
        },
        "cleanup": None if cleanup is None else cleanup.to_json(),
        "generated_at": round(now, 3),
    }


def collect_document(result: ReconcileResult, *, coalesced: bool) -> dict[str, Any]:
    return {
        "seconds": round(result.seconds, 6),
        "drift_bytes": result.drift_bytes,
        "drift_models": result.drift_models,
        "files": result.files,
        "coalesced": coalesced,
    }


# ----- the OpenAPI document ---------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_COUNT = {"type": "integer", "minimum": 0}
_NUMBER = {"type": "number"}
_RATIO = _nullable({"type": "number", "minimum": 0})

_ERRORS = {
    400: "Bad input: an unknown or repeated query parameter, or a value of the wrong type or range",
    401: "Missing or invalid bearer token (which part was wrong is not said)",
    403: "The token may not do this, or admin operations are disabled (no admin token configured)",
    409: "A cleanup is already running; `error.holder` names it",
    408: "A request body announced but not received within the request timeout",
    413: "A request body (these endpoints take none) over 1 KiB",
    502: "The cleaner failed (exit code 1) or printed no report",
    503: "The cleaner could not run or finish: Prometheus unreachable, configuration rejected, the command "
    "missing, or the filesystem refused an operation (no space, read-only)",
    504: "The operation did not finish within its timeout",
}


def _error_responses(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        for code in codes
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


READ_SECURITY: list[dict[str, list[str]]] = [{}, {"bearerAuth": []}]
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "exit_code": {"type": "integer"},
                    "holder": _ref("Holder"),
                },
            }
        },
    },
    "Holder": {
        "type": "object",
        "required": ["source", "pid"],
        "properties": {
            "source": {"type": "string", "enum": ["api", "cleaner_lock"]},
            "pid": _nullable({"type": "integer"}),
            "actor": _nullable({"type": "string"}),
            "started_at": _nullable(_NUMBER),
            "dry_run": _nullable({"type": "boolean"}),
        },
    },
    "Counts": {
        "type": "object",
        "required": ["bytes", "files", "models", "allocated_bytes"],
        "properties": {
            "bytes": {**_COUNT, "description": "Apparent size (st_size), hard links once"},
            "files": _COUNT,
            "models": _COUNT,
            "allocated_bytes": {**_COUNT, "description": "Allocated size (512 * st_blocks), hard links once"},
        },
    },
    "Model": {
        "type": "object",
        "required": ["tier", "model", "bytes", "allocated_bytes", "files", "last_changed"],
        "properties": {
            "tier": {"type": "string"},
            "model": {"type": "string"},
            "bytes": {**_COUNT, "description": "Apparent size (st_size)"},
            "allocated_bytes": {**_COUNT, "description": "Allocated size (512 * st_blocks)"},
            "files": _COUNT,
            "last_changed": _nullable(_NUMBER),
        },
    },
    "CleanupState": {
        "type": "object",
        "description": "The cleaner's last run (its state file); evicted_* are cumulative over runs",
        "required": ["timestamp", "success", "run_id", "exit_code"],
        "properties": {
            "schema_version": {"type": "integer"},
            "timestamp": _NUMBER,
            "success": {"type": "boolean"},
            "run_id": {"type": "string"},
            "exit_code": {"type": "integer"},
            "error": _nullable({"type": "string"}),
            "evicted_bytes_total": {"type": "object", "additionalProperties": _COUNT},
            "evicted_models_total": {"type": "object", "additionalProperties": _COUNT},
            "skipped": {"type": "object", "additionalProperties": _COUNT},
            "trash_bytes": _COUNT,
            "usage_blind": {"type": "boolean"},
        },
    },
    "Info": {
        "type": "object",
        "required": [
            "tiers",
            "total",
            "capacity_bytes",
            "usage_ratio",
            "apparent_usage_ratio",
            "filesystem",
            "largest_models",
            "scan",
            "cleanup",
            "generated_at",
        ],
        "properties": {
            "tiers": {
                "type": "object",
                "description": "raw, quantized, repository and other (files outside the three tiers)",
                "additionalProperties": _ref("Counts"),
            },
            "total": _ref("Counts"),
            "capacity_bytes": _COUNT,
            "usage_ratio": {
                **_RATIO,
                "description": "Allocated bytes over capacity_bytes (what fills the disk); null without a capacity",
            },
            "apparent_usage_ratio": {
                **_RATIO,
                "description": "Apparent bytes over capacity_bytes (sparse files at their full length)",
            },
            "filesystem": _nullable(
                {
                    "type": "object",
                    "required": ["size_bytes", "avail_bytes", "usage_ratio"],
                    "properties": {"size_bytes": _COUNT, "avail_bytes": _COUNT, "usage_ratio": _RATIO},
                }
            ),
            "largest_models": {"type": "array", "items": _ref("Model"), "maxItems": TOP_MAX},
            "scan": {
                "type": "object",
                "required": [
                    "ready",
                    "polling",
                    "last_full_scan",
                    "scan_duration_seconds",
                    "drift_bytes",
                    "events_total",
                    "overflows_total",
                    "errors_total",
                    "watches",
                ],
                "properties": {
                    "ready": {"type": "boolean"},
                    "polling": {"type": "boolean"},
                    "last_full_scan": _nullable(_NUMBER),
                    "scan_duration_seconds": {"type": "number", "minimum": 0},
                    "drift_bytes": _COUNT,
                    "events_total": _COUNT,
                    "overflows_total": _COUNT,
                    "errors_total": {"type": "object", "additionalProperties": _COUNT},
                    "watches": _COUNT,
                },
            },
            "cleanup": _nullable(_ref("CleanupState")),
            "generated_at": _NUMBER,
        },
    },
    "CollectResult": {
        "type": "object",
        "required": ["seconds", "drift_bytes", "drift_models", "files", "coalesced"],
        "properties": {
            "seconds": {"type": "number", "minimum": 0},
            "drift_bytes": _COUNT,
            "drift_models": _COUNT,
            "files": _COUNT,
            "coalesced": {
                "type": "boolean",
                "description": "true when a scan that started after this request arrived answered it",
            },
        },
    },
    "CleanupResult": {
        "type": "object",
        "required": ["outcome", "dry_run", "actor", "exit_code", "seconds", "report"],
        "properties": {
            "outcome": {"type": "string", "enum": ["dry_run", "done", "partial"]},
            "dry_run": {"type": "boolean"},
            "actor": {"type": "string"},
            "exit_code": {"type": "integer", "enum": [0, 3]},
            "seconds": {"type": "number", "minimum": 0},
            "report": {
                "type": "object",
                "description": "The cleaner's JSON: the plan for a dry run; for a run, the plan "
                "(`plan`) with `done`, `skipped`, `failed`, `freed_bytes` and `run_id`",
            },
        },
    },
    "Policies": {
        "type": "object",
        "required": ["policies"],
        "description": "`model-storage-cleaner policies --json`: each policy, its settings and their sources",
        "properties": {
            "policies": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "enabled", "settings"],
                    "properties": {
                        "name": {"type": "string"},
                        "enabled": {"type": "boolean"},
                        "description": {"type": "string"},
                        "settings": {"type": "array", "items": _ref("Setting")},
                    },
                },
            },
            "enabled": _ref("Setting"),
            "guards": {"type": "array", "items": _ref("Setting")},
            "prometheus": {"type": "array", "items": _ref("Setting")},
        },
    },
    "Setting": {
        "type": "object",
        "required": ["key", "value", "source"],
        "properties": {
            "key": {"type": "string"},
            "env": {"type": "string"},
            "value": {},
            "source": {"type": "string", "enum": ["default", "file", "env"]},
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}

_NO_BODY_NOTE = " Takes no request body; unknown query parameters are rejected with 400."

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "model-storage exporter",
        "version": API_VERSION,
        "description": "Live storage figures of a model store, its reconcile scan and its cleaner. "
        "GET /storage/* needs a read or admin token when a read token is configured; POST needs an admin "
        "token and answers 403 while none is configured. /metrics, /healthz and /readyz are open. "
        'Every error is JSON: {"error": {"code": ..., "message": ...}}.',
    },
    "components": {
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "STORAGE_ADMIN_TOKEN / STORAGE_READ_TOKEN (or their _FILE variants)",
            }
        },
        "schemas": _SCHEMAS,
    },
    "paths": {
        "/storage/info": {
            "get": {
                "operationId": "getStorageInfo",
                "summary": "Current storage figures",
                "description": "Per-tier apparent and allocated bytes, files and models; total; capacity and "
                "usage ratio (allocated) and apparent usage ratio; filesystem "
                "size and free space; the largest models; scan state; the cleaner's last result." + _NO_BODY_NOTE,
                "security": READ_SECURITY,
                "parameters": [
                    {
                        "name": "top",
                        "in": "query",
                        "required": False,
                        "description": "How many of the largest models to list",
                        "schema": {"type": "integer", "minimum": TOP_MIN, "maximum": TOP_MAX, "default": TOP_DEFAULT},
                    }
                ],
                "responses": {
                    "200": _json("The figures", _ref("Info")),
                    **_error_responses(400, 401, 408, 413),
                },
            }
        },
        "/storage/collect": {
            "post": {
                "operationId": "collect",
                "summary": "Run a full reconcile scan now",
                "description": "Answers when the scan is done, with its duration and the drift it found and "
                "corrected. Requests arriving while one runs are answered by the next scan." + _NO_BODY_NOTE,
                "security": ADMIN_SECURITY,
                "responses": {
                    "200": _json("The scan is done", _ref("CollectResult")),
                    **_error_responses(400, 401, 403, 408, 413),
                    "503": {
                        "description": "The index updater is not running, or the scan failed (a scan "
                        "worker died): nothing was changed, the next scan runs on a new pool",
                        "content": {"application/json": {"schema": _ref("Error")}},
                    },
                    **_error_responses(504),
                },
            }
        },
        "/storage/cleanup": {
            "post": {
                "operationId": "cleanup",
                "summary": "Run the cleaner (model-storage-cleaner run --json)",
                "description": "Runs the same command the timer runs, as a separate process, with "
                "`--actor` set to the token's name. One at a time: a concurrent call gets 409 naming the holder. "
                "200 with the report; 207 when some evictions failed and the rest were done (exit code 3)."
                + _NO_BODY_NOTE,
                "security": ADMIN_SECURITY,
                "parameters": [
                    {
                        "name": "dry_run",
                        "in": "query",
                        "required": False,
                        "description": "Only plan; change nothing",
                        "schema": {"type": "boolean", "default": False},
                    }
                ],
                "responses": {
                    "200": _json("The cleaner's report", _ref("CleanupResult")),
                    "207": _json("Partial: some evictions failed, the rest were done", _ref("CleanupResult")),
                    **_error_responses(400, 401, 403, 408, 409, 413, 502, 503, 504),
                },
            }
        },
        "/storage/cleanup/policies": {
            "get": {
                "operationId": "getCleanupPolicies",
                "summary": "The configured cleanup policies and their effective settings",
                "description": "From `model-storage-cleaner policies --json` (cached for 10 s)." + _NO_BODY_NOTE,
                "security": READ_SECURITY,
                "responses": {
                    "200": _json("The policies", _ref("Policies")),
                    **_error_responses(400, 401, 408, 413, 502, 503, 504),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus exposition",
                "security": [{}],
                "responses": {
                    "200": {
                        "description": "The series (see shared/metric_names.py)",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "getHealth",
                "summary": "Liveness: the index updater thread runs",
                "security": [{}],
                "responses": {
                    "200": _json("Alive", _ref("Status")),
                    "503": _json("The updater stopped", _ref("Status")),
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "getReady",
                "summary": "Readiness: the initial scan is done and the index is kept current",
                "security": [{}],
                "responses": {
                    "200": _json("Ready", _ref("Status")),
                    "503": _json(
                        "Still scanning (`scanning`), or the index can no longer be kept current "
                        "(`updater stopped`, `watcher stopped`)",
                        _ref("Status"),
                    ),
                },
            }
        },
    },
}


# The docs page's only script: each operation's form sends its request with the token typed at the
# top (kept in the page, never stored) and shows the answer. Served under a CSP that allows exactly
# this script and style by hash and connections to this origin only.
DOCS_SCRIPT = """
for (const form of document.querySelectorAll("form.try")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const field of form.querySelectorAll("input[data-param]")) {
      if (field.value !== "") query.append(field.dataset.param, field.value);
    }
    const headers = {};
    const token = document.getElementById("token").value.trim();
    if (token !== "") headers["Authorization"] = "Bearer " + token;
    const out = form.querySelector("output");
    out.textContent = "...";
    const url = form.dataset.path + (query.toString() ? "?" + query : "");
    try {
      const response = await fetch(url, {method: form.dataset.method, headers});
      const text = await response.text();
      let body = text;
      try { body = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON: as is */ }
      out.textContent = response.status + " " + response.statusText + "\\n" + body;
    } catch (error) {
      out.textContent = String(error);
    }
  });
}
"""
DOCS_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:auto}section{border-top:1px solid #ccc}"
    "pre,output{display:block;white-space:pre-wrap;background:#f4f4f4;padding:1em;overflow:auto}"
    "form.try{margin:.5em 0}form.try label{margin-right:1em}"
)


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


DOCS_CSP = (
    f"default-src 'none'; script-src {_csp_hash(DOCS_SCRIPT)}; style-src {_csp_hash(DOCS_STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _try_form(method: str, path: str, parameters: Sequence[Mapping[str, Any]]) -> str:
    fields = "".join(
        f"<label>{html.escape(p['name'])} <input data-param='{html.escape(p['name'])}' "
        f"placeholder='{html.escape(str(p['schema'].get('default', '')))}'></label>"
        for p in parameters
    )
    return (
        f"<form class='try' data-method='{method.upper()}' data-path='{html.escape(path)}'>"
        f"{fields}<button type='submit'>Send {method.upper()} {html.escape(path)}</button><output></output></form>"
    )


def docs_page(spec: Mapping[str, Any]) -> str:
    """A self-contained HTML page describing every operation, each with a form that tries it."""
    rows: list[str] = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            security = op.get("security", [])
            if security == ADMIN_SECURITY:
                access = "admin token"
            elif security == READ_SECURITY:
                access = "read or admin token, when a read token is configured"
            else:
                access = "open"
            params = ", ".join(
                f"<code>{html.escape(p['name'])}</code> ({html.escape(json.dumps(p['schema']))})"
                for p in op.get("parameters", [])
            )
            responses = ", ".join(
                f"<b>{code}</b> {html.escape(r['description'])}" for code, r in op["responses"].items()
            )
            rows.append(
                f"<section><h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                f"<p>{html.escape(op['summary'])}. {html.escape(op.get('description', ''))}</p>"
                f"<p>Access: {access}.</p>"
                + (f"<p>Query parameters: {params}</p>" if params else "")
                + f"<p>Responses: {responses}</p>"
                + _try_form(method, path, op.get("parameters", []))
                + "</section>"
            )
    schemas = html.escape(json.dumps(spec["components"]["schemas"], indent=2))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(spec['info']['title'])} API</title>"
        f"<style>{DOCS_STYLE}</style></head><body>"
        f"<h1>{html.escape(spec['info']['title'])} API {html.escape(spec['info']['version'])}</h1>"
        f"<p>{html.escape(spec['info']['description'])}</p>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1). Send tokens as "
        "<code>Authorization: Bearer TOKEN</code>, e.g. <code>curl -X POST -H 'Authorization: Bearer $TOKEN' "
        "http://127.0.0.1:8470/storage/cleanup?dry_run=true</code>.</p>"
        "<p><label>Token for the forms below <input id='token' type='password' autocomplete='off'></label> "
        "(sent as a bearer token with each request; kept only in this page). "
        "<b>A POST really runs</b>: <code>/storage/cleanup</code> without <code>dry_run=true</code> evicts "
        "models.</p>"
        + "".join(rows)
        + f"<h2>Schemas</h2><pre>{schemas}</pre><script>{DOCS_SCRIPT}</script></body></html>"
    )


# ----- the shell: routes ------------------------------------------------------------------------


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _answer(answer: Answer) -> JSONResponse:
    return JSONResponse(answer.body, status_code=answer.status)


@dataclass
class StorageApi:
    """Everything the /storage/* routes need, injected so tests can build one over a real service."""

    snapshot: Callable[[], Snapshot]
    reconcile: Callable[[str], ReconcileResult]
    is_alive: Callable[[], bool]
    filesystem: Callable[[], FsUsage | None]
    cleanup_state: Callable[[], CleanupState | None]
    capacity_bytes: int
    tokens: TokenBook
    runner: CleanupRunner
    audit: AuditLog
    clock: Callable[[], float] = time.time
    refusals: RefusalThrottle = field(default_factory=lambda: RefusalThrottle(limit=60))
    request_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        self._collect_lock: asyncio.Lock | None = None
        self._last_collect: tuple[float, ReconcileResult] | None = None  # (monotonic start, result)

    # -- plumbing

    def _audit(self, operation: str, caller: Caller, request: Request, **fields: Any) -> None:
        details = {"remote": request.client.host if request.client else None, "method": request.method}
        details.update(fields.pop("details", {}))
        try:
            self.audit.append(operation, actor=caller.name, details=details, **fields)
        except OSError as err:
            # The request's answer stands; a lost audit line is an operational error to see in logs.
            log.error("api.audit_failed", operation=operation, error=err.strerror or str(err), outcome=FAILURE)

    async def _guard(self, request: Request, need: Need) -> tuple[Caller, Response | None]:
        """Authenticate, authorise and refuse bodies: (caller, None) to go on, or the refusal."""
        caller = self.tokens.identify(request.headers.get("authorization"))
        denial = authorize(self.tokens, caller, need)
        if denial is not None:
            remote = request.client.host if request.client else "unknown"
            verdict = self.refusals.admit(remote, self.clock())
            if verdict.write:
                details: dict[str, Any] = {"status": denial.status}
                if verdict.left_out:
                    details["refusals_not_audited"] = verdict.left_out
                await run_in_threadpool(
                    self._audit,
                    denial.audit_operation,
                    caller,
                    request,
                    target=request.url.path,
                    result="failure",
                    error=denial.message,
                    details=details,
                )
            elif verdict.first_left_out:
                log.warning(
                    "api.refusals_throttled",
                    remote=remote,
                    limit_per_minute=self.refusals.limit,
                    outcome=FAILURE,
                    error="further refused requests from this address are counted, not audited, this minute",
                )
            headers = {"WWW-Authenticate": 'Bearer realm="model-storage"'} if denial.status == 401 else None
            return caller, error_response(denial.status, denial.code, denial.message, headers)
        too_big = await _body_too_large(request, self.request_timeout_seconds)
        if too_big is not None:
            return caller, too_big
        return caller, None

    # -- routes

    async def info(self, request: Request) -> Response:
        _caller, refusal = await self._guard(request, "read")
        if refusal is not None:
            return refusal
        try:
            top = parse_top(request.query_params.multi_items())
        except BadRequestError as err:
            return error_response(err.status, err.code, err.message)
        document = await run_in_threadpool(self._info, top)
        return JSONResponse(document)

    def _info(self, top: int) -> dict[str, Any]:
        return info_document(
            self.snapshot(),
            capacity_bytes=self.capacity_bytes,
            filesystem=self.filesystem(),
            cleanup=self.cleanup_state(),
            top=top,
            now=self.clock(),
        )

    async def collect(self, request: Request) -> Response:
        caller, refusal = await self._guard(request, "admin")
        if refusal is None:
            try:
                parse_none(request.query_params.multi_items())
            except BadRequestError as err:
                refusal = error_response(err.status, err.code, err.message)
        if refusal is not None:
            if refusal.status_code not in (401, 403):
                await self._audit_refusal("api.collect", caller, request, refusal)
            return refusal
        arrived = time.monotonic()
        if self._collect_lock is None:
            self._collect_lock = asyncio.Lock()
        # One scan at a time; a request that waited is answered by a scan that started after it arrived.
        async with self._collect_lock:
            last = self._last_collect
            if last is not None and last[0] >= arrived:
                response = JSONResponse(collect_document(last[1], coalesced=True))
                await run_in_threadpool(
                    self._audit, "api.collect", caller, request, target="reconcile", details={"coalesced": True}
                )
                return response
            if not self.is_alive():
                message = "the index updater is not running; see /healthz and the exporter's log"
                await run_in_threadpool(
                    self._audit, "api.collect", caller, request, target="reconcile", result="failure", error=message
                )
                return error_response(503, "updater_stopped", message)
            started = time.monotonic()
            try:
                result = await run_in_threadpool(self.reconcile, "api")
            except ScanFailedError as err:
                message = str(err)
                await run_in_threadpool(
                    self._audit, "api.collect", caller, request, target="reconcile", result="failure", error=message
                )
                return error_response(503, "scan_failed", message)
            except queue.Empty:
                message = "the reconcile scan did not finish in time; it goes on in the background"
                await run_in_threadpool(
                    self._audit, "api.collect", caller, request, target="reconcile", result="failure", error=message
                )
                return error_response(504, "collect_timeout", message)
            self._last_collect = (started, result)
        document = collect_document(result, coalesced=False)
        await run_in_threadpool(
            self._audit,
            "api.collect",
            caller,
            request,
            target="reconcile",
            bytes=result.drift_bytes,
            details={k: v for k, v in document.items() if k != "coalesced"},
        )
        return JSONResponse(document)

    async def _audit_refusal(self, operation: str, caller: Caller, request: Request, refusal: Response) -> None:
        message = json.loads(bytes(refusal.body))["error"]["message"]
        await run_in_threadpool(
            self._audit,
            operation,
            caller,
            request,
            target=request.url.path,
            result="failure",
            error=message,
            details={"status": refusal.status_code},
        )

    async def cleanup(self, request: Request) -> Response:
        caller, refusal = await self._guard(request, "admin")
        dry_run = False
        if refusal is None:
            try:
                dry_run = parse_dry_run(request.query_params.multi_items())
            except BadRequestError as err:
                refusal = error_response(err.status, err.code, err.message)
        if refusal is not None:
            if refusal.status_code not in (401, 403):
                await self._audit_refusal("api.cleanup", caller, request, refusal)
            return refusal
        answer = await run_in_threadpool(self._cleanup, caller, dry_run)
        report = answer.body.get("report") or {}
        details: dict[str, Any] = {"dry_run": dry_run, "status": answer.status}
        for key in ("run_id", "plan_id", "exit_code"):
            if key in report:
                details[key] = report[key]
        if "error" in answer.body:
            details.update({k: v for k, v in answer.body["error"].items() if k in ("code", "exit_code", "holder")})
        await run_in_threadpool(
            self._audit,
            "api.cleanup",
            caller,
            request,
            target="dry_run" if dry_run else "run",
            result=answer.result,
            bytes=report.get("freed_bytes") if isinstance(report.get("freed_bytes"), int) else None,
            error=answer.error,
            details=details,
        )
        return _answer(answer)

    def _cleanup(self, caller: Caller, dry_run: bool) -> Answer:
        try:
            result = self.runner.run(caller.name, dry_run)
        except BusyError as busy:
            message = f"a cleanup is already running (started by {busy.holder.actor or 'this API'})"
            return Answer(
                409,
                error_body("cleanup_running", message, holder=busy.holder.to_json()),
                result="failure",
                error=message,
            )
        return interpret_run(result, dry_run=dry_run, actor=caller.name)

    async def policies(self, request: Request) -> Response:
        _caller, refusal = await self._guard(request, "read")
        if refusal is not None:
            return refusal
        try:
            parse_none(request.query_params.multi_items())
        except BadRequestError as err:
            return error_response(err.status, err.code, err.message)
        result = await run_in_threadpool(self.runner.policies)
        return _answer(interpret_policies(result))

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/storage/info", self.info, methods=["GET"]),
            Route("/storage/collect", self.collect, methods=["POST"]),
            Route("/storage/cleanup", self.cleanup, methods=["POST"]),
            Route("/storage/cleanup/policies", self.policies, methods=["GET"]),
        ]


async def _body_too_large(request: Request, timeout: float) -> Response | None:
    """These endpoints take no body: more than MAX_BODY_BYTES is refused without reading it all,
    and a body announced but not sent within `timeout` seconds is a 408, not a held connection."""
    declared = request.headers.get("content-length")
    message = f"request body over {MAX_BODY_BYTES} bytes; these endpoints take no body"
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_BODY_BYTES:
        return error_response(413, "body_too_large", message)
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return error_response(413, "body_too_large", message)
    except TimeoutError:
        return error_response(408, "request_timeout", f"the request body did not arrive within {timeout:g} s")
    except ClientDisconnect:
        return error_response(400, "client_disconnected", "the client closed the connection mid-request")
    return None


def docs_routes() -> list[BaseRoute]:
    page = docs_page(OPENAPI)

    def openapi(_request: Request) -> Response:
        return JSONResponse(OPENAPI)

    def docs(_request: Request) -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": DOCS_CSP})

    return [Route("/openapi.json", openapi, methods=["GET"]), Route("/docs", docs, methods=["GET"])]

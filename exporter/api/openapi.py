"""The storage API's OpenAPI 3.1 document, served at /openapi.json and rendered by /docs. Pure data.

Invariants:
- The /storage/* routes (exporter/api/routes.py) and /metrics, /healthz, /readyz (exporter/api/server.py)
  are described with their query parameters, security (READ_SECURITY or ADMIN_SECURITY) and statuses;
  /, /docs and this document itself are not operations of the API. tests/test_api_fuzz.py drives the
  live server from this document.
- The `top` limits are documents.TOP_*, the ones the parser enforces, not restated by hand.
"""

from __future__ import annotations

from typing import Any

from exporter.api.documents import TOP_DEFAULT, TOP_MAX, TOP_MIN

API_VERSION = "1.0.0"


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

"""The storage API under /storage/*, /openapi.json and /docs: the Starlette route handlers.

Handlers only read the request, run blocking work in a worker thread and write the audit log.
Decisions are pure and live elsewhere: query parsing and the answers in exporter/api/documents.py,
who may call what in exporter/api/auth.py, the OpenAPI document in exporter/api/openapi.py, the
/docs page in exporter/api/docs_page.py.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from exporter.api.auth import Caller, Need, TokenBook, authorize
from exporter.api.cleanup_answers import Answer, BusyError, interpret_policies, interpret_run
from exporter.api.cleanup_runner import CleanupRunner
from exporter.api.docs_page import DOCS_CSP, docs_page
from exporter.api.documents import (
    BadRequestError,
    collect_document,
    error_body,
    info_document,
    parse_dry_run,
    parse_none,
    parse_top,
)
from exporter.api.openapi import OPENAPI
from exporter.api.refusals import RefusalThrottle
from exporter.index.fsinfo import FsUsage
from exporter.index.scan import ScanFailedError
from exporter.index.status import ReconcileResult, Snapshot
from shared.audit import AuditLog
from shared.cleanup_state import CleanupState
from shared.logs import FAILURE, get_logger

log = get_logger("exporter.api")

MAX_BODY_BYTES = 1024


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

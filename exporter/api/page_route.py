"""Serves the front page `/` (exporter/api/page.py) from the storage API's sources and the last plan's summary.

Who sees what: the figures `/metrics` serves are on the page for everyone. Per-model rows (the
largest models, the models the last plan would evict) and the last run's error text are shown
exactly when `GET /storage/info` would answer the same request: always when no read token is
configured, else only with a read or admin token. A missing or rejected token still gets the page
(200) without those rows, and a note saying why; the page never asks for credentials.
"""

from __future__ import annotations

from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from exporter.api.auth import authorize
from exporter.api.documents import BadRequestError, parse_none
from exporter.api.page import PAGE_CSP, render_page
from exporter.api.page_data import LastRun, ScrubView, page_data
from exporter.api.routes import StorageApi, error_response
from exporter.index.status import ScrubFigures
from shared.plan_summary import read_plan_summary, summary_path

LINKS = (
    ("/metrics", "/metrics"),
    ("/storage/info", "/storage/info"),
    ("/docs", "API docs"),
    ("/openapi.json", "OpenAPI"),
    ("/healthz", "/healthz"),
    ("/readyz", "/readyz"),
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page_routes(api: StorageApi, *, state_path: Path, trash_limit_bytes: int, scrub_enabled: bool) -> list[BaseRoute]:
    plan_file = summary_path(state_path)

    def build(show_details: bool, token_rejected: bool) -> str:
        snap = api.snapshot()
        state = api.cleanup_state()
        last_run = None
        if state is not None:
            last_run = LastRun(
                timestamp=state.timestamp,
                success=state.success,
                exit_code=state.exit_code,
                error=state.error,
                evicted_bytes_total=state.evicted_bytes_total,
                evicted_models_total=state.evicted_models_total,
                skipped=state.skipped,
            )
        data = page_data(
            tiers=snap.tiers,
            models=snap.models,
            capacity_bytes=api.capacity_bytes,
            filesystem=api.filesystem(),
            ready=snap.ready,
            polling=snap.polling,
            last_full_scan=snap.last_full_scan,
            show_details=show_details,
            now=api.clock(),
            last_run=last_run,
            trash_bytes=None if state is None else state.trash_bytes,
            trash_limit_bytes=trash_limit_bytes,
            plan=read_plan_summary(plan_file),
            token_rejected=token_rejected,
            links=LINKS,
            scrub=_scrub_view(snap.scrub) if scrub_enabled else None,
            allocated=snap.allocated,
            last_opened={(t, m): ts for t, m, ts in snap.last_opened} if show_details else None,
            opens_since=snap.opens_since,
        )
        return render_page(data)

    async def page(request: Request) -> Response:
        try:
            parse_none(request.query_params.multi_items())
        except BadRequestError as err:
            return error_response(err.status, err.code, err.message)
        caller = api.tokens.identify(request.headers.get("authorization"))
        show_details = authorize(api.tokens, caller, "read") is None
        rejected = caller.presented and not caller.authenticated
        body = await run_in_threadpool(build, show_details, rejected)
        return HTMLResponse(body, headers=PAGE_HEADERS)

    return [Route("/", page, methods=["GET"])]


def _scrub_view(figures: ScrubFigures) -> ScrubView:
    return ScrubView(
        corrections_total=figures.corrections_total,
        drift_bytes_total=figures.drift_bytes_total,
        last_cycle_seconds=figures.cycle_seconds,
        last_cycle_timestamp=figures.last_cycle_timestamp,
        expected_cycle_seconds=figures.expected_cycle_seconds,
    )

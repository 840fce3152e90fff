"""The exporter's HTTP surface: `/`, `/metrics`, `/healthz`, `/readyz`; the storage API adds /storage/*."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.logs import FAILURE, get_logger

log = get_logger("exporter.http")

LANDING = """<!doctype html>
<html><head><title>model-storage exporter</title></head>
<body><h1>model-storage exporter</h1>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/readyz">/readyz</a></li>
<li><a href="/healthz">/healthz</a></li>{extra}</ul></body></html>
"""


def metrics_routes(
    render_metrics: Callable[[], bytes],
    readiness: Callable[[], str],
    is_alive: Callable[[], bool],
    extra_links: str = "",
) -> list[BaseRoute]:
    # Sync endpoints run in Starlette's thread pool, so a slow scrape never blocks the event loop.
    def metrics(_request: Request) -> Response:
        return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)

    def readyz(_request: Request) -> Response:
        status = readiness()
        # 503 until the initial scan is done, and again if the index can no longer be kept current.
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    def healthz(_request: Request) -> Response:
        if is_alive():
            return JSONResponse({"status": "alive"})
        return JSONResponse({"status": "updater stopped"}, status_code=503)

    def landing(_request: Request) -> Response:
        return HTMLResponse(LANDING.format(extra=extra_links))

    return [
        Route("/", landing),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]


def _http_error(_request: Request, exc: Exception) -> Response:
    # 404 and 405 (with its Allow header) answer in the API's JSON error shape, like every other error.
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = {"error": {"code": code, "message": exc.detail}}
    return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))


def _unexpected(_request: Request, exc: Exception) -> Response:
    # Never a traceback to the client; the log keeps the details.
    log.error("http.unexpected_error", error=f"{type(exc).__name__}: {exc}", outcome=FAILURE)
    body = {"error": {"code": "internal", "message": "unexpected error; see the exporter's log"}}
    return JSONResponse(body, status_code=500)


def build_app(routes: list[BaseRoute]) -> Starlette:
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _unexpected})

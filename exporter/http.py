"""The exporter's HTTP surface: `/`, `/metrics`, `/healthz`, `/readyz` (the storage API adds /storage/*)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

LANDING = """<!doctype html>
<html><head><title>model-storage exporter</title></head>
<body><h1>model-storage exporter</h1>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/readyz">/readyz</a></li>
<li><a href="/healthz">/healthz</a></li>{extra}</ul></body></html>
"""


def metrics_routes(
    render_metrics: Callable[[], bytes],
    is_ready: Callable[[], bool],
    is_alive: Callable[[], bool],
    extra_links: str = "",
) -> list[BaseRoute]:
    # Sync endpoints run in Starlette's thread pool, so a slow scrape never blocks the event loop.
    def metrics(_request: Request) -> Response:
        return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)

    def readyz(_request: Request) -> Response:
        if is_ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "scanning"}, status_code=503)

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


def build_app(routes: list[BaseRoute]) -> Starlette:
    return Starlette(routes=routes)

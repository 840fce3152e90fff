"""The exporter's HTTP surface: `/`, `/metrics`, `/healthz`, `/readyz`; the storage API adds /storage/*.

Invariants: no path redirects (an unknown path, trailing slash included, is a 404 JSON error, so no
answer is built from the Host header); proxy headers are believed only from the trusted proxies
the operator names, so a client cannot choose the address the audit log and the refusal throttle
see; connections are bounded (see `exporter.api.connections`).
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from uvicorn import Config, Server

from exporter.api.connections import ACCEPT_BACKLOG, LISTEN_BACKLOG, ConnectionBook, bounded_protocol, effective_cap
from shared.logs import FAILURE, get_logger
from shared.typed_settings import ExporterSettings

log = get_logger("exporter.http")


class Renderer(Protocol):
    def render(self) -> bytes:
        """The exposition text; may wait for locks."""

    def render_now(self) -> bytes | None:
        """The exposition text if it can be had without waiting or much work, else None."""


def metrics_routes(renderer: Renderer, readiness: Callable[[], str], is_alive: Callable[[], bool]) -> list[BaseRoute]:
    # The event loop never waits for a lock: a scrape that would wait, or format many models, runs
    # in Starlette's thread pool (as the sync endpoints below do), so it never holds up /healthz.
    async def metrics(_request: Request) -> Response:
        body = renderer.render_now()
        if body is None:
            body = await run_in_threadpool(renderer.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def readyz(_request: Request) -> Response:
        status = readiness()
        # 503 until the initial scan is done, and again if the index can no longer be kept current.
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    def healthz(_request: Request) -> Response:
        if is_alive():
            return JSONResponse({"status": "alive"})
        return JSONResponse({"status": "updater stopped"}, status_code=503)

    return [
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
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _unexpected})
    # Starlette would answer `/metrics/` with a 307 to the same path on whatever host the client named.
    app.router.redirect_slashes = False
    return app


def raise_open_files_limit() -> int | None:
    """Raise the soft open-files limit to the hard one; the soft limit now in force (None: unlimited).

    systemd gives services a soft limit of 1024 (for select(), which nothing here uses) under a hard
    one of 524288, and asks programs that need more to raise it themselves, as Go's runtime does.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as err:
            log.warning("http.open_files_limit_kept", soft=soft, hard=hard, error=str(err), outcome=FAILURE)
    return None if soft == resource.RLIM_INFINITY else soft


def server_config(app: Starlette, settings: ExporterSettings, soft_limit: int | None) -> tuple[Config, ConnectionBook]:
    """uvicorn's settings for `app`: h11 with bounded connections, proxy headers only from trusted proxies."""
    host, port = settings.listen
    configured = settings.http_max_connections
    book = ConnectionBook(cap=effective_cap(configured, soft_limit))
    if book.cap < configured:
        log.warning(
            "http.connection_cap_lowered",
            configured=configured,
            cap=book.cap,
            open_files_soft_limit=soft_limit,
            outcome=FAILURE,
            error="the open-files limit is too low for the configured connections; raise LimitNOFILE / ulimit -n",
        )
    trusted = list(settings.trusted_proxies)
    config = Config(
        app,
        host=host,
        port=port,
        http=bounded_protocol(book, settings.http_request_timeout_seconds),
        log_config=None,
        access_log=False,
        lifespan="off",
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted,
        server_header=False,
        # uvicorn annotates an int but only hands it to loop.call_later: fractions (0.1 s up) are kept.
        timeout_keep_alive=settings.http_keepalive_timeout_seconds,  # type: ignore[arg-type]
        backlog=ACCEPT_BACKLOG,
    )
    return config, book


class BoundedServer(Server):
    """uvicorn's server with a long kernel accept queue and asyncio's accept rounds kept short."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for listening in server.sockets:
                # listen() again on a duplicate of the descriptor changes the socket's own queue.
                with socket.socket(fileno=os.dup(listening.fileno())) as same:
                    same.listen(LISTEN_BACKLOG)

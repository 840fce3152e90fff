"""`model-storage-exporter`: load settings, start the index and watcher, serve HTTP until signalled."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from starlette.routing import BaseRoute

from exporter.api import StorageApi, docs_routes
from exporter.auth import TokenBook
from exporter.cleanup_runner import CleanupRunner
from exporter.exposition import build_renderer
from exporter.fsinfo import filesystem_usage
from exporter.http import BoundedServer, build_app, metrics_routes, raise_open_files_limit, server_config
from exporter.page_route import page_routes
from exporter.refusals import RefusalThrottle
from exporter.service import ExporterService
from shared.audit import AuditLog
from shared.cleanup_state import read_cleanup_state
from shared.config import GB, Settings, load_settings
from shared.errors import StorageError
from shared.exit_codes import ExitCode
from shared.logs import SUCCESS, configure_logging, get_logger


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line and exit code 2, as every bad-usage path does.
        print(f"model-storage-exporter: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.CONFIG)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="model-storage-exporter", description=__doc__)
    parser.add_argument("--config", metavar="FILE", help="YAML settings file (or STORAGE_CONFIG)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to serve (or STORAGE_EXPORTER_LISTEN)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    if args.listen:
        env["STORAGE_EXPORTER_LISTEN"] = args.listen
    return load_settings(args.config, env)


def storage_api(service: ExporterService, settings: Settings, config_file: str | None) -> StorageApi:
    state_file = settings.cleanup_state_file
    return StorageApi(
        snapshot=service.snapshot,
        reconcile=service.reconcile,
        is_alive=service.is_alive,
        filesystem=lambda: filesystem_usage(service.root),
        cleanup_state=lambda: read_cleanup_state(state_file),
        capacity_bytes=settings.capacity_bytes,
        tokens=TokenBook(settings.api.admin_tokens, settings.api.read_tokens),
        runner=CleanupRunner(
            settings.exporter.cleaner_command,
            timeout_seconds=settings.exporter.cleanup_timeout_seconds,
            config_file=config_file,
        ),
        audit=AuditLog(settings.audit_log_path),
        refusals=RefusalThrottle(limit=settings.api.audit_refusals_per_minute),
        request_timeout_seconds=settings.exporter.http_request_timeout_seconds,
    )


def exporter_routes(service: ExporterService, settings: Settings, api: StorageApi) -> list[BaseRoute]:
    """Everything the exporter serves: `/`, `/metrics`, `/healthz`, `/readyz`, the storage API and its docs."""
    routes = metrics_routes(
        build_renderer(service, settings),
        readiness=service.readiness,
        is_alive=service.is_alive,
    )
    page = page_routes(
        api,
        state_path=settings.state_path,
        trash_limit_bytes=round(settings.cleaner.trash.max_gb * GB),
        scrub_enabled=service.scrubber is not None,
    )
    return page + routes + api.routes() + docs_routes()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        from exporter.collector import package_version

        print(package_version())
        return ExitCode.OK
    try:
        settings = load(args)
    except StorageError as err:
        print(f"model-storage-exporter: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    configure_logging(settings.log.format, settings.log.level)
    log = get_logger("exporter")
    service = ExporterService(settings)
    api = storage_api(service, settings, args.config)
    try:
        service.start()
    except StorageError as err:
        print(f"model-storage-exporter: {err.one_line()}", file=sys.stderr)
        service.stop()
        return err.exit_code
    host, port = settings.exporter.listen
    tls = settings.exporter.tls_cert_file is not None
    app = build_app(exporter_routes(service, settings, api))
    config, _connections = server_config(app, settings.exporter, raise_open_files_limit())
    server = BoundedServer(config)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown_host}:{port}/metrics"
    log.info("exporter.serving", url=url, models_path=str(settings.models_path), outcome=SUCCESS)
    print(f"model-storage-exporter serving {settings.models_path} on {url}", flush=True)
    # uvicorn re-raises the signal it shut down on once it is done; let that land on a
    # no-op so that the index threads are stopped and the exit code is 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    try:
        server.run()
    finally:
        service.stop()
    if not server.started:
        print(f"model-storage-exporter: cannot listen on {host}:{port}", file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.OK

"""`model-storage-exporter`: load settings, start the index and watcher, serve HTTP until signalled."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.exit_codes import ExitCode

# Only what parsing the arguments needs is imported here: the scan's worker processes import this
# module too (multiprocessing runs the console script, `from exporter.cli import main`, as their
# __mp_main__), and the HTTP stack is a CPU second of imports that would compete with the first
# scan. `main` imports the rest once the watch and the scan are under way.
if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from exporter.api.routes import StorageApi
    from exporter.index.service import ExporterService
    from shared.config import Settings


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
    from shared.config import load_settings

    env = dict(os.environ)
    if args.listen:
        env["STORAGE_EXPORTER_LISTEN"] = args.listen
    return load_settings(args.config, env)


def storage_api(service: ExporterService, settings: Settings, config_file: str | None) -> StorageApi:
    from exporter.api.auth import TokenBook
    from exporter.api.cleanup_runner import CleanupRunner
    from exporter.api.refusals import RefusalThrottle
    from exporter.api.routes import StorageApi
    from exporter.index.fsinfo import filesystem_usage
    from shared.audit import AuditLog
    from shared.cleanup_state import read_cleanup_state

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
    from exporter.api.page_route import page_routes
    from exporter.api.routes import docs_routes
    from exporter.api.server import metrics_routes
    from exporter.metrics.endpoint import MetricsRenderer
    from shared.units import GB

    routes = metrics_routes(
        MetricsRenderer(service, settings),
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
        from exporter.metrics.families import package_version

        print(package_version())
        return ExitCode.OK
    from shared.errors import StorageError

    try:
        settings = load(args)
    except StorageError as err:
        print(f"model-storage-exporter: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    # The scan's worker processes first: they boot while the rest is imported and the tree watched.
    from exporter.index.scan import Scanner

    scanner = Scanner(settings.exporter.scan_workers)
    scanner.start()
    from shared.logs import configure_logging

    configure_logging(settings.log.format, settings.log.level)
    from exporter.index.service import ExporterService

    service = ExporterService(settings, scanner)
    # Watching and the initial scan start next: the HTTP stack is imported while they run.
    try:
        service.start()
    except StorageError as err:
        print(f"model-storage-exporter: {err.one_line()}", file=sys.stderr)
        service.stop()
        return err.exit_code
    try:
        return _serve(service, settings, args.config)
    finally:
        service.stop()


def _serve(service: ExporterService, settings: Settings, config_file: str | None) -> int:
    """Serve HTTP until signalled; the exit code."""
    from exporter.api.server import BoundedServer, build_app, raise_open_files_limit, server_config
    from shared.logs import SUCCESS, get_logger

    log = get_logger("exporter")

    api = storage_api(service, settings, config_file)
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
    server.run()
    if not server.started:
        print(f"model-storage-exporter: cannot listen on {host}:{port}", file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.OK

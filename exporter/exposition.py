"""Builds what `/metrics` serves: the collector over the live index, rendered as exposition text."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from exporter.collector import StorageCollector
from exporter.fsinfo import filesystem_usage, watch_limit
from exporter.service import ExporterService
from shared.cleanup_state import read_cleanup_state
from shared.config import GB, Settings


def build_registry(service: ExporterService, settings: Settings) -> CollectorRegistry:
    state_file = settings.cleanup_state_file
    registry = CollectorRegistry(auto_describe=True)
    registry.register(
        StorageCollector(
            snapshot=service.snapshot,
            capacity_bytes=settings.capacity_bytes,
            filesystem=lambda: filesystem_usage(service.root),
            watch_limit=watch_limit,
            cleanup_state=lambda: read_cleanup_state(state_file),
            trash_limit_bytes=round(settings["cleaner.trash.max_gb"] * GB),
        )
    )
    return registry


def build_renderer(service: ExporterService, settings: Settings) -> Callable[[], bytes]:
    registry = build_registry(service, settings)
    return lambda: generate_latest(registry)

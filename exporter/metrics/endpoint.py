"""Builds what `/metrics` serves: the live index rendered as exposition text, per-model lines cached."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter.index.fsinfo import filesystem_usage, watch_limit
from exporter.index.service import ExporterService
from exporter.metrics.families import StorageCollector
from exporter.metrics.model_lines import ModelLinesCache
from exporter.metrics.plan_families import PlanCollector
from shared.cleanup_state import read_cleanup_state
from shared.config import Settings
from shared.units import GB


def build_collector(service: ExporterService, settings: Settings) -> StorageCollector:
    state_file = settings.cleanup_state_file
    return StorageCollector(
        snapshot=service.snapshot,
        capacity_bytes=settings.capacity_bytes,
        filesystem=lambda: filesystem_usage(service.root),
        watch_limit=watch_limit,
        cleanup_state=lambda: read_cleanup_state(state_file),
        trash_limit_bytes=round(settings.cleaner.trash.max_gb * GB),
    )


def build_registry(service: ExporterService, settings: Settings) -> CollectorRegistry:
    """The plain prometheus_client path (every series formatted per scrape): the benchmarks' baseline."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(build_collector(service, settings))
    registry.register(PlanCollector.for_state_path(settings.state_path))
    return registry


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def build_renderer(service: ExporterService, settings: Settings) -> Callable[[], bytes]:
    """O(models) joins per scrape: the few dozen fixed series through prometheus_client, the
    per-model families from `ModelLinesCache`, both read under one lock so they agree."""
    collector = build_collector(service, settings)
    plan = PlanCollector.for_state_path(settings.state_path)
    cache = ModelLinesCache()
    # Scrapes may run concurrently in the server's thread pool; the cache is touched under the
    # index lock already, this lock only keeps two scrapes from formatting the same models twice.
    render_lock = threading.Lock()

    def render() -> bytes:
        with render_lock:
            snap, chunks = service.read_index(cache.chunks)
        # One join, outside the index lock: the pieces are immutable bytes.
        families = [*collector.families(snap, models=False), *plan.collect()]
        return b"".join((generate_latest(_Families(families)), *chunks))

    return render

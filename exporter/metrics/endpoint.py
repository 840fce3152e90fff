"""Builds what `/metrics` serves: the live index rendered as exposition text, per-model lines cached."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from exporter.index.fsinfo import filesystem_usage, watch_limit
from exporter.index.service import ExporterService
from exporter.index.status import Snapshot
from exporter.index.tree import Tree
from exporter.metrics.families import StorageCollector
from exporter.metrics.family_text import families_text
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


# A scrape on the event loop formats at most this many changed models (about 3 µs each), so a
# scrape there holds the loop for a few milliseconds at most; more waits in the thread pool.
INLINE_MODELS = 1_000


class MetricsRenderer:
    """O(models) joins per scrape: the few dozen fixed series formatted afresh (`families_text`),
    the per-model families from `ModelLinesCache`, both read under one lock so they agree.

    `render` may wait for the index lock (the updater holds it for a slice of events), so it runs
    in the server's thread pool. `render_now` never waits for a lock: it renders only when its
    locks (this one, the opens store's, the index's) are free and few models changed, else answers
    None. The event loop calls it first: a thread-pool hop costs two waits for the GIL, which the
    reader and updater hold through a burst of events. Besides, it does what `render` does: a
    `statvfs` of the models path and reads of two small state files; so not while the exporter
    polls, which it does on a network filesystem, where those calls can hang.
    """

    def __init__(self, service: ExporterService, settings: Settings) -> None:
        self._service = service
        self._collector = build_collector(service, settings)
        self._plan = PlanCollector.for_state_path(settings.state_path)
        self._cache = ModelLinesCache()
        # Scrapes may run concurrently in the server's thread pool; the cache is touched under the
        # index lock already, this lock only keeps two scrapes from formatting the same models twice.
        self._render_lock = threading.Lock()

    def render(self) -> bytes:
        with self._render_lock:
            got = self._service.read_index(self._cache.chunks)
        assert got is not None  # read_index waits for the lock
        return self._join(*got)

    def render_now(self) -> bytes | None:
        if self._service.polling:
            return None  # a network filesystem (or no inotify): its statvfs may hang, keep it off the loop
        if not self._render_lock.acquire(blocking=False):
            return None
        try:
            got = self._service.read_index(self._chunks_if_cheap, wait=False)
        finally:
            self._render_lock.release()
        if got is None or got[1] is None:
            return None
        return self._join(got[0], got[1])

    def _chunks_if_cheap(self, tree: Tree) -> list[bytes] | None:
        return self._cache.chunks(tree) if self._cache.cheap(tree, INLINE_MODELS) else None

    def _join(self, snap: Snapshot, chunks: list[bytes]) -> bytes:
        # One join, outside the index lock: the pieces are immutable bytes.
        families = [*self._collector.families(snap, models=False), *self._plan.collect()]
        return b"".join((families_text(families), *chunks))

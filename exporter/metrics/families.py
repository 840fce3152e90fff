"""The Prometheus collector: renders a snapshot of the index at scrape time, O(models), never O(files).

Series it emits (see shared/metric_names.py):
    model_storage_bytes{tier} / _files{tier} / _models{tier}
    model_storage_model_bytes{tier,model} / _model_files / _model_last_changed_timestamp_seconds
    model_storage_model_last_opened_timestamp_seconds{tier,model} (only models seen opened),
    model_storage_opens_tracking_since_timestamp_seconds (only while opens are tracked)
    model_storage_capacity_bytes, model_storage_filesystem_size_bytes / _avail_bytes
    model_storage_scan_duration_seconds, model_storage_last_full_scan_timestamp_seconds,
    model_storage_scan_failures_total
    model_storage_events_total, model_storage_event_overflows_total, model_storage_reconcile_drift_bytes
    model_storage_errors_total{kind}, model_storage_watches, model_storage_watch_limit
    model_storage_polling, model_storage_ready, model_storage_build_info{version}
    model_storage_scrub_corrections_total, model_storage_scrub_drift_bytes_total,
    model_storage_scrub_cycle_seconds, model_storage_scrub_last_cycle_timestamp_seconds,
    model_storage_scrub_expected_cycle_seconds
    model_storage_cleanup_* and model_storage_trash_bytes / _trash_limit_bytes (the cleaner's state file)
A model that is deleted simply is not in the next snapshot, so its series vanish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.index.fsinfo import FsUsage
from exporter.index.status import Snapshot
from shared import metric_names as m
from shared.names import name_text


class CleanupState(Protocol):
    """What the collector reads of the cleaner's last-run state file (shared/cleanup_state.py)."""

    @property
    def timestamp(self) -> float: ...
    @property
    def success(self) -> bool: ...
    @property
    def evicted_bytes_total(self) -> Mapping[str, int]: ...
    @property
    def evicted_models_total(self) -> Mapping[str, int]: ...
    @property
    def skipped(self) -> Mapping[str, int]: ...
    @property
    def trash_bytes(self) -> int: ...
    @property
    def usage_blind(self) -> bool: ...


def package_version() -> str:
    try:
        return version("model-storage")
    except PackageNotFoundError:
        return "unknown"


class StorageCollector(Collector):
    """Reads everything through injected callables, so tests need no threads or sockets."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        capacity_bytes: int,
        filesystem: Callable[[], FsUsage | None],
        watch_limit: Callable[[], int | None],
        cleanup_state: Callable[[], CleanupState | None],
        trash_limit_bytes: int,
    ) -> None:
        self._snapshot = snapshot
        self._capacity = capacity_bytes
        self._filesystem = filesystem
        self._watch_limit = watch_limit
        self._cleanup_state = cleanup_state
        self._trash_limit = trash_limit_bytes
        self._version = package_version()

    def describe(self) -> Iterator[Metric]:
        # Registering must not trigger a collect (the index may still be scanning).
        return iter(())

    def collect(self) -> Iterator[Metric]:
        return iter(self.families(self._snapshot()))

    def families(self, snap: Snapshot, *, models: bool = True) -> list[Metric]:
        """Every family for this snapshot; `models=False` leaves the per-model ones to a cache."""
        return list(self._families(snap, models))

    def _families(self, snap: Snapshot, models: bool) -> Iterator[Metric]:
        yield from self._tiers(snap)
        if models:
            yield from self._models(snap)
        yield from self._opens(snap)
        yield from self._capacity_and_fs()
        yield from self._health(snap)
        yield from self._cleanup()

    def _tiers(self, snap: Snapshot) -> Iterator[Metric]:
        families = [
            GaugeMetricFamily(m.BYTES, "Apparent size of regular files per tier, bytes.", labels=[m.TIER_LABEL]),
            GaugeMetricFamily(m.FILES, "Regular files per tier (hard links once).", labels=[m.TIER_LABEL]),
            GaugeMetricFamily(m.MODELS, "Models (first-level entries) per tier.", labels=[m.TIER_LABEL]),
        ]
        for tier, values in sorted(snap.tiers.items()):
            for family, value in zip(families, values, strict=True):
                family.add_metric([tier], value)
        allocated = GaugeMetricFamily(
            m.ALLOCATED_BYTES,
            "Allocated size of regular files per tier (512 * st_blocks, hard links once), bytes.",
            labels=[m.TIER_LABEL],
        )
        for tier, value in sorted(snap.allocated.items()):
            allocated.add_metric([tier], value)
        yield from families
        yield allocated

    def _models(self, snap: Snapshot) -> Iterator[Metric]:
        labels = [m.TIER_LABEL, m.MODEL_LABEL]
        size = GaugeMetricFamily(m.MODEL_BYTES, "Apparent size of a model's regular files, bytes.", labels=labels)
        files = GaugeMetricFamily(m.MODEL_FILES, "Regular files in a model.", labels=labels)
        changed = GaugeMetricFamily(
            m.MODEL_LAST_CHANGED, "Newest mtime or ctime of anything in the model, seconds.", labels=labels
        )
        allocated = GaugeMetricFamily(
            m.MODEL_ALLOCATED_BYTES,
            "Allocated size of a model's regular files (512 * st_blocks), bytes.",
            labels=labels,
        )
        for stat in snap.models:
            key = [stat.tier, name_text(stat.model)]
            size.add_metric(key, stat.bytes)
            files.add_metric(key, stat.files)
            changed.add_metric(key, stat.changed)
            allocated.add_metric(key, stat.allocated)
        yield from (size, files, changed, allocated)

    def _opens(self, snap: Snapshot) -> Iterator[Metric]:
        """O(models seen opened), outside the per-model cache: a scrape reads them fresh."""
        if snap.opens_since is None:
            return
        yield GaugeMetricFamily(
            m.OPENS_TRACKING_SINCE,
            "Since when opens of model files are tracked without a gap (a model not opened since is unused).",
            snap.opens_since,
        )
        opened = GaugeMetricFamily(
            m.MODEL_LAST_OPENED,
            "When a file of the model was last opened by anyone but model-storage, seconds.",
            labels=[m.TIER_LABEL, m.MODEL_LABEL],
        )
        for tier, model, ts in sorted(snap.last_opened):
            opened.add_metric([tier, name_text(model)], ts)
        yield opened

    def _capacity_and_fs(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(m.CAPACITY_BYTES, "Configured capacity of the models path, bytes.", self._capacity)
        usage = self._filesystem()
        if usage is not None:
            yield GaugeMetricFamily(m.FILESYSTEM_SIZE_BYTES, "Size of the models filesystem.", usage.size_bytes)
            yield GaugeMetricFamily(
                m.FILESYSTEM_AVAIL_BYTES, "Bytes available to unprivileged users.", usage.avail_bytes
            )

    def _health(self, snap: Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily(m.SCAN_DURATION, "Duration of the last full scan.", snap.scan_duration_seconds)
        yield GaugeMetricFamily(m.LAST_FULL_SCAN, "When the last full scan finished.", snap.last_full_scan)
        yield CounterMetricFamily(
            m.SCAN_FAILURES, "Full scans that did not complete (a worker died): never used.", snap.scan_failures_total
        )
        yield CounterMetricFamily(m.EVENTS, "Filesystem events applied to the index.", snap.events_total)
        yield CounterMetricFamily(
            m.EVENT_OVERFLOWS,
            "Event losses (queue overflows, failed watches) that forced a rescan.",
            snap.overflows_total,
        )
        yield GaugeMetricFamily(
            m.RECONCILE_DRIFT_BYTES, "Sum of |tracked - true| bytes found by the last reconcile.", snap.drift_bytes
        )
        errors = CounterMetricFamily(m.ERRORS, "Errors by kind (unreadable dirs, failed stats).", labels=["kind"])
        for kind in ("scan", "stat", "watch", "updater"):
            errors.add_metric([kind], snap.errors_total.get(kind, 0))
        yield errors
        yield GaugeMetricFamily(m.WATCHES, "inotify watches in use (one per directory).", snap.watches)
        limit = self._watch_limit()
        if limit is not None:
            yield GaugeMetricFamily(m.WATCH_LIMIT, "fs.inotify.max_user_watches.", limit)
        yield GaugeMetricFamily(m.POLLING, "1 when polling instead of inotify (NFS, FUSE, no watches).", snap.polling)
        yield GaugeMetricFamily(
            m.READY, "1 while /readyz is 200: the initial scan is done and the index is kept current.", snap.ready
        )
        scrub = snap.scrub
        yield CounterMetricFamily(
            m.SCRUB_CORRECTIONS, "Index entries the scrub found wrong and corrected.", scrub.corrections_total
        )
        yield CounterMetricFamily(
            m.SCRUB_DRIFT_BYTES, "Sum of |indexed - true| bytes the scrub corrected.", scrub.drift_bytes_total
        )
        yield GaugeMetricFamily(m.SCRUB_CYCLE, "Duration of the scrub's last full cycle.", scrub.cycle_seconds)
        yield GaugeMetricFamily(
            m.SCRUB_LAST_CYCLE,
            "When the scrub's last full cycle ended (until the first ends: when it started; 0: off).",
            scrub.last_cycle_timestamp,
        )
        yield GaugeMetricFamily(
            m.SCRUB_EXPECTED_CYCLE,
            "Expected scrub cycle at its budget: indexed files plus 9 per directory, over stats per second.",
            scrub.expected_cycle_seconds,
        )
        info = InfoMetricFamily(m.BUILD_INFO, "Exporter build.", labels=["version"])
        info.add_metric([self._version], {})
        yield info

    def _cleanup(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(m.TRASH_LIMIT_BYTES, "Configured trash cap, bytes.", self._trash_limit)
        state = self._cleanup_state()
        if state is None:
            return
        yield GaugeMetricFamily(m.CLEANUP_LAST_RUN, "When the cleaner last finished a run.", state.timestamp)
        yield GaugeMetricFamily(m.CLEANUP_LAST_SUCCESS, "1 when the cleaner's last run succeeded.", state.success)
        evicted_bytes = CounterMetricFamily(
            m.CLEANUP_EVICTED_BYTES, "Bytes evicted by the cleaner, by policy.", labels=["policy"]
        )
        evicted_models = CounterMetricFamily(
            m.CLEANUP_EVICTED_MODELS, "Models evicted by the cleaner, by policy.", labels=["policy"]
        )
        for policy in sorted({"age", "usage", "size", *state.evicted_bytes_total}):
            evicted_bytes.add_metric([policy], state.evicted_bytes_total.get(policy, 0))
            evicted_models.add_metric([policy], state.evicted_models_total.get(policy, 0))
        yield evicted_bytes
        yield evicted_models
        skipped = GaugeMetricFamily(
            m.CLEANUP_SKIPPED_MODELS, "Models the last run skipped, by reason.", labels=["reason"]
        )
        for reason, count in sorted(state.skipped.items()):
            skipped.add_metric([reason], count)
        yield skipped
        yield GaugeMetricFamily(
            m.CLEANUP_USAGE_BLIND,
            "1 when the latest cleanup plan found no usage series at all and kept every model usage would judge.",
            state.usage_blind,
        )
        yield GaugeMetricFamily(m.TRASH_BYTES, "Bytes held in the cleaner's trash.", state.trash_bytes)

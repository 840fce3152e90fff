"""Metric names and label names: a contract shared by the exporter, the rules, the dashboard and the cleaner."""

from __future__ import annotations

from typing import Final

PREFIX: Final = "model_storage"

# Per tier.
BYTES: Final = "model_storage_bytes"
FILES: Final = "model_storage_files"
MODELS: Final = "model_storage_models"
# Allocated bytes (512 * st_blocks, hard links once): what the files take on disk. Capacity uses these.
ALLOCATED_BYTES: Final = "model_storage_allocated_bytes"

# Per model.
MODEL_BYTES: Final = "model_storage_model_bytes"
MODEL_FILES: Final = "model_storage_model_files"
MODEL_LAST_CHANGED: Final = "model_storage_model_last_changed_timestamp_seconds"
MODEL_ALLOCATED_BYTES: Final = "model_storage_model_allocated_bytes"
# Last opened (exporter/index/opens.py): absent for a model not seen opened since tracking began.
MODEL_LAST_OPENED: Final = "model_storage_model_last_opened_timestamp_seconds"
OPENS_TRACKING_SINCE: Final = "model_storage_opens_tracking_since_timestamp_seconds"

# Capacity and filesystem.
CAPACITY_BYTES: Final = "model_storage_capacity_bytes"
FILESYSTEM_SIZE_BYTES: Final = "model_storage_filesystem_size_bytes"
FILESYSTEM_AVAIL_BYTES: Final = "model_storage_filesystem_avail_bytes"

# Scanner and watcher health.
SCAN_DURATION: Final = "model_storage_scan_duration_seconds"
LAST_FULL_SCAN: Final = "model_storage_last_full_scan_timestamp_seconds"
SCAN_FAILURES: Final = "model_storage_scan_failures"  # counter: _total (full scans that did not complete)
EVENTS: Final = "model_storage_events"  # counter: exposed as model_storage_events_total
EVENT_OVERFLOWS: Final = "model_storage_event_overflows"  # counter: _total
RECONCILE_DRIFT_BYTES: Final = "model_storage_reconcile_drift_bytes"
ERRORS: Final = "model_storage_errors"  # counter by kind: _total
WATCHES: Final = "model_storage_watches"
WATCH_LIMIT: Final = "model_storage_watch_limit"
POLLING: Final = "model_storage_polling"
READY: Final = "model_storage_ready"
BUILD_INFO: Final = "model_storage_build"  # info metric: model_storage_build_info

# The scrub (exporter/index/scrub.py).
SCRUB_CORRECTIONS: Final = "model_storage_scrub_corrections"  # counter: _total
SCRUB_DRIFT_BYTES: Final = "model_storage_scrub_drift_bytes"  # counter: _total
SCRUB_CYCLE: Final = "model_storage_scrub_cycle_seconds"
SCRUB_LAST_CYCLE: Final = "model_storage_scrub_last_cycle_timestamp_seconds"
SCRUB_EXPECTED_CYCLE: Final = "model_storage_scrub_expected_cycle_seconds"

# Written by the cleaner's state file, served by the exporter.
CLEANUP_LAST_RUN: Final = "model_storage_cleanup_last_run_timestamp_seconds"
CLEANUP_LAST_SUCCESS: Final = "model_storage_cleanup_last_success"
CLEANUP_EVICTED_BYTES: Final = "model_storage_cleanup_evicted_bytes"  # counter: _total
CLEANUP_EVICTED_MODELS: Final = "model_storage_cleanup_evicted_models"  # counter: _total
CLEANUP_SKIPPED_MODELS: Final = "model_storage_cleanup_skipped_models"
CLEANUP_USAGE_BLIND: Final = "model_storage_cleanup_usage_blind"
TRASH_BYTES: Final = "model_storage_trash_bytes"
TRASH_LIMIT_BYTES: Final = "model_storage_trash_limit_bytes"  # the configured trash cap

TIER_LABEL: Final = "tier"
MODEL_LABEL: Final = "model"
OTHER_TIER: Final = "other"

# The last plan's summary file (shared/plan_summary.py), served by the exporter.
CLEANUP_PLANNED_BYTES: Final = "model_storage_cleanup_planned_bytes"
CLEANUP_PLANNED_MODELS: Final = "model_storage_cleanup_planned_models"
CLEANUP_PLAN_TIMESTAMP: Final = "model_storage_cleanup_plan_timestamp_seconds"

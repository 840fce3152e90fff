"""Shared fixtures: a temp store laid out like production, and the real processes the suite runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A base path with models/{raw,quantized,repository}; returns the base path."""
    for tier in ("raw", "quantized", "repository"):
        (tmp_path / "storage" / "models" / tier).mkdir(parents=True)
    return tmp_path / "storage"


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


# Threads a test may leave: process-wide pools of libraries, started once and kept on purpose.
LONG_LIVED_THREADS = ("asyncio_", "ThreadPoolExecutor-")
STOPPING_SECONDS = 5.0


def leaked_threads(before: set[threading.Thread], stopping_seconds: float = STOPPING_SECONDS) -> list[str]:
    """Threads started since `before` still alive after up to `stopping_seconds` (daemons included)."""
    deadline = time.monotonic() + stopping_seconds

    def leaked() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(LONG_LIVED_THREADS)
        ]

    for thread in leaked():
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [f"{t.name} (daemon)" if t.daemon else t.name for t in leaked()]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """As watchdog's own suite does: a test that leaves threads running fails, daemon threads included
    (every exporter thread is one: a service started and never stopped must not pass). Threads that
    are stopping get a few seconds to end."""
    before = set(threading.enumerate())
    yield
    still = leaked_threads(before)
    assert not still, f"threads leaked: {still}"


# ----- `make test-fast`: the suite without its slow end-to-end tests ----------------------------
# Marked `slow` here, in one place, from `--durations` on the shared 2-core machine: whole modules
# whose tests run real processes or stacks (exporter and cleaner processes, Prometheus, Docker,
# kill-at-every-step cleaners, schema fuzzing, the inotify event path), and single tests (every
# parameter of each) that took a second or more. The pure core's property tests stay in. `make
# test` runs them all; a new test that takes seconds belongs here.
SLOW_MODULES = {
    "test_alerting_e2e",
    "test_api_cleanup",
    "test_api_fuzz",
    "test_chaos",
    "test_cleaner_crash",
    "test_cleaner_e2e",
    "test_cleaner_fs_errors",
    "test_cleaner_plan",
    "test_cleaner_torture",
    "test_compose_stack",
    "test_exporter_cli",
    "test_exporter_allocated",
    "test_exporter_events",
    "test_exporter_long_paths",
    "test_exporter_mounts",
    "test_exporter_races_kernel",
    "test_exporter_readiness",
    "test_exporter_reconcile",
    "test_exporter_scale",
    "test_exporter_scan_faults",
    "test_exporter_scrub",
    "test_exporter_startup",
    "test_http_hardening",
    "test_kubernetes",
    "test_localstack",
    "test_opens",
    "test_output_golden",
    "test_prom_client",
    "test_tokens",
    "test_usage_source",
}
SLOW_TESTS = {
    "test_api.py::test_bad_input_gets_a_json_4xx",
    "test_api.py::test_cleaner_missing_is_a_503_not_a_500",
    "test_api.py::test_every_endpoint_with_every_kind_of_token",
    "test_api.py::test_info_and_metrics_keep_answering_during_a_collect_and_an_event_burst",
    "test_api.py::test_metrics_health_and_docs_stay_open_with_a_read_token_configured",
    "test_api.py::test_oversized_bodies_get_413_whether_declared_or_streamed",
    "test_api.py::test_refused_requests_are_audited_up_to_a_limit_per_address_and_counted_beyond",
    "test_api.py::test_runner_stops_a_cleaner_past_its_timeout_and_runs_one_at_a_time",
    "test_api.py::test_tls_serves_the_api_over_https",
    "test_audit.py::test_audit_verify_command_exits_0_when_intact_and_1_naming_the_line_when_not",
    "test_cleaner_apply.py::test_a_read_only_tier_directory_of_a_planned_model_exits_4_before_any_move",
    "test_cleaner_apply.py::test_a_run_on_a_read_only_models_path_exits_4_and_moves_nothing",
    "test_cleaner_apply.py::test_a_single_file_model_goes_and_comes_back_in_every_mode",
    "test_cleaner_apply.py::test_a_trash_path_containing_the_models_is_refused_and_no_model_is_touched",
    "test_cleaner_apply.py::test_archive_mode_copies_verifies_then_removes_the_original",
    "test_cleaner_apply.py::test_archive_mode_keeps_a_staged_model_changed_during_the_copy_and_skips_it",
    "test_cleaner_apply.py::test_restore_of_one_model_leaves_the_rest_in_trash",
    "test_cleaner_apply.py::test_trash_on_another_filesystem_falls_back_to_copy_verify_delete",
    "test_dashboard.py::test_annotation_queries_parse",
    "test_dashboard.py::test_instance_variable_finds_the_exporter",
    "test_dashboard.py::test_panel_query_returns_data_from_a_real_prometheus",
    "test_deploy.py::test_compose_file_passes_check_jsonschema_builtin_compose_schema",
    "test_deploy.py::test_dockerfile_healthcheck_asks_readyz_of_a_real_exporter",
    "test_exporter_logs.py::test_a_service_lifetime_logs_each_operation_with_its_outcome",
    "test_exporter_logs.py::test_failures_are_logged_as_failures_with_their_error",
    "test_exporter_races.py::test_the_thread_guard_sees_a_service_left_running",
    "test_names.py::test_metrics_audit_and_api_spell_each_hostile_name_alike",
    "test_names.py::test_metrics_are_byte_for_byte_the_exposition_of_each_name_on_a_real_tree",
    "test_names.py::test_two_models_differing_only_in_undecodable_bytes_are_two_entries_in_storage_info",
    "test_page.py::test_the_console_check_sees_a_page_that_logs_an_error_or_breaks_its_csp",
    "test_page.py::test_the_page_in_headless_chromium_matches_storage_info_with_no_console_messages",
    "test_page.py::test_with_a_read_token_configured_model_rows_need_a_token_and_figures_do_not",
    "test_plan_summary.py::test_a_corrupt_summary_file_leaves_the_plan_series_out_and_metrics_served",
    "test_plan_summary.py::test_a_plan_saved_by_the_cleaner_cli_is_served_by_the_exporter_and_a_run_leaves_the_rest",
    "test_plan_summary.py::test_a_reader_sees_one_whole_summary_or_the_other_while_another_process_rewrites_it",
    "test_rules.py::test_promtool_unit_tests_can_fail",
    "test_reasons.py::test_an_unwalkable_model_is_unreadable_in_the_plan_state_file_and_metrics_never_partial_download",
    "test_rules.py::test_promtool_unit_tests_pass",
}


# The per-test timeout (pyproject.toml, 600 s: the slowest test measured took 83 s here) is raised
# for the modules whose first test builds images or runs many rounds: a hung test still ends.
LONG_TIMEOUT_MODULES = {
    "test_alerting_e2e": 1800,
    "test_chaos": 1800,
    "test_cleaner_e2e": 1800,
    "test_cleaner_torture": 1800,
    "test_compose_stack": 1800,
    "test_exporter_scale": 1800,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.name.removesuffix(".py")
        test = f"{item.path.name}::{item.originalname}" if isinstance(item, pytest.Function) else item.nodeid
        if module in SLOW_MODULES or test in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if module in LONG_TIMEOUT_MODULES:
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_MODULES[module]))

"""The last plan's figures as metric families, from the cleaner's plan summary file.

Series (absent until a plan has been made):
    model_storage_cleanup_planned_bytes{policy}   bytes the last plan would still free, per policy
    model_storage_cleanup_planned_models{policy}  models the last plan would still evict, per policy
    model_storage_cleanup_plan_timestamp_seconds  when that plan was made
`policy` is always each of age, usage and size (0 when the plan selects nothing by it), plus any
other name the file holds, so a forecast summed over policies never loses a term to absence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import metric_names as m
from shared.plan_summary import POLICIES, PlanSummary, read_plan_summary, summary_path


def plan_families(summary: PlanSummary | None) -> list[Metric]:
    """The three families for `summary`; none without one. Pure."""
    if summary is None:
        return []
    planned_bytes = GaugeMetricFamily(
        m.CLEANUP_PLANNED_BYTES, "Bytes the last cleanup plan would still free, by policy.", labels=["policy"]
    )
    planned_models = GaugeMetricFamily(
        m.CLEANUP_PLANNED_MODELS, "Models the last cleanup plan would still evict, by policy.", labels=["policy"]
    )
    for policy in sorted({*POLICIES, *summary.bytes, *summary.models}):
        planned_bytes.add_metric([policy], summary.bytes.get(policy, 0))
        planned_models.add_metric([policy], summary.models.get(policy, 0))
    timestamp = GaugeMetricFamily(m.CLEANUP_PLAN_TIMESTAMP, "When the last cleanup plan was made.", summary.timestamp)
    return [planned_bytes, planned_models, timestamp]


class PlanCollector(Collector):
    """Reads the summary file on every collect: the cleaner is another process, the file is small."""

    def __init__(self, read: Callable[[], PlanSummary | None]) -> None:
        self._read = read

    @classmethod
    def for_state_path(cls, state_path: Path) -> PlanCollector:
        path = summary_path(state_path)
        return cls(lambda: read_plan_summary(path))

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        return iter(plan_families(self._read()))

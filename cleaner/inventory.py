"""Inventory and usage from Prometheus: the fixed set of queries, and their answers turned into ModelFacts.

Query building and parsing are pure; `fetch` is the only function that talks to Prometheus.
Every selector carries the configured extra matchers; several exporters scraping one store
(same tier/model) are deduplicated with `max by (tier, model)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from string import Template
from typing import Any

from cleaner import usage_source
from cleaner.plan_values import ModelFacts
from cleaner.policies import Coverage, PolicyView
from cleaner.prom import PromClient, QueryResult, Sample, shorten
from shared import metric_names as names
from shared.errors import ConfigError, PreconditionError
from shared.typed_settings import CleanerSettings

# Coverage is measured on a grid of this many steps across the window (so to within 1/20 of it),
# each step looking back this many steps, so a step holds at least two scrapes of the source.
COVERAGE_STEPS = 20
COVERAGE_LOOKBACK_STEPS = 4


@dataclass(frozen=True, slots=True)
class Inventory:
    """What Prometheus said, and the evidence: the queries, when they were evaluated, what they cost."""

    facts: tuple[ModelFacts, ...]
    coverage: Coverage
    queries: tuple[tuple[str, QueryResult], ...]  # (name, result) in the order they ran
    warnings: tuple[str, ...] = ()

    def evidence(self) -> dict[str, Any]:
        return {
            "queries": [
                {
                    "name": name,
                    "query": q.expr,
                    "evaluated_at": q.at,
                    "series": len(q.samples),
                    "seconds": round(q.seconds, 4),
                }
                for name, q in self.queries
            ],
            "usage_coverage": self.coverage.to_json(),
        }


def selector(metric: str, matchers: str) -> str:
    return f"{metric}{{{matchers}}}" if matchers else metric


def format_duration(seconds: float) -> str:
    """A PromQL duration every backend parses: whole units, down to milliseconds (no fractions)."""
    ms = max(round(seconds * 1000), 1)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def inventory_queries(matchers: str) -> dict[str, str]:
    by = "max by (tier, model) "
    return {
        "exporter_ready": f"max({selector(names.READY, matchers)})",
        "model_bytes": by + f"({selector(names.MODEL_BYTES, matchers)})",
        "model_files": by + f"({selector(names.MODEL_FILES, matchers)})",
        "model_last_changed": by + f"({selector(names.MODEL_LAST_CHANGED, matchers)})",
    }


def usage_query(template: str, window_seconds: float, matchers: str) -> str:
    expanded = {"window": format_duration(window_seconds), "matchers": f",{matchers}" if matchers else ""}
    return Template(template).safe_substitute(expanded)


def coverage_step(window_seconds: float) -> float:
    return window_seconds / COVERAGE_STEPS


def coverage_query(template: str, window_seconds: float, matchers: str) -> str:
    """The earliest grid instant at which the usage expression had any data, within the window.

    `timestamp()` of an aggregate is its evaluation time on both Prometheus and VictoriaMetrics,
    so the oldest one in the subquery is where the usage source's history starts (or the window's start).
    """
    step = coverage_step(window_seconds)
    inner = usage_query(template, step * COVERAGE_LOOKBACK_STEPS, matchers)
    return f"min_over_time(timestamp(count({inner}))[{format_duration(window_seconds)}:{format_duration(step)}])"


def parse_coverage(samples: Sequence[Sample], window_seconds: float, at: float) -> Coverage:
    step = coverage_step(window_seconds)
    oldest = [s.value for s in samples if math.isfinite(s.value)]
    covered = 0.0 if not oldest else min(max(at - min(oldest), 0.0), window_seconds)
    return Coverage(window_seconds=window_seconds, covered_seconds=covered, resolution_seconds=step)


def is_cleaner_own(model: str) -> bool:
    """A model being staged or deleted by a cleaner (`.<model>.model-storage-cleaner-<op>.staged`): not a model."""
    return model.startswith(".") and ".model-storage-cleaner-" in model


def _by_model(samples: Iterable[Sample]) -> dict[tuple[str, str], float]:
    values: dict[tuple[str, str], float] = {}
    for s in samples:
        tier, model = s.labels.get(names.TIER_LABEL), s.labels.get(names.MODEL_LABEL)
        if tier and model and math.isfinite(s.value):
            values[(tier, model)] = max(values.get((tier, model), s.value), s.value)
    return values


def parse_inventory(
    model_bytes: Sequence[Sample], model_files: Sequence[Sample], last_changed: Sequence[Sample], now: float
) -> list[ModelFacts]:
    """One ModelFacts per (tier, model) that has a size; a missing change time reads as "just changed"."""
    sizes, files, changed = _by_model(model_bytes), _by_model(model_files), _by_model(last_changed)
    facts = [
        ModelFacts(
            tier=tier,
            model=model,
            bytes=int(size),
            files=int(files.get((tier, model), 0)),
            # A model seen without its change time is treated as new: grace keeps it.
            last_changed=changed.get((tier, model), now),
        )
        for (tier, model), size in sizes.items()
        if tier != names.OTHER_TIER and not is_cleaner_own(model)
    ]
    return sorted(facts, key=lambda f: (f.tier, f.model))


def parse_usage(samples: Sequence[Sample], label: str) -> dict[str, float]:
    """Requests per model name; a series without the label is ignored, duplicates are summed."""
    usage: dict[str, float] = {}
    for s in samples:
        model = s.labels.get(label)
        if model and math.isfinite(s.value):
            usage[model] = usage.get(model, 0.0) + max(s.value, 0.0)
    return usage


def attach_usage(
    facts: Sequence[ModelFacts], usage: Mapping[str, float], usage_tiers: Sequence[str]
) -> list[ModelFacts]:
    """Requests for models of served tiers; a model missing from the usage data stays None (unknown)."""
    return [replace(f, requests=usage.get(f.model)) if f.tier in usage_tiers else f for f in facts]


def fetch(client: PromClient, cleaner: CleanerSettings, view: PolicyView, now: float) -> Inventory:
    """Run the fixed set of queries (4, plus 2 when usage is needed), all evaluated at `now`."""
    matchers = cleaner.prometheus.matchers
    results: list[tuple[str, QueryResult]] = []
    warnings: list[str] = []

    def run(name: str, expr: str) -> QueryResult:
        result = client.query(expr, now)
        results.append((name, result))
        warnings.extend(f"prometheus warning ({name}): {w}" for w in result.warnings)
        return result

    queries = inventory_queries(matchers)
    ready = run("exporter_ready", queries["exporter_ready"])
    where = f" matching {{{matchers}}}" if matchers else ""
    if not ready.samples:
        raise PreconditionError(
            f"prometheus {client.url}: no exporter series {names.READY}{where}",
            hint="is model-storage-exporter running and scraped?",
        )
    if max(s.value for s in ready.samples) < 1:
        raise PreconditionError(f"prometheus {client.url}: the exporter{where} is not ready (initial scan running)")
    facts = parse_inventory(
        run("model_bytes", queries["model_bytes"]).samples,
        run("model_files", queries["model_files"]).samples,
        run("model_last_changed", queries["model_last_changed"]).samples,
        now,
    )
    window = view.timeframe_seconds
    coverage = Coverage(window_seconds=window, covered_seconds=0.0, queried=False)
    source = cleaner.usage_source
    if view.needs_usage() and source != usage_source.OPENS:
        template = cleaner.usage_query
        label = cleaner.usage_label
        if matchers and "$matchers" not in template and "${matchers}" not in template:
            warnings.append("cleaner.usage_query has no $matchers: usage is not restricted to this host's series")
        covered = run("usage_coverage", coverage_query(template, window, matchers))
        coverage = parse_coverage(covered.samples, window, now)
        usage_result = run("usage", usage_query(template, window, matchers))
        if not covered.samples and not usage_result.samples:
            # No series at all is what every new deployment sees before a model server reports:
            # keep everything usage would judge and say so; a query that errors was raised above.
            coverage = replace(coverage, covered_seconds=0.0, blind=True)
            warnings.append(
                f"usage blind: the usage query matched no series in the last {format_duration(window)} "
                f"({shorten(usage_result.expr)}); models of the usage tiers ({', '.join(view.usage_tiers)}) "
                "are kept wherever usage would decide. Check cleaner.usage_query (STORAGE_USAGE_QUERY) and its "
                "matchers, or set STORAGE_USAGE_TIERS= (empty) when no model server reports usage"
            )
        usage = parse_usage(usage_result.samples, label)
        if usage_result.samples and not usage:
            raise ConfigError(
                f"config: cleaner.usage_label={label!r}: no series of the usage query carries that label",
                hint=f"labels seen: {', '.join(sorted(usage_result.samples[0].labels)) or 'none'}",
            )
        facts = attach_usage(facts, usage, view.usage_tiers)
    if view.needs_usage() and source != usage_source.REQUESTS:
        opens = usage_source.fetch_opens(run, matchers)
        facts, coverage = usage_source.choose(facts, coverage, opens, source, view, now)
    return Inventory(tuple(facts), coverage, tuple(results), tuple(warnings))

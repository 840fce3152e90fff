"""Which signal says a model of a usage tier is used: request counters, last opened, both, or auto.

`STORAGE_USAGE_SOURCE`:
- `requests` (default): the usage query's request counters, as before; nothing here changes them.
- `opens`: the exporter's `model_storage_model_last_opened_timestamp_seconds`. Used: opened within
  the usage window. Unused: not opened in it, and opens were tracked over the whole window
  (`model_storage_opens_tracking_since_timestamp_seconds` at or before its start). Otherwise unknown.
- `auto`: request counters for models that have usage series, last opened for the rest.
- `both`: used when either says used; unused only when one says unused and the other does not say
  used (unknown included is not enough: the model stays unknown).

Invariants:
- A model's usage is known only when the source that decides it covers the whole window; unknown
  is never read as unused (the policies keep unknown models).
- Opens become the policies' request figure: `min_requests` for used, 0 for unused, so the existing
  thresholds decide, and `usage_source` on the facts says which source it was, for the explanation.
Decision logic is pure; `fetch_opens` only runs queries through the caller's `run`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from cleaner.plan_values import ModelFacts
from cleaner.policies import Coverage, PolicyView
from cleaner.prom import QueryResult
from shared import metric_names as names

REQUESTS = "requests"
OPENS = "opens"


@dataclass(frozen=True, slots=True)
class Opens:
    since: float | None  # tracking since (the latest of the exporters'); None: no exporter tracks opens
    opened: Mapping[tuple[str, str], float]


def _selector(metric: str, matchers: str) -> str:
    return f"{metric}{{{matchers}}}" if matchers else metric


def opens_queries(matchers: str) -> dict[str, str]:
    return {
        # Several exporters of one store: the latest start is the one all of them cover.
        "opens_tracking_since": f"max({_selector(names.OPENS_TRACKING_SINCE, matchers)})",
        "model_last_opened": f"max by (tier, model) ({_selector(names.MODEL_LAST_OPENED, matchers)})",
    }


def fetch_opens(run: Callable[[str, str], QueryResult], matchers: str) -> Opens:
    queries = opens_queries(matchers)
    since = run("opens_tracking_since", queries["opens_tracking_since"]).samples
    opened: dict[tuple[str, str], float] = {}
    for s in run("model_last_opened", queries["model_last_opened"]).samples:
        tier, model = s.labels.get(names.TIER_LABEL), s.labels.get(names.MODEL_LABEL)
        if tier and model:
            opened[(tier, model)] = max(opened.get((tier, model), s.value), s.value)
    return Opens(max(s.value for s in since) if since else None, opened)


def opens_coverage(opens: Opens, window: float, now: float) -> Coverage:
    if opens.since is None:
        return Coverage(window_seconds=window, covered_seconds=0.0, blind=True)
    return Coverage(window_seconds=window, covered_seconds=min(max(now - opens.since, 0.0), window))


def _opened(facts: ModelFacts, opens: Opens, covered: bool, view: PolicyView, now: float) -> float | None:
    """The request figure opens give: min_requests (used), 0 (unused), None (unknown)."""
    last = opens.opened.get((facts.tier, facts.model))
    if last is not None and last >= now - view.timeframe_seconds:
        return view.min_requests
    return 0.0 if covered else None


def _used(requests: float | None, view: PolicyView) -> bool:
    return requests is not None and requests >= view.min_requests


def choose(
    facts: Sequence[ModelFacts],
    requests_coverage: Coverage,
    opens: Opens,
    source: str,
    view: PolicyView,
    now: float,
) -> tuple[list[ModelFacts], Coverage]:
    """The facts with each served model's usage from its source, and the coverage the policies see."""
    window = view.timeframe_seconds
    by_opens = opens_coverage(opens, window, now)
    if source == OPENS:
        coverage = by_opens
    else:
        # The policy runs when a source covers the window; models whose own source does not are unknown.
        coverage = requests_coverage if requests_coverage.complete or not by_opens.complete else by_opens
    requests_ok = requests_coverage.complete
    out: list[ModelFacts] = []
    for f in facts:
        if f.tier not in view.usage_tiers:
            out.append(f)
            continue
        opened = _opened(f, opens, by_opens.complete, view, now)
        requests = f.requests if requests_ok else None
        if source == OPENS or (source == "auto" and f.requests is None):
            out.append(replace(f, requests=opened, usage_source=OPENS))
        elif source == "auto":
            out.append(replace(f, requests=requests, usage_source=REQUESTS))
        elif _used(requests, view) or (not _used(opened, view) and requests is not None and opened is not None):
            # both: requests say used, or both sources know and neither says used.
            out.append(replace(f, requests=requests, usage_source=REQUESTS))
        elif _used(opened, view):
            out.append(replace(f, requests=opened, usage_source=OPENS))
        else:
            out.append(replace(f, requests=None, usage_source="requests+opens"))
    return out, coverage

"""Text and JSON renderings of a plan, of one model's explanation and of the effective policies."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cleaner.plan_values import Plan
from cleaner.policies import fmt_bytes, fmt_duration, fmt_requests

POLICY_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "age": (
        "evict models unchanged for longer than age_days, unless usage shows them in use",
        ("cleaner.age_days", "cleaner.age_tiers"),
    ),
    "usage": (
        "evict models of served tiers with fewer than min_requests in the timeframe",
        (
            "cleaner.min_requests",
            "cleaner.request_timeframe_days",
            "cleaner.usage_tiers",
            "cleaner.usage_query",
            "cleaner.usage_label",
        ),
    ),
    "size": (
        "above max_size_gb, evict down to low_watermark of it: fewest requests first, then largest",
        ("cleaner.max_size_gb", "cleaner.low_watermark", "cleaner.size_tiers"),
    ),
}
GUARD_KEYS = ("cleaner.grace_hours", "cleaner.protect", "cleaner.max_evict_fraction", "cleaner.max_evict_models")
PROMETHEUS_KEYS = (
    "cleaner.prometheus.url",
    "cleaner.prometheus.timeout_seconds",
    "cleaner.prometheus.matchers",
    "cleaner.prometheus.bearer_token",
    "cleaner.prometheus.username",
    "cleaner.prometheus.password",
)


def dumps(document: Any) -> str:
    """The stable JSON form: sorted keys, two-space indent (the same as the saved plan)."""
    return json.dumps(document, indent=2, sort_keys=True)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def render_plan(plan: Plan, saved_to: str = "") -> str:
    evidence = plan.evidence
    coverage = evidence.get("usage_coverage") or {}
    lines = [f"Plan {plan.plan_id}, {_when(plan.created_at)}, {evidence.get('models', '?')} models"]
    source = f"  from {evidence.get('prometheus_url', '?')}"
    if evidence.get("matchers"):
        source += f" {{{evidence['matchers']}}}"
    if coverage.get("queried"):
        source += (
            f"; usage data covers {fmt_duration(coverage['covered_seconds'])} "
            f"of {fmt_duration(coverage['window_seconds'])}"
        )
    lines.append(source)
    if saved_to:
        lines.append(f"  saved to {saved_to}")
    lines.append("")
    if plan.evictions:
        lines.append(f"Would evict {len(plan.evictions)} model{'s' if len(plan.evictions) != 1 else ''}:")
        rows = [["TIER", "MODEL", "SIZE", "AGE", "REQUESTS", "POLICY", "REASON"]]
        for e in plan.evictions:
            rows.append(
                [
                    e.tier,
                    e.model,
                    fmt_bytes(e.bytes),
                    fmt_duration(e.age_seconds),
                    "-" if e.requests is None else fmt_requests(e.requests),
                    e.policy,
                    e.reason,
                ]
            )
        lines.extend(_table(rows, right={2, 3, 4}))
    else:
        lines.append("Nothing to evict.")
    lines.append("")
    lines.append(
        f"Would free {fmt_bytes(plan.bytes_to_free)}: models total {fmt_bytes(plan.total_bytes_before)} "
        f"-> {fmt_bytes(plan.total_bytes_after)}"
    )
    if plan.kept:
        lines.append("")
        lines.append(f"Kept {len(plan.kept)} model{'s' if len(plan.kept) != 1 else ''}:")
        rows = [["TIER", "MODEL", "SIZE", "POLICY", "REASON"]]
        rows += [[k.tier, k.model, fmt_bytes(k.bytes), k.policy or "-", k.reason] for k in plan.kept]
        lines.extend(_table(rows, right={2}))
    if plan.warnings:
        lines.append("")
        lines.append("Warnings:")
        lines.extend(f"  - {w}" for w in plan.warnings)
    return "\n".join(lines) + "\n"


def render_explain(explanation: dict[str, Any]) -> str:
    e = explanation
    requests = "-" if e["requests"] is None else fmt_requests(e["requests"])
    lines = [
        f"{e['tier']}/{e['model']} in plan {e['plan_id']}",
        f"  {fmt_bytes(e['bytes'])} in {e['files']} files, changed {fmt_duration(e['age_seconds'])} ago "
        f"({_when(e['last_changed'])}), requests in window: {requests}"
        + (", partial download" if e["partial"] else ""),
    ]
    lines += [f"  {c['check']:<7} {c['verdict']:<8} {c['detail']}" for c in e["checks"]]
    outcome = e["outcome"]
    verdict = {"evict": "EVICT", "keep": "KEEP", "none": "KEEP"}[outcome["action"]]
    by = f" ({outcome['policy']})" if outcome.get("policy") else ""
    lines.append(f"  => {verdict}{by}: {outcome['reason']}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class ShownSettings:
    """What the `policies` listing shows of the settings (built by cleaner.commands.views)."""

    values: Mapping[str, object]  # by YAML key, secrets replaced (Settings.public())
    sources: Mapping[str, str]  # by YAML key: file or env; a key not in it is a default
    envs: Mapping[str, str]  # by YAML key: its environment variable
    enabled: tuple[str, ...]  # cleaner.policies


def _setting(settings: ShownSettings, key: str) -> dict[str, Any]:
    return {
        "key": key,
        "env": settings.envs[key],
        "value": settings.values[key],
        "source": settings.sources.get(key, "default"),
    }


def policies_document(settings: ShownSettings) -> dict[str, Any]:
    enabled = settings.enabled
    return {
        "policies": [
            {
                "name": name,
                "enabled": name in enabled,
                "description": description,
                "settings": [_setting(settings, key) for key in keys],
            }
            for name, (description, keys) in POLICY_KEYS.items()
        ],
        "enabled": _setting(settings, "cleaner.policies"),
        "guards": [_setting(settings, key) for key in GUARD_KEYS],
        "prometheus": [_setting(settings, key) for key in PROMETHEUS_KEYS],
    }


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "(none)"
    if isinstance(value, bool):
        return "set" if value else "(not set)"
    if value == "":
        return "(none)"
    return str(value)


def render_policies(settings: ShownSettings) -> str:
    doc = policies_document(settings)
    lines: list[str] = []

    def block(title: str, items: list[dict[str, Any]]) -> None:
        lines.append(title)
        # The value goes last: a long one (the usage query) must not widen the other columns.
        rows = [[s["key"], s["source"], s["env"], _value(s["value"])] for s in items]
        lines.extend(_table(rows, right=set()))

    for policy in doc["policies"]:
        state = "enabled" if policy["enabled"] else "disabled"
        block(f"{policy['name']} ({state}): {policy['description']}", policy["settings"])
        lines.append("")
    block("guards (every policy):", doc["guards"])
    lines.append("")
    block("prometheus:", doc["prometheus"])
    lines.append("")
    lines.append(
        f"enabled policies: {_value(doc['enabled']['value'])} ({doc['enabled']['source']}, {doc['enabled']['env']})"
    )
    return "\n".join(lines) + "\n"

"""`plan --explain`: each policy's verdict on one model and the plan's outcome for it. Pure, like the policies."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cleaner.plan_values import ModelFacts, Plan
from cleaner.policies import (
    Coverage,
    PolicyView,
    age_verdict,
    fmt_bytes,
    fmt_duration,
    fmt_requests,
    guard,
    served,
    usage_verdict,
    usage_words,
)


def find_models(facts: Iterable[ModelFacts], name: str) -> list[ModelFacts]:
    """`tier/model` names one model; a bare `model` names it in every tier that has it."""
    if "/" in name:
        return [f for f in facts if f.key == name]
    return [f for f in facts if f.model == name]


def explain(facts: ModelFacts, coverage: Coverage, view: PolicyView, now: float, plan: Plan) -> dict[str, Any]:
    """Each policy's verdict on one model, and the plan's outcome for it (size and caps need the whole store)."""
    checks: list[dict[str, str]] = []

    def check(name: str, verdict: str, detail: str) -> None:
        checks.append({"check": name, "verdict": verdict, "detail": detail})

    g = guard(facts, view, now)
    check(
        "guards", "keep" if g else "pass", g[1] if g else "not protected, no partial download, outside the grace period"
    )
    for policy in ("age", "usage", "size"):
        tiers = {"age": view.age_tiers, "usage": view.usage_tiers, "size": view.size_tiers}[policy]
        if not view.enabled(policy):
            check(policy, "off", "policy disabled")
        elif facts.tier not in tiers:
            check(policy, "n/a", f"tier {facts.tier} not in {policy} tiers ({', '.join(tiers) or 'none'})")
        elif policy == "age":
            verdict = age_verdict(facts, coverage, view, now)
            age = fmt_duration(max(now - facts.last_changed, 0.0))
            none = f"changed {age} ago (<= {fmt_duration(view.age_seconds)})"
            check("age", verdict[0] if verdict else "pass", verdict[2] if verdict else none)
        elif policy == "usage":
            if not coverage.complete:
                check("usage", "skipped", coverage.describe())
            else:
                verdict = usage_verdict(facts, view, now)
                enough = usage_words(facts, view)
                check("usage", verdict[0] if verdict else "pass", verdict[2] if verdict else enough)
        else:
            size = plan.evidence.get("size") or {}
            total, limit = size.get("total_bytes", 0), view.max_size_bytes
            rank = f"{fmt_bytes(facts.bytes)}, {fmt_requests(facts.requests) if served(facts, view) else 0} requests"
            if total <= limit:
                check(
                    "size", "pass", f"size tiers at {fmt_bytes(total)} after earlier policies, limit {fmt_bytes(limit)}"
                )
            else:
                check("size", "ranked", f"{rank}; size tiers at {fmt_bytes(total)} > limit {fmt_bytes(limit)}")
    outcome: dict[str, Any] = {"action": "none", "reason": "no policy selects it"}
    for e in plan.evictions:
        if (e.tier, e.model) == (facts.tier, facts.model):
            outcome = {"action": "evict", "policy": e.policy, "reason": e.reason}
    for k in plan.kept:
        if (k.tier, k.model) == (facts.tier, facts.model):
            outcome = {"action": "keep", "policy": k.policy, "reason": k.reason, "code": k.code}
    return {
        "plan_id": plan.plan_id,
        "tier": facts.tier,
        "model": facts.model,
        "bytes": facts.bytes,
        "files": facts.files,
        "last_changed": facts.last_changed,
        "age_seconds": max(now - facts.last_changed, 0.0),
        "requests": facts.requests if served(facts, view) else None,
        "usage_source": (facts.usage_source or "requests") if served(facts, view) else None,
        "partial": facts.partial,
        "coverage": coverage.to_json(),
        "checks": checks,
        "outcome": outcome,
    }

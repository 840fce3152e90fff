"""The pure decision core: every policy, watermarks, guards, coverage, blast radius and ties, without I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleaner.explain import explain, find_models
from cleaner.inventory import (
    attach_usage,
    coverage_query,
    format_duration,
    inventory_queries,
    parse_coverage,
    parse_inventory,
    parse_usage,
    usage_query,
)
from cleaner.plan_values import ModelFacts, Plan
from cleaner.policies import Coverage, PolicyView, decide, validate
from cleaner.prom import Sample
from shared.config import load_settings
from shared.errors import ConfigError
from shared.settings_table import DEFAULT_USAGE_QUERY
from shared.units import DAY_SECONDS, HOUR_SECONDS

NOW = 1_800_000_000.0
FULL = Coverage(window_seconds=7 * DAY_SECONDS, covered_seconds=7 * DAY_SECONDS, resolution_seconds=0)
PARTIAL = Coverage(window_seconds=7 * DAY_SECONDS, covered_seconds=2 * DAY_SECONDS, resolution_seconds=0)
# Only one policy at a time unless a test says otherwise; the caps only where a test sets them.
BASE = PolicyView(policies=(), allow_large=True)


def model(
    name: str,
    *,
    tier: str = "repository",
    days: float = 60,
    size: int = 1000,
    requests: float | None = 0.0,
    **extra: object,
) -> ModelFacts:
    return ModelFacts(
        tier=tier,
        model=name,
        bytes=size,
        files=1,
        last_changed=NOW - days * DAY_SECONDS,
        requests=requests if tier == "repository" else None,
        **extra,  # type: ignore[arg-type]
    )


def view(*policies: str, **changes: object) -> PolicyView:
    return replace(BASE, policies=policies, **changes)  # type: ignore[arg-type]


def evicted(decision: object) -> list[str]:
    return [f"{e.tier}/{e.model}" for e in decision.evictions]  # type: ignore[attr-defined]


def kept(decision: object) -> dict[str, str]:
    return {f"{k.tier}/{k.model}": k.reason for k in decision.kept}  # type: ignore[attr-defined]


# ---- age ----


def test_age_evicts_models_unchanged_for_longer_than_the_limit_oldest_first() -> None:
    facts = [model("new", tier="raw", days=10), model("old", tier="raw", days=40), model("older", tier="raw", days=90)]
    decision = decide(facts, FULL, view("age"), NOW)
    assert evicted(decision) == ["raw/older", "raw/old"]
    assert decision.evictions[0].policy == "age"
    assert "unchanged for 90.0 days (> 30.0 days)" in decision.evictions[0].reason


def test_age_keeps_an_old_model_that_is_still_served() -> None:
    facts = [model("busy", requests=500), model("idle", requests=2)]
    decision = decide(facts, FULL, view("age"), NOW)
    assert evicted(decision) == ["repository/idle"]
    assert kept(decision)["repository/busy"].startswith("in use: 500 requests")


def test_age_keeps_served_models_whose_usage_is_unknown() -> None:
    decision = decide([model("silent", requests=None)], FULL, view("age"), NOW)
    assert evicted(decision) == []
    assert "usage unknown" in kept(decision)["repository/silent"]


def test_age_with_short_usage_history_keeps_low_counts_but_trusts_high_ones() -> None:
    facts = [model("busy", requests=50), model("quiet", requests=0)]
    decision = decide(facts, PARTIAL, view("age"), NOW)
    assert evicted(decision) == []
    assert kept(decision)["repository/busy"].startswith("in use")
    assert "covers 2.0 days of the 7.0 days window" in kept(decision)["repository/quiet"]


def test_age_ignores_usage_in_tiers_that_are_not_served() -> None:
    decision = decide([model("q", tier="quantized", days=45)], PARTIAL, view("age"), NOW)
    assert evicted(decision) == ["quantized/q"]
    assert decision.evictions[0].requests is None


def test_age_respects_its_tiers() -> None:
    facts = [model("r", tier="raw"), model("q", tier="quantized")]
    assert evicted(decide(facts, FULL, view("age", age_tiers=("raw",)), NOW)) == ["raw/r"]


def test_age_boundary_is_strictly_older() -> None:
    facts = [model("edge", tier="raw", days=30)]
    assert evicted(decide(facts, FULL, view("age"), NOW)) == []


# ---- usage ----


def test_usage_evicts_models_below_the_minimum_fewest_requests_first_then_largest() -> None:
    facts = [
        model("nine", requests=9),
        model("zero-small", requests=0, size=10),
        model("zero-big", requests=0, size=99),
        model("ten", requests=10),
    ]
    decision = decide(facts, FULL, view("usage"), NOW)
    assert evicted(decision) == ["repository/zero-big", "repository/zero-small", "repository/nine"]
    assert decision.evictions[0].reason == "0 requests in 7.0 days (< 10)"


def test_usage_never_evicts_a_model_younger_than_the_window() -> None:
    decision = decide([model("fresh", days=3, requests=0)], FULL, view("usage"), NOW)
    assert evicted(decision) == []
    assert "younger than the usage window" in kept(decision)["repository/fresh"]


def test_usage_is_skipped_with_a_warning_when_data_does_not_cover_the_window() -> None:
    decision = decide([model("idle", requests=0)], PARTIAL, view("usage"), NOW)
    assert evicted(decision) == []
    assert any(
        "usage policy skipped: usage data covers 2.0 days of the 7.0 days window" in w for w in decision.warnings
    )


def test_usage_missing_for_a_model_means_keep_not_zero() -> None:
    decision = decide([model("unknown", requests=None)], FULL, view("usage"), NOW)
    assert evicted(decision) == []
    assert "usage unknown" in kept(decision)["repository/unknown"]


def test_usage_only_looks_at_its_tiers() -> None:
    facts = [model("r", tier="raw"), model("s", requests=0)]
    assert evicted(decide(facts, FULL, view("usage"), NOW)) == ["repository/s"]
    assert evicted(decide(facts, FULL, view("usage", usage_tiers=()), NOW)) == []


def test_coverage_is_complete_within_its_resolution() -> None:
    assert Coverage(100, 95, resolution_seconds=5).complete
    assert not Coverage(100, 94, resolution_seconds=5).complete
    assert not Coverage(100, 100, queried=False).complete


# ---- size ----


def test_size_does_nothing_at_or_below_the_limit() -> None:
    facts = [model("a", size=600), model("b", size=400)]
    decision = decide(facts, FULL, view("size", max_size_bytes=1000), NOW)
    assert evicted(decision) == []


def test_size_above_the_limit_evicts_down_to_the_low_watermark() -> None:
    facts = [model(f"m{i}", tier="raw", size=100, days=60 + i) for i in range(12)]
    decision = decide(facts, FULL, view("size", max_size_bytes=1100, low_watermark=0.5), NOW)
    # 1200 > 1100: evict down to 550, i.e. seven models of 100, the oldest first among equals.
    assert len(decision.evictions) == 7
    assert evicted(decision)[0] == "raw/m11"
    assert decision.total_bytes_before - decision.evictions[0].bytes * 7 <= 550


def test_size_orders_by_usage_then_size_then_age_then_name() -> None:
    facts = [
        model("busy-huge", size=5000, requests=100),
        model("idle-small", size=100, requests=0),
        model("idle-big", size=900, requests=0),
        model("tie-b", size=500, requests=3, days=50),
        model("tie-a", size=500, requests=3, days=50),
        model("tie-old", size=500, requests=3, days=80),
    ]
    decision = decide(facts, FULL, view("size", max_size_bytes=1, low_watermark=1.0), NOW)
    assert evicted(decision) == [
        "repository/idle-big",
        "repository/idle-small",
        "repository/tie-old",
        "repository/tie-a",
        "repository/tie-b",
        "repository/busy-huge",
    ]


def test_size_counts_unserved_tiers_as_zero_requests_and_keeps_unknown_usage() -> None:
    facts = [
        model("raw-big", tier="raw", size=3000),
        model("used", size=2000, requests=50),
        model("unknown", size=9500, requests=None),
    ]
    decision = decide(facts, FULL, view("size", max_size_bytes=10_000, low_watermark=0.9), NOW)
    assert evicted(decision) == ["raw/raw-big", "repository/used"]
    assert "usage unknown" in kept(decision)["repository/unknown"]
    assert any("still above the low mark" in w for w in decision.warnings)


def test_size_counts_what_earlier_policies_already_free() -> None:
    facts = [model("old", tier="raw", size=600, days=90), model("keep", tier="raw", size=500, days=1.5)]
    decision = decide(facts, FULL, view("age", "size", max_size_bytes=1000), NOW)
    assert evicted(decision) == ["raw/old"]
    assert decision.evictions[0].policy == "age"


def test_size_respects_its_tiers() -> None:
    facts = [model("r", tier="raw", size=5000), model("q", tier="quantized", size=10)]
    decision = decide(facts, FULL, view("size", max_size_bytes=100, size_tiers=("quantized",)), NOW)
    assert evicted(decision) == []


# ---- guards ----


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"hold": "protected: .keep marker in the model directory"}, "protected: .keep marker"),
        ({"partial": True}, "partial download in progress"),
        ({"last_changed": NOW - 3 * HOUR_SECONDS}, "grace: changed 3.0 h ago"),
    ],
)
def test_guards_beat_every_policy(changes: dict[str, object], reason: str) -> None:
    guarded = replace(model("g", tier="raw", size=10**6, days=90), **changes)  # type: ignore[arg-type]
    other = model("other", tier="raw", size=10, days=90)
    everything = view("age", "usage", "size", max_size_bytes=1, age_seconds=HOUR_SECONDS)
    decision = decide([guarded, other], FULL, everything, NOW)
    assert evicted(decision) == ["raw/other"]
    assert kept(decision)["raw/g"].startswith(reason)


def test_protect_globs_match_tier_slash_model_or_a_bare_model_name() -> None:
    facts = [model("llama-7b", tier="raw"), model("llama-13b"), model("mistral", tier="quantized")]
    decision = decide(facts, FULL, view("age", protect=("raw/llama-*", "mis*")), NOW)
    assert evicted(decision) == ["repository/llama-13b"]
    assert kept(decision)["raw/llama-7b"] == "protected: matches protect glob 'raw/llama-*'"
    assert kept(decision)["quantized/mistral"] == "protected: matches protect glob 'mis*'"


def test_protected_models_are_listed_even_when_no_policy_selects_them() -> None:
    decision = decide(
        [model("young", days=1, hold="protected: .keep marker in the model directory", hold_code="protected")],
        FULL,
        BASE,
        NOW,
    )
    assert "repository/young" in kept(decision)


# ---- blast radius ----


def test_blast_radius_caps_bytes_in_plan_order_and_allow_large_lifts_it() -> None:
    facts = [model(f"m{i}", tier="raw", size=100, days=100 - i) for i in range(10)]
    capped = decide(facts, FULL, view("age", max_evict_fraction=0.5, allow_large=False), NOW)
    assert evicted(capped) == [f"raw/m{i}" for i in range(5)]
    assert all("blast radius" in kept(capped)[f"raw/m{i}"] for i in range(5, 10))
    assert any("rerun with --allow-large" in w for w in capped.warnings)
    free = decide(facts, FULL, view("age", max_evict_fraction=0.5, allow_large=True), NOW)
    assert len(free.evictions) == 10


def test_blast_radius_caps_the_number_of_models() -> None:
    facts = [model(f"m{i}", tier="raw", size=1, days=100 - i) for i in range(10)]
    decision = decide(facts, FULL, view("age", max_evict_models=3, allow_large=False), NOW)
    assert evicted(decision) == ["raw/m0", "raw/m1", "raw/m2"]


def test_a_model_is_evicted_once_by_the_first_policy() -> None:
    facts = [model("idle", requests=0, days=90, size=10**6)]
    decision = decide(facts, FULL, view("age", "usage", "size", max_size_bytes=1), NOW)
    assert [(e.model, e.policy) for e in decision.evictions] == [("idle", "age")]
    assert decision.kept == ()


# ---- properties ----

names = st.sampled_from([f"m{i}" for i in range(8)])
tiers = st.sampled_from(["raw", "quantized", "repository"])
facts_lists = st.lists(
    st.builds(
        lambda tier, name, size, days, requests, partial, keep: model(
            name,
            tier=tier,
            size=size,
            days=days,
            requests=requests,
            partial=partial,
            hold="protected: .keep" if keep else "",
            hold_code="protected" if keep else "",
        ),
        tiers,
        names,
        st.integers(0, 10**6),
        st.floats(0, 100),
        st.one_of(st.none(), st.floats(0, 100)),
        st.booleans(),
        st.booleans(),
    ),
    max_size=20,
    unique_by=lambda f: f.key,
)


@settings(max_examples=300, deadline=None)
@given(
    facts_lists,
    st.booleans(),
    st.floats(0.05, 0.99),
    st.integers(1, 20),
    st.floats(0.01, 1.0),
)
def test_plans_never_break_guards_or_caps(
    facts: list[ModelFacts], full: bool, fraction: float, max_models: int, low: float
) -> None:
    v = view(
        "age",
        "usage",
        "size",
        max_size_bytes=2 * 10**6,
        low_watermark=low,
        max_evict_fraction=fraction,
        max_evict_models=max_models,
        allow_large=False,
    )
    coverage = FULL if full else PARTIAL
    decision = decide(facts, coverage, v, NOW)
    by_key = {f.key: f for f in facts}
    keys = evicted(decision)
    assert len(keys) == len(set(keys))
    assert not set(keys) & set(kept(decision))
    for key in keys:
        f = by_key[key]
        assert not f.partial and not f.hold
        assert NOW - f.last_changed >= v.grace_seconds
    assert len(keys) <= max_models
    assert sum(e.bytes for e in decision.evictions) <= fraction * decision.total_bytes_before
    if not full:
        assert all(e.policy != "usage" for e in decision.evictions)
    assert decide(list(reversed(facts)), coverage, v, NOW) == decision


# ---- validation at load time ----


def test_validate_refuses_a_blast_radius_of_the_whole_store() -> None:
    settings = load_settings(env={"STORAGE_CLEANUP_MAX_EVICT_FRACTION": "1"})
    with pytest.raises(ConfigError, match="max_evict_fraction=1: would let one run evict the whole store"):
        validate(settings.cleaner)


def test_config_refuses_age_zero() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={"STORAGE_CLEANUP_AGE_DAYS": "0"})
    assert err.value.exit_code == 2


def test_validate_refuses_a_zero_byte_low_mark() -> None:
    settings = load_settings(env={"STORAGE_CLEANUP_MAX_SIZE_GB": "0.0000000001"})
    with pytest.raises(ConfigError, match="low mark is 0 bytes"):
        validate(settings.cleaner)


def test_validate_refuses_unknown_placeholders_but_allows_label_replace_groups() -> None:
    bad = load_settings(env={"STORAGE_USAGE_QUERY": "sum(increase(x{$matcher}[$window]))"})
    with pytest.raises(ConfigError, match=r"unknown placeholder \$matcher"):
        validate(bad.cleaner)
    ok = 'sum by (model) (label_replace(increase(x[$window]), "model", "$1", "name", "(.*)"))'
    validate(load_settings(env={"STORAGE_USAGE_QUERY": ok}).cleaner)
    validate(load_settings(env={}).cleaner)


def test_fractional_durations_scale_policies_down_to_seconds() -> None:
    v = PolicyView.from_settings(load_settings(env={"STORAGE_CLEANUP_AGE_DAYS": "0.0005"}).cleaner)
    assert v.age_seconds == pytest.approx(43.2)


# ---- queries and their answers (pure) ----


def test_durations_are_whole_promql_units() -> None:
    assert format_duration(7 * DAY_SECONDS) == "7d"
    assert format_duration(43.2) == "43200ms"
    assert format_duration(90) == "90s"
    assert format_duration(3600) == "1h"
    assert format_duration(0.0001) == "1ms"


def test_every_selector_carries_the_extra_matchers() -> None:
    matchers = 'instance="a:8470"'
    for expr in inventory_queries(matchers).values():
        assert '{instance="a:8470"}' in expr
    usage = usage_query(DEFAULT_USAGE_QUERY, 7 * DAY_SECONDS, matchers)
    assert usage.count(',instance="a:8470"}[7d]') == 4
    assert "$" not in usage_query(DEFAULT_USAGE_QUERY, 60, "")
    coverage = coverage_query(DEFAULT_USAGE_QUERY, 20 * 60, "")
    assert coverage.startswith("min_over_time(timestamp(count(") and coverage.endswith("[20m:1m])")
    assert "[4m]" in coverage


def test_inventory_dedupes_several_exporters_and_reads_missing_change_time_as_now() -> None:
    a1 = {"tier": "raw", "model": "a", "instance": "x"}
    a2 = {"tier": "raw", "model": "a", "instance": "y"}
    b = {"tier": "repository", "model": "b"}
    facts = parse_inventory(
        [Sample(a1, 10), Sample(a2, 12), Sample(b, 5), Sample({"tier": "other", "model": "z"}, 1)],
        [Sample(a1, 2)],
        [Sample(a1, 100.0)],
        NOW,
    )
    assert [(f.key, f.bytes, f.files, f.last_changed) for f in facts] == [
        ("raw/a", 12, 2, 100.0),
        ("repository/b", 5, 0, NOW),
    ]


def test_usage_is_attached_to_served_tiers_only_and_missing_models_stay_unknown() -> None:
    usage = parse_usage([Sample({"model": "a"}, 3), Sample({"model": "a"}, 4), Sample({"x": "y"}, 9)], "model")
    assert usage == {"a": 7}
    facts = attach_usage([model("a"), model("b"), model("a", tier="raw")], usage, ("repository",))
    assert [f.requests for f in facts] == [7, None, None]


def test_coverage_is_read_from_the_oldest_timestamp() -> None:
    window = 7 * DAY_SECONDS
    assert parse_coverage([Sample({}, NOW - 2 * DAY_SECONDS)], window, NOW).covered_seconds == 2 * DAY_SECONDS
    assert parse_coverage([], window, NOW).covered_seconds == 0
    full = parse_coverage([Sample({}, NOW - window + 3600)], window, NOW)
    assert full.complete and full.resolution_seconds == window / 20


# ---- explain ----


def test_explain_names_each_check_and_the_plans_outcome() -> None:
    facts = [model("idle", requests=0), model("busy", requests=99)]
    v = view("age", "usage")
    decision = decide(facts, FULL, v, NOW)
    plan = Plan("p", NOW, decision.evictions, decision.kept, decision.total_bytes_before)
    idle = explain(find_models(facts, "idle")[0], FULL, v, NOW, plan)
    assert idle["outcome"]["action"] == "evict" and idle["outcome"]["policy"] == "age"
    assert [c["check"] for c in idle["checks"]] == ["guards", "age", "usage", "size"]
    assert idle["checks"][3]["verdict"] == "off"
    busy = explain(find_models(facts, "repository/busy")[0], FULL, v, NOW, plan)
    assert busy["outcome"]["action"] == "keep" and busy["outcome"]["reason"].startswith("in use")

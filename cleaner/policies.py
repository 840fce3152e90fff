"""The pure decision core: from (inventory, usage coverage, settings, now) to evictions and reasons. No I/O, no clock.

Order of work, which docs/cleaner.md documents:
1. Guards beat every policy: protected (a `protect` glob or a `.keep` marker), a partial download,
   a change within the grace period. A guarded model is never evicted; the plan says why.
2. age (oldest first), then usage (fewest requests, then largest), then size (see `size_order`).
   A model is evicted once, by the first policy that selects it.
3. Blast radius: evictions are taken in that order until the next one would cross the byte share
   or model count cap; it and everything after it is kept, unless `allow_large`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cleaner.plan_values import Eviction, Kept, ModelFacts
from shared.errors import ConfigError
from shared.reasons import Reason, sentence
from shared.typed_settings import CleanerSettings
from shared.units import DAY_SECONDS, GB, HOUR_SECONDS

USAGE_PLACEHOLDERS = ("window", "matchers")
_PLACEHOLDER = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")


@dataclass(frozen=True, slots=True)
class PolicyView:
    """The settings the decision needs, in seconds and bytes."""

    policies: tuple[str, ...] = ("age", "usage", "size")
    age_seconds: float = 30 * DAY_SECONDS
    age_tiers: tuple[str, ...] = ("raw", "quantized", "repository")
    min_requests: float = 10.0
    timeframe_seconds: float = 7 * DAY_SECONDS
    usage_tiers: tuple[str, ...] = ("repository",)
    max_size_bytes: int = 10 * GB
    size_tiers: tuple[str, ...] = ("raw", "quantized", "repository")
    low_watermark: float = 0.9
    grace_seconds: float = 24 * HOUR_SECONDS
    max_evict_fraction: float = 0.5
    max_evict_models: int = 100
    protect: tuple[str, ...] = ()
    allow_large: bool = False

    @classmethod
    def from_settings(cls, cleaner: CleanerSettings, *, allow_large: bool = False) -> PolicyView:
        return cls(
            policies=cleaner.policies,
            age_seconds=cleaner.age_days * DAY_SECONDS,
            age_tiers=cleaner.age_tiers,
            min_requests=cleaner.min_requests,
            timeframe_seconds=cleaner.request_timeframe_days * DAY_SECONDS,
            usage_tiers=cleaner.usage_tiers,
            max_size_bytes=round(cleaner.max_size_gb * GB),
            size_tiers=cleaner.size_tiers,
            low_watermark=cleaner.low_watermark,
            grace_seconds=cleaner.grace_hours * HOUR_SECONDS,
            max_evict_fraction=cleaner.max_evict_fraction,
            max_evict_models=cleaner.max_evict_models,
            protect=cleaner.protect,
            allow_large=allow_large,
        )

    @property
    def low_mark_bytes(self) -> int:
        return int(self.max_size_bytes * self.low_watermark)

    def enabled(self, policy: str) -> bool:
        return policy in self.policies

    def needs_usage(self) -> bool:
        """Usage is queried only when a policy reads it: usage itself, or age on a served tier."""
        if not self.usage_tiers:
            return False
        served_age = self.enabled("age") and bool(set(self.age_tiers) & set(self.usage_tiers))
        return self.enabled("usage") or served_age or self.enabled("size")

    def to_json(self) -> dict[str, Any]:
        return {
            "policies": list(self.policies),
            "age_seconds": self.age_seconds,
            "age_tiers": list(self.age_tiers),
            "min_requests": self.min_requests,
            "timeframe_seconds": self.timeframe_seconds,
            "usage_tiers": list(self.usage_tiers),
            "max_size_bytes": self.max_size_bytes,
            "low_mark_bytes": self.low_mark_bytes,
            "size_tiers": list(self.size_tiers),
            "grace_seconds": self.grace_seconds,
            "max_evict_fraction": self.max_evict_fraction,
            "max_evict_models": self.max_evict_models,
            "protect": list(self.protect),
            "allow_large": self.allow_large,
        }


@dataclass(frozen=True, slots=True)
class Coverage:
    """How far back the usage data reaches inside the window, measured to within `resolution_seconds`."""

    window_seconds: float
    covered_seconds: float
    resolution_seconds: float = 0.0
    queried: bool = True
    # Queried, and no usage series at all in the window (a fresh install with no model server yet):
    # the usage policy is blind, so everything it would judge is kept.
    blind: bool = False

    @property
    def complete(self) -> bool:
        return self.queried and not self.blind and self.covered_seconds + self.resolution_seconds >= self.window_seconds

    def describe(self) -> str:
        if not self.queried:
            return "usage not queried (no enabled policy reads it)"
        if self.blind:
            return f"no usage series at all in the {fmt_duration(self.window_seconds)} window (usage blind)"
        return (
            f"usage data covers {fmt_duration(self.covered_seconds)} of the {fmt_duration(self.window_seconds)} window"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "queried": self.queried,
            "window_seconds": self.window_seconds,
            "covered_seconds": self.covered_seconds,
            "resolution_seconds": self.resolution_seconds,
            "complete": self.complete,
            "blind": self.blind,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    evictions: tuple[Eviction, ...]
    kept: tuple[Kept, ...]
    total_bytes_before: int
    warnings: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)


# ---- formatting shared with the report (pure) ----------------------------------------------


def fmt_bytes(n: float) -> str:
    """Decimal units, as the capacity settings are in GB = 10**9 bytes."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_duration(seconds: float) -> str:
    if seconds >= DAY_SECONDS:
        return f"{seconds / DAY_SECONDS:.1f} days"
    if seconds >= HOUR_SECONDS:
        return f"{seconds / HOUR_SECONDS:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def fmt_requests(requests: float | None) -> str:
    if requests is None:
        return "unknown"
    return f"{requests:.0f}" if requests >= 10 or requests == int(requests) else f"{requests:.1f}"


# ---- validation at load time ---------------------------------------------------------------


def validate(cleaner: CleanerSettings) -> None:
    """Refuse configurations that could empty the store or cannot be expanded; ConfigError (exit 2)."""
    fraction = cleaner.max_evict_fraction
    if fraction >= 1:
        raise ConfigError(
            f"config: cleaner.max_evict_fraction={fraction:g}: would let one run evict the whole store",
            hint="use a share below 1 and --allow-large for a deliberate large cleanup",
        )
    view = PolicyView.from_settings(cleaner)
    if view.enabled("size") and view.size_tiers and view.low_mark_bytes < 1:
        raise ConfigError(
            f"config: cleaner.max_size_gb={cleaner.max_size_gb:g} with low_watermark="
            f"{view.low_watermark:g}: the low mark is 0 bytes, the size policy would evict everything"
        )
    template = cleaner.usage_query
    for match in _PLACEHOLDER.finditer(template):
        name = match.group(1) or match.group(2)
        if name not in USAGE_PLACEHOLDERS:
            raise ConfigError(
                f"config: cleaner.usage_query: unknown placeholder ${name}",
                hint="the template knows $window and $matchers",
            )


# ---- the decision --------------------------------------------------------------------------


def protection(facts: ModelFacts, globs: Sequence[str]) -> str:
    """Why a model is protected, or "" if it is not. A glob without `/` matches the model name in any tier."""
    for glob in globs:
        target = facts.key if "/" in glob else facts.model
        if fnmatch.fnmatchcase(target, glob):
            return sentence(Reason.PROTECTED, f"matches protect glob {glob!r}")
    if facts.hold_code == Reason.PROTECTED:
        return facts.hold
    return ""


Why = tuple[Reason, str]  # a code and the sentence derived from it
Verdict = tuple[str, Reason | None, str]  # ("evict"|"keep", the keep code, the sentence)


def guard(facts: ModelFacts, view: PolicyView, now: float) -> Why | None:
    """Why no policy may evict this model, or None when policies may."""
    protected = protection(facts, view.protect)
    if protected:
        return Reason.PROTECTED, protected
    if facts.hold:
        return Reason(facts.hold_code or Reason.UNREADABLE), facts.hold
    if facts.partial:
        return Reason.PARTIAL_DOWNLOAD, sentence(
            Reason.PARTIAL_DOWNLOAD, "*.incomplete, *.partial, *.tmp or .lock inside"
        )
    changed_ago = now - facts.last_changed
    if changed_ago < view.grace_seconds:
        return Reason.GRACE, sentence(
            Reason.GRACE,
            f"changed {fmt_duration(max(changed_ago, 0.0))} ago, within the "
            f"{fmt_duration(view.grace_seconds)} grace period",
        )
    return None


def served(facts: ModelFacts, view: PolicyView) -> bool:
    return facts.tier in view.usage_tiers


def size_order(facts: ModelFacts, view: PolicyView) -> tuple[float, int, float, str]:
    """Size policy order: fewest requests first (unserved tiers count 0), then largest, then oldest, then name."""
    requests = facts.requests if served(facts, view) and facts.requests is not None else 0.0
    return (requests, -facts.bytes, facts.last_changed, facts.key)


def usage_words(facts: ModelFacts, view: PolicyView) -> str:
    """The model's usage in the words of the source that gave it (cleaner/usage_source.py)."""
    window = fmt_duration(view.timeframe_seconds)
    used = facts.requests is not None and facts.requests >= view.min_requests
    if facts.usage_source == "opens":
        return f"{'opened' if used else 'not opened'} in {window} (usage source: last opened)"
    words = f"{fmt_requests(facts.requests)} requests in {window} ({'>=' if used else '<'} {view.min_requests:g})"
    return f"{words} (usage source: requests)" if facts.usage_source else words


def unknown_words(facts: ModelFacts) -> str:
    if facts.usage_source == "opens":
        return (
            "not opened since opens tracking began, which does not cover the usage window (usage source: last opened)"
        )
    if facts.usage_source == "requests+opens":
        return "neither request counters nor last opened cover the usage window for this model"
    return "no usage series for this model"


def usage_order(facts: ModelFacts) -> tuple[float, int, str]:
    return (facts.requests if facts.requests is not None else float("inf"), -facts.bytes, facts.key)


class _Builder:
    """Collects the first eviction per model and the latest keep reason for the rest."""

    def __init__(self, now: float, view: PolicyView) -> None:
        self.now = now
        self.view = view
        self.evicted: dict[str, Eviction] = {}
        self.kept: dict[str, Kept] = {}

    def evict(self, facts: ModelFacts, policy: str, reason: str) -> None:
        self.kept.pop(facts.key, None)
        self.evicted[facts.key] = Eviction(
            tier=facts.tier,
            model=facts.model,
            bytes=facts.bytes,
            files=facts.files,
            last_changed=facts.last_changed,
            age_seconds=max(self.now - facts.last_changed, 0.0),
            # Opens give the policies a stand-in figure, not a count of requests (cleaner/usage_source.py).
            requests=facts.requests if served(facts, self.view) and facts.usage_source != "opens" else None,
            policy=policy,
            reason=reason,
        )

    def keep(self, facts: ModelFacts, why: Why, policy: str | None) -> None:
        if facts.key not in self.evicted and facts.key not in self.kept:
            self.kept[facts.key] = Kept(facts.tier, facts.model, facts.bytes, why[1], policy, why[0])


def age_verdict(facts: ModelFacts, coverage: Coverage, view: PolicyView, now: float) -> Verdict | None:
    """("evict"|"keep", reason) when the age policy selects this model; None when it does not apply."""
    age = now - facts.last_changed
    if facts.tier not in view.age_tiers or age <= view.age_seconds:
        return None
    old = f"unchanged for {fmt_duration(age)} (> {fmt_duration(view.age_seconds)})"
    if not served(facts, view):
        return "evict", None, old
    if facts.requests is not None and facts.requests >= view.min_requests:
        return "keep", Reason.ENOUGH_REQUESTS, sentence(Reason.ENOUGH_REQUESTS, usage_words(facts, view))
    if facts.requests is None:
        return "keep", Reason.UNKNOWN_USAGE, sentence(Reason.UNKNOWN_USAGE, f"{unknown_words(facts)}; {old}")
    if not coverage.complete:
        return "keep", Reason.UNKNOWN_USAGE, sentence(Reason.UNKNOWN_USAGE, f"{coverage.describe()}; {old}")
    return "evict", None, f"{old}, {usage_words(facts, view)}"


def usage_verdict(facts: ModelFacts, view: PolicyView, now: float) -> Verdict | None:
    """The usage policy's view of a model of a served tier (coverage is checked by the caller)."""
    if not served(facts, view):
        return None
    if facts.requests is None:
        return "keep", Reason.UNKNOWN_USAGE, sentence(Reason.UNKNOWN_USAGE, unknown_words(facts))
    if facts.requests >= view.min_requests:
        return None
    few = usage_words(facts, view)
    age = now - facts.last_changed
    if age < view.timeframe_seconds:
        young = f"{few}, but changed {fmt_duration(max(age, 0.0))} ago"
        return "keep", Reason.YOUNGER_THAN_WINDOW, sentence(Reason.YOUNGER_THAN_WINDOW, young)
    return "evict", None, few


def decide(facts: Sequence[ModelFacts], coverage: Coverage, view: PolicyView, now: float) -> Decision:
    """The plan's evictions and kept models; deterministic for the same inputs."""
    build = _Builder(now, view)
    warnings: list[str] = []
    notes: dict[str, Any] = {}
    guards = {f.key: guard(f, view, now) for f in facts}
    for f in facts:
        g = guards[f.key]
        if g is not None and g[0] is Reason.PROTECTED:
            build.keep(f, g, None)

    def select(f: ModelFacts, policy: str, verdict: Verdict | None) -> None:
        if verdict is None or f.key in build.evicted:
            return
        action, code, reason = verdict
        g = guards[f.key]
        if action == "evict" and g is not None:
            build.keep(f, g, policy)
        elif action == "evict":
            build.evict(f, policy, reason)
        else:
            build.keep(f, (code or Reason.UNKNOWN_USAGE, reason), policy)

    if view.enabled("age"):
        for f in sorted(facts, key=lambda m: (m.last_changed, m.key)):
            select(f, "age", age_verdict(f, coverage, view, now))

    if view.enabled("usage") and view.usage_tiers:
        if coverage.complete:
            for f in sorted(facts, key=usage_order):
                select(f, "usage", usage_verdict(f, view, now))
        else:
            warnings.append(f"usage policy skipped: {coverage.describe()}; missing data is never read as zero requests")

    if view.enabled("size") and view.size_tiers:
        _size(facts, view, guards, build, warnings, notes, select)

    evictions = list(build.evicted.values())
    total_before = sum(f.bytes for f in facts)
    if not view.allow_large:
        evictions = _cap(evictions, total_before, view, build, warnings)
    kept = tuple(sorted(build.kept.values(), key=lambda k: (k.tier, k.model)))
    return Decision(tuple(evictions), kept, total_before, tuple(warnings), notes)


def _size(
    facts: Sequence[ModelFacts],
    view: PolicyView,
    guards: dict[str, Why | None],
    build: _Builder,
    warnings: list[str],
    notes: dict[str, Any],
    select: Any,
) -> None:
    in_tiers = [f for f in facts if f.tier in view.size_tiers]
    total = sum(f.bytes for f in in_tiers) - sum(f.bytes for f in in_tiers if f.key in build.evicted)
    limit, low = view.max_size_bytes, view.low_mark_bytes
    notes["size"] = {"tiers": list(view.size_tiers), "total_bytes": total, "limit_bytes": limit, "low_bytes": low}
    if total <= limit:
        return
    start = total
    for f in sorted(in_tiers, key=lambda m: size_order(m, view)):
        if total <= low:
            break
        if f.key in build.evicted:
            continue
        if served(f, view) and f.requests is None and guards[f.key] is None:
            select(
                f,
                "size",
                ("keep", Reason.UNKNOWN_USAGE, sentence(Reason.UNKNOWN_USAGE, "no usage series for this model")),
            )
            continue
        reason = (
            f"{'+'.join(view.size_tiers)} at {fmt_bytes(total)} > limit {fmt_bytes(limit)}: evicting down to "
            f"{fmt_bytes(low)}, fewest requests then largest first"
        )
        if served(f, view):
            reason += f" ({usage_words(f, view) if f.usage_source else f'{fmt_requests(f.requests)} requests'})"
        select(f, "size", ("evict", None, reason))
        if f.key in build.evicted:
            total -= f.bytes
    notes["size"]["after_bytes"] = total
    if total > low:
        warnings.append(
            f"size policy: {fmt_bytes(total)} still above the low mark {fmt_bytes(low)} "
            f"(from {fmt_bytes(start)}) after every model it may evict"
        )


def _cap(
    evictions: list[Eviction], total_before: int, view: PolicyView, build: _Builder, warnings: list[str]
) -> list[Eviction]:
    max_bytes = view.max_evict_fraction * total_before
    taken: list[Eviction] = []
    freed = 0
    for index, e in enumerate(evictions):
        if len(taken) + 1 > view.max_evict_models or freed + e.bytes > max_bytes:
            rest = evictions[index:]
            why = sentence(
                Reason.BLAST_RADIUS,
                f"evicting it would exceed {view.max_evict_fraction:.0%} of the models' bytes "
                f"({fmt_bytes(max_bytes)}) or {view.max_evict_models} models in one run; use --allow-large",
            )
            for r in rest:
                del build.evicted[f"{r.tier}/{r.model}"]
                build.kept[f"{r.tier}/{r.model}"] = Kept(r.tier, r.model, r.bytes, why, r.policy, Reason.BLAST_RADIUS)
            warnings.append(
                f"blast radius: kept {len(rest)} of {len(evictions)} selected models "
                f"({fmt_bytes(sum(r.bytes for r in rest))}); rerun with --allow-large to evict them"
            )
            break
        taken.append(e)
        freed += e.bytes
    return taken

"""The planning shell: a fixed number of Prometheus queries, read-only filesystem checks, then the pure decision."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cleaner.inventory import Inventory, fetch
from cleaner.plan_store import new_plan_id
from cleaner.plan_values import ModelFacts, Plan
from cleaner.policies import Coverage, Decision, PolicyView, decide
from cleaner.prom import PromClient
from cleaner.store_paths import StorePaths
from cleaner.walk import walk_selected
from shared.logs import get_logger
from shared.reasons import Reason, sentence
from shared.typed_settings import CleanerSettings

PARTIAL_SUFFIXES = (".incomplete", ".partial", ".tmp", ".lock")
KEEP_MARKER = ".keep"
# Each round checks only models newly selected; a partial one found makes the size policy pick another.
MAX_CHECK_ROUNDS = 50

log = get_logger("cleaner.plan_build")


@dataclass(frozen=True, slots=True)
class Planned:
    """The plan plus what it was decided on, for `--explain`."""

    plan: Plan
    facts: tuple[ModelFacts, ...]
    coverage: Coverage
    view: PolicyView


def model_dir(paths: StorePaths, facts: ModelFacts) -> Path:
    return paths.models_path / paths.layout.dir_for_tier(facts.tier) / facts.model


def check_partial(paths: StorePaths, facts: ModelFacts) -> ModelFacts:
    """A selected model, checked on disk: a partial download in it, and what evicting it frees.

    The exporter charges an inode shared by several models once; evicting one of them frees only
    the bytes whose last link it holds (cleaner.walk), which is what the run re-checks too.
    """
    path = model_dir(paths, facts)
    try:
        if not path.is_dir():
            return replace(facts, partial=path.name.endswith(PARTIAL_SUFFIXES))
        if path.name.endswith(PARTIAL_SUFFIXES):
            return replace(facts, partial=True)
        found, freed = walk_selected(path, PARTIAL_SUFFIXES)
    except FileNotFoundError:
        return facts  # gone since the scrape: applying will find nothing to move
    except OSError as err:
        why = f"cannot check for partial downloads: {err.strerror}"
        return replace(facts, hold=sentence(Reason.UNREADABLE, why), hold_code=Reason.UNREADABLE)
    return replace(facts, partial=found is not None, bytes=freed)


def mark_kept(paths: StorePaths, facts: Sequence[ModelFacts]) -> list[ModelFacts]:
    """`.keep` markers are one lstat per model, so every model is checked and the plan can list them."""
    marked = []
    for f in facts:
        if os.path.lexists(model_dir(paths, f) / KEEP_MARKER):
            f = replace(
                f,
                hold=sentence(Reason.PROTECTED, f"{KEEP_MARKER} marker in the model directory"),
                hold_code=Reason.PROTECTED,
            )
        marked.append(f)
    return marked


def decide_with_disk_checks(
    paths: StorePaths, facts: Sequence[ModelFacts], coverage: Coverage, view: PolicyView, now: float
) -> tuple[Decision, list[ModelFacts]]:
    """Decide; check selected models for partial downloads; decide again until no new model is selected.

    Walking every model's files would cost as much as a scan; only the few selected ones are walked.
    """
    current = mark_kept(paths, facts)
    checked: set[str] = set()
    unlimited = replace(view, allow_large=True)  # see past the cap, so capped models are checked too
    for _ in range(MAX_CHECK_ROUNDS):
        selected = [e for e in decide(current, coverage, unlimited, now).evictions]
        fresh = {f"{e.tier}/{e.model}" for e in selected} - checked
        if not fresh:
            break
        checked |= fresh
        current = [check_partial(paths, f) if f.key in fresh else f for f in current]
    return decide(current, coverage, view, now), current


def build(
    paths: StorePaths,
    cleaner: CleanerSettings,
    now: float,
    *,
    allow_large: bool = False,
    client: PromClient | None = None,
) -> Planned:
    view = PolicyView.from_settings(cleaner, allow_large=allow_large)
    client = client or PromClient.from_settings(cleaner.prometheus)
    started = time.monotonic()
    inventory: Inventory = fetch(client, cleaner, view, now)
    queried = time.monotonic()
    decision, facts = decide_with_disk_checks(paths, inventory.facts, inventory.coverage, view, now)
    decided = time.monotonic()
    evidence = {
        "prometheus_url": client.url,
        "matchers": cleaner.prometheus.matchers,
        "evaluated_at": now,
        **inventory.evidence(),
        "models": len(facts),
        "settings": view.to_json(),
        "timing_seconds": {"queries": round(queried - started, 4), "decide": round(decided - queried, 4)},
        **decision.notes,
    }
    plan = Plan(
        plan_id=new_plan_id(now),
        created_at=now,
        evictions=decision.evictions,
        kept=decision.kept,
        total_bytes_before=decision.total_bytes_before,
        evidence=evidence,
        warnings=(*inventory.warnings, *decision.warnings),
    )
    log.debug(
        "plan.built",
        plan_id=plan.plan_id,
        models=len(facts),
        evictions=len(plan.evictions),
        bytes_to_free=plan.bytes_to_free,
        usage_covered_seconds=inventory.coverage.covered_seconds,
        queries_seconds=round(queried - started, 3),
        decide_seconds=round(decided - queried, 3),
    )
    return Planned(plan, tuple(facts), inventory.coverage, view)


def build_plan(paths: StorePaths, cleaner: CleanerSettings, now: float, *, allow_large: bool = False) -> Plan:
    """What `run` calls: the plan for `now`, not saved (the caller saves it)."""
    return build(paths, cleaner, now, allow_large=allow_large).plan

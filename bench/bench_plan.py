"""Planning for 10,000 models: everything after Prometheus answers must take under 2 s.

Measures, on canned answers shaped like Prometheus' JSON: decoding, building the inventory,
attaching usage, the `.keep` and partial-download checks on a real temp tree, the decision,
and rendering the plan as text and JSON. Prometheus' own query time is not included.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from cleaner.commands.views import store_paths
from cleaner.inventory import attach_usage, parse_coverage, parse_inventory, parse_usage
from cleaner.plan_build import decide_with_disk_checks
from cleaner.plan_values import Plan
from cleaner.policies import PolicyView
from cleaner.prom import parse_result
from cleaner.report import dumps, render_plan
from shared.config import load_settings

MODELS = 10_000
BUDGET_SECONDS = 2.0
DAY = 86400.0


def _answer(samples: list[tuple[dict[str, str], float]], at: float) -> bytes:
    result = [{"metric": labels, "value": [at, repr(value)]} for labels, value in samples]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


def _answers(now: float) -> dict[str, bytes]:
    rng = random.Random(7)
    tiers = ["raw", "quantized", "repository"]
    keys = [(tiers[i % 3], f"model-{i:05d}") for i in range(MODELS)]
    sizes = [({"tier": t, "model": m}, float(rng.randint(10**6, 2 * 10**9))) for t, m in keys]
    files = [({"tier": t, "model": m}, float(rng.randint(1, 40))) for t, m in keys]
    changed = [({"tier": t, "model": m}, now - rng.uniform(0, 90) * DAY) for t, m in keys]
    usage = [({"model": m}, float(rng.choice([0, 0, 3, 50, 5000]))) for t, m in keys if t == "repository"]
    return {
        "bytes": _answer(sizes, now),
        "files": _answer(files, now),
        "changed": _answer(changed, now),
        "usage": _answer(usage, now),
        "coverage": _answer([({}, now - 7 * DAY)], now),
    }


def _tree(root: Path, answers: dict[str, bytes]) -> None:
    """The store the answers describe: each model's one file as large as Prometheus says (sparse), so
    the planner's walk of a selected model (what evicting it frees) agrees with the exporter."""
    sizes = {s.labels["model"]: int(s.value) for s in parse_result(json.loads(answers["bytes"])["data"])}
    for i in range(MODELS):
        tier = ["raw", "quantized", "repository"][i % 3]
        model = root / tier / f"model-{i:05d}" / "1"
        model.mkdir(parents=True)
        with open(model / "model.bin", "wb") as handle:
            handle.truncate(sizes[f"model-{i:05d}"])
        if i % 97 == 0:
            (model / "model.bin.incomplete").write_bytes(b"")
        if i % 101 == 0:
            (model.parent / ".keep").write_bytes(b"")


def plan_once(answers: dict[str, bytes], base: Path, now: float) -> tuple[Plan, dict[str, float]]:
    env = {"STORAGE_BASE_PATH": str(base), "STORAGE_CLEANUP_MAX_SIZE_GB": "5000"}
    settings = load_settings(env=env)
    view = PolicyView.from_settings(settings.cleaner)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def decoded(name: str) -> Any:
        return parse_result(json.loads(answers[name])["data"])

    facts = parse_inventory(decoded("bytes"), decoded("files"), decoded("changed"), now)
    coverage = parse_coverage(decoded("coverage"), view.timeframe_seconds, now)
    facts = attach_usage(facts, parse_usage(decoded("usage"), "model"), view.usage_tiers)
    timings["decode_and_inventory"] = time.perf_counter() - started
    mark = time.perf_counter()
    decision, facts = decide_with_disk_checks(store_paths(settings), facts, coverage, view, now)
    timings["disk_checks_and_decide"] = time.perf_counter() - mark
    mark = time.perf_counter()
    plan = Plan("bench", now, decision.evictions, decision.kept, decision.total_bytes_before, {}, decision.warnings)
    render_plan(plan)
    dumps(plan.to_json())
    timings["render"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    return plan, timings


def main() -> int:
    now = time.time()
    answers = _answers(now)
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        base = Path(tmp)
        _tree(base / "models", answers)
        os.sync()
        runs = [plan_once(answers, base, now) for _ in range(3)]
    plan, timings = min(runs, key=lambda run: run[1]["total"])
    worst = max(run[1]["total"] for run in runs)
    print(
        f"plan for {MODELS} models: {len(plan.evictions)} evictions, {len(plan.kept)} kept; "
        f"best {timings['total']:.3f} s, worst {worst:.3f} s (budget {BUDGET_SECONDS} s)"
    )
    print("  " + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in timings.items() if name != "total"))
    return 0 if worst < BUDGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Reasons are codes end to end: planner -> saved plan -> the cleaner's run -> state file -> /metrics.

The mislabelled reason (issue 13, case 6): a model whose directory could not be walked was kept
with the sentence "... cannot check for partial downloads: ...", and that English, parsed back by
substring, made it count as `partial_download`. Here the walk fails for real (a path longer than
the kernel takes: root reads every directory, so EACCES cannot be made) and the label is followed
through a real cleaner process and the exporter's real renderer.
"""

from __future__ import annotations

import ast
import errno
import os
import time
from pathlib import Path

from cleaner import plan_build
from cleaner.commands.views import store_paths
from cleaner.plan_store import load_plan, new_plan_id, save_plan
from cleaner.plan_values import ModelFacts, Plan
from cleaner.policies import Coverage, PolicyView
from exporter.index.service import ExporterService
from exporter.metrics.endpoint import MetricsRenderer
from shared.cleanup_state import read_cleanup_state
from shared.config import load_settings
from shared.metric_names import CLEANUP_SKIPPED_MODELS
from shared.reasons import SENTENCES, Reason
from tests.support import ROOT, exporter_env, make_model, parse_metrics, run_cleaner


def _deeper_than_path_max(model: Path) -> None:
    """Nest directories (by descriptor, so each mkdir is short) until a path inside passes PATH_MAX."""
    fd = os.open(model, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(os.pathconf(model, "PC_PATH_MAX") // 200 + 2):
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("w", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as handle:
            handle.write(b"1")
    finally:
        os.close(fd)


def test_an_unwalkable_model_is_unreadable_in_the_plan_state_file_and_metrics_never_partial_download(
    store: Path,
) -> None:
    models = store / "models"
    make_model(models, "raw", "deep", {"top": b"1"})
    _deeper_than_path_max(models / "raw/deep")
    env = exporter_env(models, store)
    settings = load_settings(env=env)
    now = time.time()
    view = PolicyView(policies=("age",), age_seconds=10.0, grace_seconds=0.0)
    facts = [ModelFacts("raw", "deep", 1, 1, now - 3600)]

    decision, _facts = plan_build.decide_with_disk_checks(store_paths(settings), facts, Coverage(1.0, 1.0), view, now)

    assert decision.evictions == ()
    (kept,) = decision.kept
    assert kept.code == Reason.UNREADABLE and kept.policy == "age"
    assert os.strerror(errno.ENAMETOOLONG) in kept.reason
    assert kept.reason.startswith(SENTENCES[Reason.UNREADABLE])
    plan = Plan(new_plan_id(now), now, decision.evictions, decision.kept, decision.total_bytes_before)
    save_plan(plan, settings.state_path)
    assert load_plan(plan.plan_id, settings.state_path).kept == (kept,)

    done = run_cleaner(["run", "--plan", plan.plan_id], env)

    assert done.returncode == 0, done.stderr
    state = read_cleanup_state(settings.cleanup_state_file)
    assert state is not None and state.skipped == {"unreadable": 1}
    body = MetricsRenderer(ExporterService(settings), settings).render().decode()
    skipped = {
        dict(labels)["reason"]: value
        for (name, labels), value in parse_metrics(body).items()
        if name == CLEANUP_SKIPPED_MODELS
    }
    assert skipped == {"unreadable": 1.0}


def _sentence_literals(path: Path) -> list[str]:
    """String literals that are a reason's sentence, or the first words of one (a substring to search for)."""
    sentences = [s.lower() for s in SENTENCES.values()]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        text = node.value.strip().lower()
        if text and any(s == text or (" " in text and s.startswith(text + " ")) for s in sentences):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return found


def test_no_module_but_the_reasons_table_spells_a_reason_sentence() -> None:
    """The code is the only vocabulary: a sentence written anywhere else is one about to be parsed back."""
    sources = [*(ROOT / "cleaner").rglob("*.py"), *(ROOT / "exporter").rglob("*.py"), *(ROOT / "shared").rglob("*.py")]
    offenders = [hit for path in sorted(sources) if path.name != "reasons.py" for hit in _sentence_literals(path)]
    assert offenders == []

"""The chaos harness, short: 50 seeded rounds of real workloads under CPU contention, all exact."""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests.chaos import WORKLOADS, metrics_differences, run_chaos
from tests.oracle import walk_truth

ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "50"))


def test_chaos_rounds_under_contention_are_all_exact_within_five_seconds(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.SystemRandom().randrange(1 << 31)))
    summary = run_chaos(ROUNDS, seed, scrub=False, hogs=os.cpu_count() or 2, workdir=tmp_path)
    report = "\n".join(summary.lines())
    assert summary.rounds == ROUNDS and summary.exact == ROUNDS, f"seed {seed}:\n{report}"
    assert len(summary.times) == ROUNDS


def test_every_workload_named_in_the_issue_is_in_the_harness() -> None:
    assert set(WORKLOADS) >= {
        "tar-x",
        "cp-r",
        "cp-al",
        "rsync-delete",
        "rsync-inplace",
        "blue-green",
        "move-out-and-back",
        "rm-recreate",
        "tier-recreate",
        "mkdir-burst",
        "deep-chain",
        "rename-loop",
        "hard-links",
        "truncate",
        "sparse-holes",
        "concurrent-writers",
    }


def test_the_harness_oracle_sees_a_wrong_gauge(tmp_path: Path) -> None:
    """The comparison can fail: a /metrics body one byte off, or missing a model, is reported."""
    models = tmp_path / "models"
    (models / "raw" / "m").mkdir(parents=True)
    (models / "quantized").mkdir()
    (models / "repository").mkdir()
    (models / "raw" / "m" / "w").write_bytes(b"x" * 10)
    truth = walk_truth(models)
    assert truth.models[("raw", "m")][:2] == [10, 1]

    allocated = (models / "raw" / "m" / "w").lstat().st_blocks * 512

    def body(model_bytes: int, with_model: bool = True, model_allocated: int = allocated) -> str:
        lines = [
            f'model_storage_bytes{{tier="{t}"}} {b}'
            for t, b in (("raw", model_bytes), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        lines += [
            f'model_storage_files{{tier="{t}"}} {f}'
            for t, f in (("raw", 1), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        lines += [
            f'model_storage_models{{tier="{t}"}} {n}'
            for t, n in (("raw", 1), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        lines += [
            f'model_storage_allocated_bytes{{tier="{t}"}} {a}'
            for t, a in (("raw", model_allocated), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        if with_model:
            lines += [
                f'model_storage_model_bytes{{tier="raw",model="m"}} {model_bytes}',
                'model_storage_model_files{tier="raw",model="m"} 1',
                f'model_storage_model_allocated_bytes{{tier="raw",model="m"}} {model_allocated}',
            ]
        return "\n".join(lines) + "\n"

    assert metrics_differences(body(10), models) == []
    assert metrics_differences(body(11), models)
    assert metrics_differences(body(10, with_model=False), models)
    # Allocated bytes are compared too: one block off is reported.
    assert metrics_differences(body(10, model_allocated=allocated + 512), models)

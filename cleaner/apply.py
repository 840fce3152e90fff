"""The executor: carries out a plan's evictions, each step journaled and audited, and recovers first.

It takes the plan's evictions and an injected `now`; what it does to the filesystem goes through
the journaled operations of cleaner.journal, and every decision about what may be touched is made
by cleaner.verify (per model). Restores and purges are cleaner.restore_purge's.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cleaner import crash_hook, fileops, recovery, staged, trash, verify
from cleaner import journal as jr
from cleaner.plan_values import Eviction, Kept
from cleaner.store_paths import StorePaths
from shared.audit import AuditLog
from shared.exit_codes import ExitCode
from shared.layout import Layout
from shared.logs import get_logger
from shared.reasons import SKIP_WORTHY, Reason, parse
from shared.typed_settings import CleanerSettings

log = get_logger("cleaner.apply")


@dataclass(frozen=True, slots=True)
class Context:
    """Everything the executor needs from the settings, the clock and the caller."""

    models_path: Path
    layout: Layout
    state_path: Path
    trash_path: Path
    backup_path: Path
    mode: str  # trash | archive | none
    protect: tuple[str, ...]
    run_id: str
    actor: str
    now: float

    @classmethod
    def for_run(cls, paths: StorePaths, cleaner: CleanerSettings, *, run_id: str, actor: str, now: float) -> Context:
        return cls(
            models_path=paths.models_path,
            layout=paths.layout,
            state_path=paths.state_path,
            trash_path=paths.trash_path,
            backup_path=paths.backup_path,
            mode=cleaner.backup.mode,
            protect=cleaner.protect,
            run_id=run_id,
            actor=actor,
            now=now,
        )


@dataclass(frozen=True, slots=True)
class Done:
    tier: str
    model: str
    bytes: int
    files: int
    policy: str
    mode: str
    how: str  # renamed | copied | deleted
    destination: str
    kept: tuple[str, ...] = ()  # what appeared in a staged model and was kept in the store


@dataclass(frozen=True, slots=True)
class Skipped:
    tier: str
    model: str
    bytes: int
    policy: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Failed:
    tier: str
    model: str
    bytes: int
    policy: str
    error: str


@dataclass(slots=True)
class ApplyResult:
    done: list[Done] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    unreadable_processes: int = 0

    def evicted_bytes(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for item in self.done:
            totals[item.policy] += item.bytes
        return dict(totals)

    def evicted_models(self) -> dict[str, int]:
        return dict(Counter(item.policy for item in self.done))

    def to_json(self) -> dict[str, Any]:
        return {
            "done": [asdict(d) for d in self.done],
            "skipped": [asdict(s) for s in self.skipped],
            "failed": [asdict(f) for f in self.failed],
            "unreadable_processes": self.unreadable_processes,
        }


# ---- pure helpers ----------------------------------------------------------------------------

CHANGED_DURING_COPY = Reason.CHANGED_DURING_COPY


def kept_reason_label(kept: Kept) -> str | None:
    """A planner's kept model as a `skipped{reason}` label (its code); None when it is no skip."""
    code = parse(kept.code)
    if code is None or code not in SKIP_WORTHY:
        return None
    return str(code)


def skipped_counts(kept: Sequence[Kept], skipped: Sequence[Skipped]) -> dict[str, int]:
    """This run's skipped models by reason code: those the plan held back plus those verification did.

    Every protected model counts, although the planner keeps them before any policy looks (policy
    None); other kept models count only when a policy wanted them, or every model too young or too
    busy to evict would be a "skip".
    """
    counts: Counter[str] = Counter()
    for item in kept:
        label = kept_reason_label(item)
        if label is not None and (item.policy is not None or label == Reason.PROTECTED):
            counts[label] += 1
    for skip in skipped:
        counts[skip.reason] += 1
    return dict(counts)


def exit_code_for(result: ApplyResult) -> int:
    """3 when an eviction failed on an error; skips are the checks doing their job, not failures."""
    return ExitCode.PARTIAL if result.failed else ExitCode.OK


def error_text(err: BaseException) -> str:
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return re.sub(r"\s+", " ", text).strip()


# ---- evictions -------------------------------------------------------------------------------


def _evict_one(
    eviction: Eviction,
    src: Path,
    ctx: Context,
    journal: jr.Journal,
    after_copy: Callable[[Path], None] | None,
    proc_root: Path,
) -> Done:
    meta: dict[str, Any] = {
        "run_id": ctx.run_id,
        "tier": eviction.tier,
        "model": eviction.model,
        "original_path": str(src),
        "bytes": eviction.bytes,
        "files": eviction.files,
        "policy": eviction.policy,
        "moved_at": ctx.now,
        "store": ctx.mode,
    }
    if ctx.mode == "none":
        jr.delete(journal, src, purpose="evict", meta=meta)
        return Done(
            eviction.tier, eviction.model, eviction.bytes, eviction.files, eviction.policy, "none", "deleted", ""
        )
    root = ctx.trash_path if ctx.mode == "trash" else ctx.backup_path
    dst = trash.entry_path(root, ctx.run_id, eviction.tier, eviction.model)
    fileops.make_dirs(dst.parent)
    kept: list[str] = []
    if ctx.mode == "archive":
        how, kept = staged.evict_by_copy(journal, src, dst, meta=meta, after_copy=after_copy, proc_root=proc_root)
    else:
        try:
            how = jr.transfer(journal, src, dst, purpose="evict", meta=meta, copy_on_exdev=False)
        except jr.CrossDeviceError:
            how, kept = staged.evict_by_copy(journal, src, dst, meta=meta, after_copy=after_copy, proc_root=proc_root)
    trash.record_entry(root, ctx.run_id, meta)
    crash_hook.crash_point("evict_metadata_written")
    return Done(
        eviction.tier,
        eviction.model,
        eviction.bytes,
        eviction.files,
        eviction.policy,
        ctx.mode,
        how,
        str(dst),
        tuple(kept),
    )


def _record_skip(skip: Skipped, key: str, ctx: Context, result: ApplyResult, audit: AuditLog) -> None:
    result.skipped.append(skip)
    audit.append(
        "skip",
        actor=ctx.actor,
        target=key,
        result="skipped",
        bytes=skip.bytes,
        details={"run_id": ctx.run_id, "reason": skip.reason, "detail": skip.detail},
    )


def apply_evictions(
    evictions: Sequence[Eviction],
    ctx: Context,
    journal: jr.Journal,
    audit: AuditLog,
    *,
    after_copy: Callable[[Path], None] | None = None,
    proc_root: Path = Path("/proc"),
) -> ApplyResult:
    """Verify then move each model; a model failing a check is skipped, an error fails only that model."""
    result = ApplyResult()
    for eviction in evictions:
        key = f"{eviction.tier}/{eviction.model}"
        crash_hook.crash_point("evict_started")
        verdict = verify.verify_model(
            models_path=ctx.models_path,
            layout=ctx.layout,
            tier=eviction.tier,
            model=eviction.model,
            planned_bytes=eviction.bytes,
            planned_last_changed=eviction.last_changed,
            protect=ctx.protect,
            proc_root=proc_root,
        )
        result.unreadable_processes = max(result.unreadable_processes, verdict.unreadable_processes)
        if not verdict.ok or verdict.path is None:
            skip = Skipped(
                eviction.tier, eviction.model, eviction.bytes, eviction.policy, verdict.reason, verdict.detail
            )
            _record_skip(skip, key, ctx, result, audit)
            continue
        try:
            crash_hook.crash_point("evict_verified")
            done = _evict_one(eviction, verdict.path, ctx, journal, after_copy, proc_root)
        except staged.HeldError as err:
            skip = Skipped(eviction.tier, eviction.model, eviction.bytes, eviction.policy, verify.IN_USE, str(err))
            _record_skip(skip, key, ctx, result, audit)
            continue
        except jr.SourceChangedError as err:
            # A writer was at work during the copy: the check doing its job, as a skip, not a failure.
            skip = Skipped(
                eviction.tier, eviction.model, eviction.bytes, eviction.policy, CHANGED_DURING_COPY, error_text(err)
            )
            _record_skip(skip, key, ctx, result, audit)
            continue
        except (OSError, jr.TransferError, fileops.CopyMismatchError) as err:
            failure = Failed(eviction.tier, eviction.model, eviction.bytes, eviction.policy, error_text(err))
            result.failed.append(failure)
            audit.append(
                "move",
                actor=ctx.actor,
                target=key,
                result="failure",
                bytes=eviction.bytes,
                error=failure.error,
                details={"run_id": ctx.run_id, "mode": ctx.mode, "policy": eviction.policy},
            )
            continue
        finally:
            verdict.release()
        result.done.append(done)
        audit.append(
            "move" if ctx.mode != "none" else "delete",
            actor=ctx.actor,
            target=key,
            bytes=eviction.bytes,
            details={
                "run_id": ctx.run_id,
                "mode": ctx.mode,
                "how": done.how,
                "policy": eviction.policy,
                "destination": done.destination,
            },
        )
    if ctx.mode in ("trash", "archive"):
        trash.remove_run_if_empty(ctx.trash_path if ctx.mode == "trash" else ctx.backup_path, ctx.run_id)
    return result


# ---- recovery --------------------------------------------------------------------------------


def recover(paths: StorePaths, audit: AuditLog, *, actor: str, now: float) -> list[recovery.Recovered]:
    """Finish what a killed cleaner left half-done, and bring the trash metadata up to date."""
    left_journals = jr.journal_dir(paths.state_path).is_dir() and any(jr.journal_dir(paths.state_path).glob("*.jsonl"))
    results = recovery.recover(paths.state_path)
    if left_journals:
        # A killed run, restore or purge may leave run directories with nothing in them.
        for root in (paths.trash_path, paths.backup_path):
            for run_id in os.listdir(root) if root.is_dir() else []:
                if trash.valid_run_id(run_id):
                    trash.remove_run_if_empty(root, run_id)
    for item in results:
        meta = item.meta
        key = f"{meta.get('tier')}/{meta.get('model')}"
        run_id = str(meta.get("run_id", ""))
        if item.purpose == "evict" and meta.get("store") in ("trash", "archive"):
            root = paths.trash_path if meta["store"] == "trash" else paths.backup_path
            if trash.valid_run_id(run_id) and (root / run_id).is_dir():
                if item.outcome == "completed":
                    trash.record_entry(root, run_id, meta)
                else:
                    trash.remove_run_if_empty(root, run_id)
        elif item.outcome == "completed" and item.purpose in ("restore", "purge") and meta.get("root"):
            root = Path(str(meta["root"]))
            trash.mark_entry(root, run_id, key, "restored" if item.purpose == "restore" else "purged", now)
            trash.remove_run_if_empty(root, run_id)
        audit.append(
            "recover",
            actor=actor,
            target=key,
            result={"lost": "failure", "kept_both": "skipped"}.get(item.outcome, "success"),
            error=item.detail if item.outcome in ("lost", "kept_both") else None,
            details={
                "op_id": item.op_id,
                "step": item.purpose,
                "outcome": item.outcome,
                "detail": item.detail,
                "src": item.src,
                "dst": item.dst,
            },
        )
    return results

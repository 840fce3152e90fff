"""Why a model was kept or skipped, as codes: planner -> plan -> state file -> metrics and API.

The code is the contract (a metric label, a JSON field); the sentence people read is derived from
it (`sentence`), with the detail of the case appended. Nothing parses a sentence back into a code.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # The planner's guards and policies (a kept model).
    PROTECTED = "protected"
    GRACE = "grace"
    PARTIAL_DOWNLOAD = "partial_download"
    UNREADABLE = "unreadable"
    UNKNOWN_USAGE = "unknown_usage"
    ENOUGH_REQUESTS = "enough_requests"
    YOUNGER_THAN_WINDOW = "younger_than_window"
    BLAST_RADIUS = "blast_radius"
    # The executor's checks just before acting (a skipped eviction).
    MISSING = "missing"
    OUTSIDE_MODELS_PATH = "outside_models_path"
    CHANGED_SINCE_PLAN = "changed_since_plan"
    IN_USE = "in_use"
    UNSUPPORTED_TYPE = "unsupported_type"
    CHECK_FAILED = "check_failed"
    CHANGED_DURING_COPY = "changed_during_copy"


SENTENCES: dict[Reason, str] = {
    Reason.PROTECTED: "protected",
    Reason.GRACE: "grace",
    Reason.PARTIAL_DOWNLOAD: "partial download in progress",
    Reason.UNREADABLE: "model directory unreadable",
    Reason.UNKNOWN_USAGE: "usage unknown",
    Reason.ENOUGH_REQUESTS: "in use",
    Reason.YOUNGER_THAN_WINDOW: "younger than the usage window",
    Reason.BLAST_RADIUS: "blast radius",
    Reason.MISSING: "missing",
    Reason.OUTSIDE_MODELS_PATH: "outside the models path",
    Reason.CHANGED_SINCE_PLAN: "changed since the plan",
    Reason.IN_USE: "in use",
    Reason.UNSUPPORTED_TYPE: "neither a directory nor a file",
    Reason.CHECK_FAILED: "a check could not be made",
    Reason.CHANGED_DURING_COPY: "changed during the copy",
}

# Kept models that count as skips in the state file and `model_storage_cleanup_skipped_models`:
# every protected one, and the others only when a policy wanted them gone.
SKIP_WORTHY: frozenset[Reason] = frozenset(
    {
        Reason.PROTECTED,
        Reason.GRACE,
        Reason.PARTIAL_DOWNLOAD,
        Reason.UNREADABLE,
        Reason.UNKNOWN_USAGE,
        Reason.BLAST_RADIUS,
    }
)


def sentence(code: Reason, detail: str = "") -> str:
    """The one line people read: the code's sentence, then the case's detail."""
    return f"{SENTENCES[code]}: {detail}" if detail else SENTENCES[code]


def parse(code: str) -> Reason | None:
    """A code read back from a saved plan; None for a plan from before codes (or an unknown one)."""
    try:
        return Reason(code)
    except ValueError:
        return None

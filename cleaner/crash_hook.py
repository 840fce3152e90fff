"""The test crash hook: kill (or stop) the cleaner at a named step, to test recovery from every step.

Inert unless STORAGE_CLEANER_CRASH_AT is set; the steps are named where the journaled operations call it.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "STORAGE_CLEANER_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(step: str) -> None:
    """Test hook: STORAGE_CLEANER_CRASH_AT=<step>:<n>[:STOP] kills (or stops) us the n-th time here.

    Several specs may be given, comma-separated, e.g. stop mid-copy so a test can change the
    source, then be killed later on the path that handles that change.
    """
    specs = os.environ.get(CRASH_ENV)
    if not specs:
        return
    for spec in specs.split(","):
        name, _, rest = spec.strip().partition(":")
        if name != step:
            continue
        count_text, _, how = rest.partition(":")
        _crash_counts[step] = _crash_counts.get(step, 0) + 1
        if _crash_counts[step] == int(count_text or "1"):
            os.kill(os.getpid(), signal.SIGSTOP if how.upper() == "STOP" else signal.SIGKILL)
        return

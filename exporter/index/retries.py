"""When the updater tries again: failed full scans, and directories to re-watch and scan later.

Pure: the clock is passed in. What is scheduled here (the updater thread carries it out):
- a failed full scan is tried again after 1, 2, 4... seconds, at most a minute apart (`retry_delay`);
- a directory moved inside the tree is re-watched and scanned again `settle_seconds` later (U4);
- a directory a scan could not open for want of descriptors (EMFILE/ENFILE) is re-watched and scanned
  again, backing off from 0.25 s to 30 s while it keeps failing; the attempts are forgotten once
  nothing is left to settle (every retry went through).
"""

from __future__ import annotations

import heapq

from exporter.index.tree import Parts

# A failed full scan is tried again after 1, 2, 4... seconds, at most this long apart.
SCAN_RETRY_MAX_SECONDS = 60.0
DESCRIPTOR_RETRY_FIRST_SECONDS = 0.25
DESCRIPTOR_RETRY_MAX_SECONDS = 30.0
# Moved directories waiting for their second look; past this many, the next ones get none.
SETTLE_LIMIT = 10_000


def retry_delay(attempt: int) -> float:
    """Seconds before retry number `attempt` (from 0) of a failed scan: 1, 2, 4... at most a minute."""
    return min(SCAN_RETRY_MAX_SECONDS, 2.0 ** min(attempt, 16))


class SettleQueue:
    """Directories to re-watch and scan again, each at its due time (monotonic seconds)."""

    def __init__(self) -> None:
        self._due: list[tuple[float, Parts]] = []
        self._descriptor_retries: dict[Parts, int] = {}  # directories to scan again -> attempts so far

    def __len__(self) -> int:
        return len(self._due)

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def moved(self, parts: Parts, due: float) -> None:
        """A directory moved inside the tree: look at it again at `due` (U4)."""
        if len(self._due) < SETTLE_LIMIT:
            heapq.heappush(self._due, (due, parts))

    def descriptor_retry(self, parts: Parts, now: float) -> None:
        """A directory a scan could not open for want of descriptors: again later, backing off."""
        attempt = self._descriptor_retries.get(parts, 0)
        self._descriptor_retries[parts] = attempt + 1
        delay = min(DESCRIPTOR_RETRY_MAX_SECONDS, DESCRIPTOR_RETRY_FIRST_SECONDS * 2.0 ** min(attempt, 16))
        heapq.heappush(self._due, (now + delay, parts))

    def pop_due(self, now: float) -> Parts | None:
        """The next directory due by `now`, or None."""
        if self._due and self._due[0][0] <= now:
            return heapq.heappop(self._due)[1]
        return None

    def drained(self) -> None:
        """Called after the due ones ran: with nothing left, every retry went through."""
        if not self._due:
            self._descriptor_retries.clear()

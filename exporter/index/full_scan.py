"""A full scan while events keep being applied: the scan thread, the replay kept for the fresh tree, the drift.

The live index keeps taking events during the scan; the same events are kept (up to a limit) and
replayed on the fresh tree before the service swaps it in. Hints are stat-based, so replaying one
the scan already saw changes nothing; a replay that outgrew its limit is reported as lost (the
service raises an overflow, so another scan follows).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from exporter.index.events import RawEvent
from exporter.index.scan import ScanResult
from exporter.index.tree import Tree
from exporter.index.updater import IndexUpdater


def scan_while_applying(
    scan: Callable[[], ScanResult],
    next_batch: Callable[[], list[RawEvent]],
    apply: Callable[[list[RawEvent]], None],
    replay_limit: int,
) -> tuple[ScanResult | BaseException, list[RawEvent], bool]:
    """Run `scan` on its own thread while applying the batches `next_batch` gives (each waits a
    moment for events); returns the scan's result or error, the events to replay, and whether some
    did not fit in `replay_limit`."""
    replay: list[RawEvent] = []
    result_box: list[Any] = []

    def run() -> None:
        try:
            result_box.append(scan())
        except BaseException as err:
            result_box.append(err)

    scanner_thread = threading.Thread(target=run, name="full-scan", daemon=True)
    scanner_thread.start()
    lost = False
    while scanner_thread.is_alive():
        batch = next_batch()
        if batch:
            apply(batch)
            if len(replay) + len(batch) <= replay_limit:
                replay.extend(batch)
            else:
                lost = True
    scanner_thread.join()
    outcome: ScanResult | BaseException = result_box[0]
    return outcome, replay, lost


def replayed(fresh: Tree, outcome: ScanResult, replay: list[RawEvent], updater: IndexUpdater, batch: int) -> Tree:
    """`fresh` filled from the scan, then the events seen during the scan applied to it."""
    if outcome.node is not None:
        fresh.graft((), outcome.node)
        # A full scan saw every link in the tree: nothing to check, bar what the replay brings.
        fresh.take_suspects()
        updater.restamp(fresh)
    # Events seen during the scan are replayed on the fresh tree: they are stat-based, so
    # replaying one that the scan already saw changes nothing.
    for start in range(0, len(replay), batch):
        updater.apply(fresh, replay[start : start + batch])
    return fresh


def drift(old: Tree, new: Tree) -> tuple[int, int]:
    """Sum of |tracked - true| bytes over every model and `other`, and how many models differed."""
    drift = abs(old.other.bytes - new.other.bytes)
    models = 0
    for key in old.models.keys() | new.models.keys():
        before = old.models.get(key)
        after = new.models.get(key)
        delta = abs((before.bytes if before else 0) - (after.bytes if after else 0))
        if delta or (before is None) != (after is None):
            models += 1
        drift += delta
    return drift, models

"""Starting the service's inotify reader: the own-reads markers prepared, the root watched, opens adopted."""

from __future__ import annotations

from collections.abc import Callable

from exporter.index.fsinfo import subdir_counting_device
from exporter.index.opens_store import OpensRecorder
from exporter.index.reader import Handoff, InotifyReader
from shared.logs import FAILURE, SUCCESS, get_logger

log = get_logger("exporter.service")


def start_reader(
    root: str,
    events: Handoff,
    on_overflow: Callable[[str], None],
    on_watch_error: Callable[[str, OSError], None],
    opens: OpensRecorder | None,
) -> InotifyReader | OSError:
    """A running reader with only the root watched: the initial scan watches the rest as it lists
    it (R8). The error when not even the root can be watched (the service polls instead)."""
    if opens is not None:
        opens.prepare()
    reader = InotifyReader(
        root,
        events,
        on_overflow,
        on_watch_error,
        subdir_counting_device(root),
        on_opens=opens.handle if opens is not None else None,
        marker_dir=str(opens.markers) if opens is not None else None,
    )
    try:
        # Only the root now: the initial scan watches the rest as it lists it (R8).
        reader.start(tree=False)
    except OSError as err:
        return err
    log.info("watch.started", path=root, watches=reader.watches, outcome=SUCCESS)
    if opens is not None:
        opens.adopt()
    if reader.marker_error:
        log.warning("opens.markers_unwatched", error=reader.marker_error, outcome=FAILURE)
    return reader

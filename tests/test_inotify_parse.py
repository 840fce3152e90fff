"""The reader's own parser of inotify read buffers agrees with watchdog's, event for event."""

from __future__ import annotations

import struct

from watchdog.observers.inotify_c import InotifyConstants as C
from watchdog.observers.inotify_c import InotifyFD

from exporter.index.translate import parse_events


def _event(wd: int, mask: int, cookie: int, name: bytes, pad_to: int = 16) -> bytes:
    length = 0 if not name else (len(name) + 1 + pad_to - 1) // pad_to * pad_to
    return struct.pack("iIII", wd, mask, cookie, length) + name.ljust(length, b"\0")


def _watchdog(buffer: bytes) -> list[tuple[int, int, int, bytes]]:
    # What InotifyFD.read_events makes of a buffer: its parser and its wd -1 filter.
    return [
        (wd, mask, cookie, name)
        for wd, mask, cookie, name in InotifyFD._parse_event_buffer(buffer)
        if wd != -1 or mask & C.IN_Q_OVERFLOW
    ]


def test_parse_events_matches_watchdog_on_every_kind_of_record() -> None:
    buffer = b"".join(
        [
            _event(1, C.IN_CREATE, 0, b"weights.bin"),
            _event(1, C.IN_OPEN, 0, b"a" * 16),  # a name filling its padding exactly: one more block
            _event(1, C.IN_MODIFY | C.IN_ISDIR, 0, b""),  # the watched directory itself: no name
            _event(2, C.IN_MOVED_FROM, 7, b"old", pad_to=32),
            _event(3, C.IN_MOVED_TO, 7, "n\u00e9w".encode()),
            _event(-1, C.IN_Q_OVERFLOW, 0, b""),  # kept: the overflow comes with wd -1
            _event(-1, C.IN_IGNORED, 0, b""),  # dropped, as watchdog drops it
            _event(4, C.IN_IGNORED, 0, b""),
        ]
    )
    parsed = parse_events(buffer)
    assert parsed == _watchdog(buffer)
    assert [(wd, name) for wd, _, _, name in parsed] == [
        (1, b"weights.bin"),
        (1, b"a" * 16),
        (1, b""),
        (2, b"old"),
        (3, "n\u00e9w".encode()),
        (-1, b""),
        (4, b""),
    ]
    assert parsed[3][2] == parsed[4][2] == 7


def test_parse_events_of_nothing_is_nothing() -> None:
    # A closed descriptor reads as b"" (watchdog): the reader takes no events as the end.
    assert parse_events(b"") == []

"""The index's event values: what the reader hands the updater, plain values easy to build in a test."""

from __future__ import annotations

from dataclasses import dataclass

# What the reader hands exporter.index.opens, in kernel order:
# ("open", path) | ("start", marker name) | ("end", marker name) | ("overflow", "")
OpenItem = tuple[str, str]


@dataclass(frozen=True, slots=True)
class RawEvent:
    """What the index needs of a filesystem event; plain values, easy to build in a test."""

    # created | modified | deleted | moved (created and deleted also re-stat the parent). `created`
    # announces the path: a directory found there is scanned whatever the index holds (U1).
    kind: str
    src: str
    dst: str = ""

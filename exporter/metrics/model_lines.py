"""Exposition text for the per-model series, each model's lines kept until the model changes.

prometheus_client formats every sample on every scrape (about 15 µs a series); at 10,000 models
that is most of a scrape, and during a burst of events a scrape competes for the one GIL with the
threads applying them. Here a model's four lines are formatted once and kept; the tree says which
models changed since the last scrape (`Tree.take_changes`), so a scrape formats only those and
joins the rest in C. The output follows the text exposition format: HELP and TYPE once per family,
label values escaped (backslash, double quote, newline) and always valid UTF-8 (see `shared.names`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from exporter.index.tree import Bucket, ModelKey, Tree
from shared import metric_names as m
from shared.names import name_text

MODEL_FAMILIES = (
    (m.MODEL_BYTES, "Apparent size of a model's regular files, bytes."),
    (m.MODEL_FILES, "Regular files in a model."),
    (m.MODEL_LAST_CHANGED, "Newest mtime or ctime of anything in the model, seconds."),
    (m.MODEL_ALLOCATED_BYTES, "Allocated size of a model's regular files (512 * st_blocks), bytes."),
)


def escape_text(value: str) -> str:
    """A label value's escapes in the text format: backslash, newline, double quote."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_label_value(value: str) -> str:
    return escape_text(name_text(value))


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_value(value: float) -> str:
    """Integers exactly, floats shortest round-trip, and the spellings Prometheus wants for the rest."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def family_header(name: str, help_text: str, kind: str = "gauge") -> bytes:
    return f"# HELP {name} {escape_help(help_text)}\n# TYPE {name} {kind}\n".encode()


_HEADERS = tuple(family_header(name, help_text) for name, help_text in MODEL_FAMILIES)


# Models per block of cached text: a change re-joins its block in each family (a slice and a
# join, about 20 ns a line), a scrape joins every block (about 20 ns each, 1,252 blocks at 10,000
# models). With 1% of 10,000 models changed between scrapes, 32 re-joins a third of the lines
# 128 did: interleaved, 2.15 against 2.75 ms a render.
BLOCK = 32


class ModelLinesCache:
    """Per-model rendered lines, joined in blocks; `render` formats only the models that changed.

    Each model has a fixed slot. For each family a slot holds the model's line, and each block of
    `BLOCK` slots its joined text, re-joined only when one of its models changed. A removed model's
    slot is emptied and reused by the next new model, so a model keeps its place in the output.
    """

    def __init__(self) -> None:
        self._slots: dict[ModelKey, int] = {}
        self._free: list[int] = []
        self._labels: list[str] = []  # per slot: the model's label set, escaped once
        self._rows: tuple[list[bytes], ...] = tuple([] for _ in MODEL_FAMILIES)  # per family, per slot
        # per family, per BLOCK slots: joined
        self._blocks: tuple[list[bytes], ...] = tuple([] for _ in MODEL_FAMILIES)
        self.formatted = 0  # models (re)formatted so far: what tests and benchmarks look at

    def _reset(self) -> None:
        self._slots.clear()
        self._free.clear()
        self._labels.clear()
        for rows, blocks in zip(self._rows, self._blocks, strict=True):
            rows.clear()
            blocks.clear()

    def _slot(self, key: ModelKey) -> int:
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        tier, model = key
        labels = f'{{{m.TIER_LABEL}="{escape_label_value(tier)}",{m.MODEL_LABEL}="{escape_label_value(model)}"}}'
        if self._free:
            slot = self._free.pop()
            self._labels[slot] = labels
        else:
            slot = len(self._labels)
            self._labels.append(labels)
            for rows in self._rows:
                rows.append(b"")
            if slot % BLOCK == 0:
                for blocks in self._blocks:
                    blocks.append(b"")  # joined below: its first model is being formatted
        self._slots[key] = slot
        return slot

    def cheap(self, tree: Tree, limit: int) -> bool:
        """Whether `chunks(tree)` would format at most `limit` models: the cache is this tree's,
        few models changed, and not so many slots would be empty that it lays out afresh."""
        pending = tree.pending_changes(self)
        return pending is not None and pending <= limit and len(self._free) + 2 * pending <= len(self._slots)

    def chunks(self, tree: Tree) -> list[bytes]:
        """The model families' text, in pieces to be joined by the caller (outside the index lock)."""
        models = tree.models
        changed = tree.take_changes(self)
        if changed is None:  # new to this tree, or another reader took changes: lay out every model
            self._reset()
            dirty = self._format(models, models)
        else:
            dirty = self._format(changed, models)
            if len(self._free) > len(self._slots):  # mostly emptied slots: lay out afresh, compact
                self._reset()
                dirty = self._format(models, models)
        out: list[bytes] = []
        for header, rows, blocks in zip(_HEADERS, self._rows, self._blocks, strict=True):
            for block in dirty:
                blocks[block] = b"".join(rows[block * BLOCK : (block + 1) * BLOCK])
            out.append(header)
            out.extend(blocks)
        return out

    def _format(self, keys: Iterable[ModelKey], models: Mapping[ModelKey, Bucket]) -> set[int]:
        """Format (or empty the slot of) each model in `keys`; returns the blocks that changed."""
        size, files, times, allocated = self._rows
        dirty: set[int] = set()
        for key in keys:
            bucket = models.get(key)
            if bucket is None:
                slot = self._slots.pop(key, None)
                if slot is None:
                    continue
                size[slot] = files[slot] = times[slot] = allocated[slot] = b""
                self._free.append(slot)
            else:
                slot = self._slot(key)
                labels = self._labels[slot]
                size[slot] = f"{m.MODEL_BYTES}{labels} {bucket.bytes}\n".encode()
                files[slot] = f"{m.MODEL_FILES}{labels} {bucket.files}\n".encode()
                times[slot] = f"{m.MODEL_LAST_CHANGED}{labels} {format_value(bucket.changed)}\n".encode()
                allocated[slot] = f"{m.MODEL_ALLOCATED_BYTES}{labels} {bucket.allocated}\n".encode()
                self.formatted += 1
            dirty.add(slot // BLOCK)
        return dirty

    def render(self, tree: Tree) -> bytes:
        return b"".join(self.chunks(tree))

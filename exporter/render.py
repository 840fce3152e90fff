"""Exposition text for the per-model series, each model's lines cached until its bucket changes.

prometheus_client formats every sample on every scrape (about 15 µs a series); at 10,000 models
that is most of a scrape. Here a model's three lines are formatted once and kept, keyed by the
bucket object and its `version`, so a scrape re-formats only the models that changed and joins
the rest. The output follows the text exposition format: HELP and TYPE once per family, label
values escaped (backslash, double quote, newline) and always valid UTF-8 (see `label_text`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from exporter.tree import Bucket
from shared import metric_names as m

MODEL_FAMILIES = (
    (m.MODEL_BYTES, "Apparent size of a model's regular files, bytes."),
    (m.MODEL_FILES, "Regular files in a model."),
    (m.MODEL_LAST_CHANGED, "Newest mtime or ctime of anything in the model, seconds."),
)


def label_text(name: str) -> str:
    """A file name as a label value, which must be valid UTF-8.

    A valid name is itself (the cleaner maps the label back to the path). A name with bytes that
    are not UTF-8 (kept by os.fsdecode as surrogates) gets each such byte as `\\xNN` and each of
    its backslashes doubled: two names that differ only in those bytes stay two series (replacing
    them all with U+FFFD made one, a duplicate), and no two such names can render alike. (A valid
    name spelled exactly like another name's escaped form would still clash: that takes intent.)
    """
    if name.isascii():
        return name
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    raw = name.encode("utf-8", "surrogateescape")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def escape_label_value(value: str) -> str:
    return label_text(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


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


class _Entry:
    __slots__ = ("bucket", "changed", "files", "size", "version")

    def __init__(self, bucket: Bucket, labels: str) -> None:
        self.bucket = bucket
        self.version = bucket.version
        self.size = f"{m.MODEL_BYTES}{labels} {bucket.bytes}\n".encode()
        self.files = f"{m.MODEL_FILES}{labels} {bucket.files}\n".encode()
        self.changed = f"{m.MODEL_LAST_CHANGED}{labels} {format_value(bucket.changed)}\n".encode()


class ModelLinesCache:
    """Per-model rendered lines; `render` runs under the index lock and costs O(models) joins."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._labels: dict[tuple[str, str], str] = {}
        self.formatted = 0  # models (re)formatted so far: what tests and benchmarks look at

    def _label_string(self, key: tuple[str, str]) -> str:
        labels = self._labels.get(key)
        if labels is None:
            tier, model = key
            labels = f'{{{m.TIER_LABEL}="{escape_label_value(tier)}",{m.MODEL_LABEL}="{escape_label_value(model)}"}}'
            self._labels[key] = labels
        return labels

    def render(self, models: Mapping[tuple[str, str], Bucket]) -> bytes:
        old = self._entries
        fresh: dict[tuple[str, str], _Entry] = {}
        for key, bucket in models.items():
            entry = old.get(key)
            # A reconcile swaps in new Bucket objects whose versions restart: compare identity too.
            if entry is None or entry.bucket is not bucket or entry.version != bucket.version:
                entry = _Entry(bucket, self._label_string(key))
                self.formatted += 1
            fresh[key] = entry
        self._entries = fresh
        if len(self._labels) > 2 * len(fresh) + 1024:
            self._labels = {key: self._labels[key] for key in fresh if key in self._labels}
        entries = fresh.values()
        return b"".join(
            (
                _HEADERS[0],
                *_lines(entries, "size"),
                _HEADERS[1],
                *_lines(entries, "files"),
                _HEADERS[2],
                *_lines(entries, "changed"),
            )
        )


def _lines(entries: Iterable[_Entry], attr: str) -> list[bytes]:
    if attr == "size":
        return [e.size for e in entries]
    if attr == "files":
        return [e.files for e in entries]
    return [e.changed for e in entries]

"""The in-memory index of the models tree: pure data and arithmetic, no I/O, no clock, no threads.

Paths are tuples of names relative to the models path. Sizes are kept per directory and summed
into one `Bucket` per model (or the `other` bucket), so an event costs O(1) and a scrape costs
O(models). Subtree moves re-point buckets per directory, never per file. A hard-linked inode
counts once in the whole tree: it is owned by one of its paths and handed to another when that
path goes, as `du -b` would count it.

Each file has two sizes: apparent (st_size) and allocated (st_blocks, in 512-byte blocks; buckets
hold bytes). Invariant: every place that adds, subtracts or moves a file's apparent size does the
same with its allocated size, in the same step, so the two totals are always of the same set of
files (the hard-link owner counts both).

The index only knows a file is hard-linked from an lstat that saw st_nlink > 1. A link made to a
file indexed while it had one link leaves that file counted as plain (link() tells only the inode,
not its directory): `suspects` and `find_links` let the updater find such files again (see
IndexUpdater.resolve_links) without keeping an inode number per file.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from shared.layout import Layout
from shared.metric_names import OTHER_TIER

Parts = tuple[str, ...]
InodeKey = tuple[int, int]
ModelKey = tuple[str, str]


class Bucket:
    """Running totals for one model (or for everything outside the tiers).

    A bucket adds what it counts to its tier's sums as well (`[bytes, files, models, allocated]`, shared by
    the tier's buckets), so tier totals cost O(tiers), not O(models), per scrape. A model's bucket
    also notes its key in its tree's `changes` whenever a total moves, so a scrape can re-format
    just those models (see `Tree.take_changes`).
    """

    __slots__ = ("allocated", "bytes", "changed", "changes", "files", "key", "model", "sums", "tier")

    def __init__(
        self, tier: str, model: str | None, sums: list[int], changes: dict[ModelKey, None] | None = None
    ) -> None:
        self.tier = tier
        self.model = model
        self.key: ModelKey = (tier, model or "")
        self.bytes = 0
        self.files = 0
        self.allocated = 0  # bytes: 512 * st_blocks
        self.changed = 0.0
        self.sums = sums
        self.changes = changes
        if changes is not None:
            sums[2] += 1
            changes[self.key] = None

    def add(self, nbytes: int, nfiles: int, nallocated: int) -> None:
        self.bytes += nbytes
        self.files += nfiles
        self.allocated += nallocated
        sums = self.sums
        sums[0] += nbytes
        sums[1] += nfiles
        sums[3] += nallocated
        if self.changes is not None:
            self.changes[self.key] = None

    def touch(self, changed: float) -> None:
        if changed > self.changed:
            self.changed = changed
            if self.changes is not None:
                self.changes[self.key] = None

    def leave(self) -> None:
        """The model left the index: take it out of its tier's sums; a stale reference counts nowhere."""
        sums = self.sums
        sums[0] -= self.bytes
        sums[1] -= self.files
        sums[2] -= 1
        sums[3] -= self.allocated
        self.sums = [0, 0, 0, 0]
        if self.changes is not None:
            self.changes[self.key] = None
            self.changes = None

    def set_changed(self, changed: float) -> None:
        if changed != self.changed:
            self.changed = changed
            if self.changes is not None:
                self.changes[self.key] = None


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What the index keeps of a regular file, from one lstat."""

    size: int
    changed: float
    inode: InodeKey | None = None  # set only for hard-linked files (st_nlink > 1)
    blocks: int = 0  # st_blocks: allocated 512-byte blocks


BLOCK_BYTES = 512  # the unit of st_blocks, whatever the filesystem's block size


class FileTable:
    """One directory's regular files, name -> (size, blocks), in about 20 bytes plus the name each.

    A dict costs ~100 bytes a file on top of the name; at a million files that is the index's
    whole memory budget. Sizes sit in an `array('q')` and allocated 512-byte blocks in an
    `array('I')` (4 bytes: up to 2 TiB a file; a table holding a larger one widens its blocks to
    'q'). Names sit in a list, or, for a table the scan filled (its C loop hands a directory's names
    over joined) and nothing has looked up since, in one NUL-joined string (names never hold a
    NUL): a str object per name is about 50 bytes on top of its characters, and splitting a million
    of them is a tenth of a CPU second on the daemon's start. Reading (`name_list`, iteration,
    `items`) splits a copy and keeps none; a lookup by name (an event, a change) splits for good.
    A name -> position dict is built only for a directory
    that is looked up by name while holding more than a few dozen files (events arriving in a large
    directory), so scanned, quiet directories stay compact.

    Invariant: exactly one of `_names` and `_joined` is None, and the names, however held, are
    in the same order as `sizes` and `blocks`, of the same length.
    """

    __slots__ = ("_index", "_joined", "_names", "blocks", "sizes")

    INDEX_FROM = 32

    def __init__(self) -> None:
        self._names: list[str] | None = []
        self._joined: str | None = None
        self.sizes = array("q")
        self.blocks = array("I")
        self._index: dict[str, int] | None = None

    @property
    def names(self) -> list[str]:
        """The names as a list, kept from now on (for changes and lookups by name)."""
        names = self._names
        if names is None:
            names = self._names = self._joined.split("\0") if self._joined else []
            self._joined = None
        return names

    def name_list(self) -> list[str]:
        """The names, in table order, without keeping a split copy of a joined table."""
        names = self._names
        if names is not None:
            return names
        return self._joined.split("\0") if self._joined else []

    def _find(self, name: str) -> int:
        index = self._index
        if index is None:
            names = self.names
            if len(names) <= self.INDEX_FROM:
                try:
                    return names.index(name)
                except ValueError:
                    return -1
            index = self._index = {n: i for i, n in enumerate(names)}
        return index.get(name, -1)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.name_list())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) >= 0

    def __getitem__(self, name: str) -> int:
        at = self._find(name)
        if at < 0:
            raise KeyError(name)
        return self.sizes[at]

    def get(self, name: str) -> int | None:
        at = self._find(name)
        return None if at < 0 else self.sizes[at]

    def blocks_of(self, name: str) -> int:
        at = self._find(name)
        if at < 0:
            raise KeyError(name)
        return self.blocks[at]

    def put(self, name: str, size: int, blocks: int) -> None:
        at = self._find(name)
        if at < 0:
            self.append(name, size, blocks)
            return
        self.sizes[at] = size
        try:
            self.blocks[at] = blocks
        except OverflowError:
            self.widen()
            self.blocks[at] = blocks

    def replace(self, name: str, size: int, blocks: int) -> tuple[int, int] | None:
        """Set an existing name's size and blocks in one lookup; its old (size, blocks), or None
        (and no change) when the name is not in the table."""
        at = self._find(name)
        if at < 0:
            return None
        old = self.sizes[at], self.blocks[at]
        self.sizes[at] = size
        try:
            self.blocks[at] = blocks
        except OverflowError:
            self.widen()
            self.blocks[at] = blocks
        return old

    def widen(self) -> None:
        """A file of 2 TiB or more allocated: this table's block counts take 8 bytes each from now on."""
        if self.blocks.typecode != "q":
            self.blocks = array("q", self.blocks)

    def append(self, name: str, size: int, blocks: int = 0) -> None:
        """Add a name known to be new (scanners: scandir never repeats a name)."""
        if self._index is not None:
            self._index[name] = len(self.names)
        self.names.append(name)
        self.sizes.append(size)
        try:
            self.blocks.append(blocks)
        except OverflowError:
            self.widen()
            self.blocks.append(blocks)

    def extend_joined(self, joined: str) -> None:
        """Add names known to be new, given as one NUL-joined string (the scan's C loop), before
        their sizes and blocks: a table without names keeps the string as it is."""
        if not joined:
            return
        if self._names is not None and not self._names and self._index is None:
            self._names = None
            self._joined = joined
            return
        names = self.names
        added = joined.split("\0")
        if self._index is not None:
            self._index.update((name, at) for at, name in enumerate(added, len(names)))
        names.extend(added)

    def pop(self, name: str) -> tuple[int, int]:
        """Remove `name`; its (size, blocks)."""
        at = self._find(name)
        if at < 0:
            raise KeyError(name)
        size = self.sizes[at]
        blocks = self.blocks[at]
        # Swap the last entry into the hole: O(1), order does not matter.
        last_name = self.names.pop()
        last_size = self.sizes.pop()
        last_blocks = self.blocks.pop()
        if self._index is not None:
            del self._index[name]
        if last_name != name:
            self.names[at] = last_name
            self.sizes[at] = last_size
            self.blocks[at] = last_blocks
            if self._index is not None:
                self._index[last_name] = at
        return size, blocks

    def items(self) -> Iterator[tuple[str, int]]:
        return zip(self.name_list(), self.sizes, strict=True)

    def entries(self) -> Iterator[tuple[str, int, int]]:
        """(name, size, blocks) of every file."""
        return zip(self.name_list(), self.sizes, self.blocks, strict=True)

    def total(self) -> int:
        return sum(self.sizes)

    def total_blocks(self) -> int:
        return sum(self.blocks)

    def __reduce__(self) -> tuple[object, tuple[str, array[int], array[int]]]:
        # Scan workers send tables to the daemon: one joined string pickles and unpickles several
        # times faster than a list of short ones (names never contain NUL).
        joined = "\0".join(self._names) if self._names is not None else self._joined or ""
        return (_unpack_table, (joined, self.sizes, self.blocks))


def _unpack_table(joined: str, sizes: array[int], blocks: array[int]) -> FileTable:
    table = FileTable()
    table.extend_joined(joined)
    table.sizes = sizes
    table.blocks = blocks
    return table


class DirNode:
    """One directory: its files' sizes, its subdirectories, and the bucket its files count in."""

    __slots__ = ("bucket", "changed", "dirs", "files", "hard", "own_allocated", "own_bytes", "own_files")

    def __init__(self, changed: float = 0.0) -> None:
        self.dirs: dict[str, DirNode] = {}
        self.files = FileTable()
        # name -> inode, only for files with more than one link (rare; None keeps dirs small).
        self.hard: dict[str, InodeKey] | None = None
        # Bytes and files counted here (hard links counted only at their owning path).
        self.own_bytes = 0
        self.own_files = 0
        self.own_allocated = 0  # bytes
        # Newest mtime/ctime seen of this directory and its own files, when scanned.
        self.changed = changed
        self.bucket: Bucket | None = None

    def add_file(self, name: str, info: FileInfo) -> None:
        """Builder for scanners: add a new file to a detached node (the tree does the accounting)."""
        self.files.append(name, info.size, info.blocks)
        if info.inode is not None:
            if self.hard is None:
                self.hard = {}
            self.hard[name] = info.inode
        if info.changed > self.changed:
            self.changed = info.changed

    def walk(self) -> Iterator[DirNode]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.dirs.values())


class _Inode:
    __slots__ = ("blocks", "refs", "size")

    def __init__(self, size: int, blocks: int) -> None:
        self.size = size
        self.blocks = blocks
        self.refs: list[tuple[DirNode, str]] = []


class ModelStat(NamedTuple):
    """One model's totals in a snapshot (a tuple: 10,000 of them are built under the index lock)."""

    tier: str
    model: str
    bytes: int
    files: int
    changed: float
    allocated: int = 0  # bytes: 512 * st_blocks


class Tree:
    """The index. Not thread-safe: the service serialises access with one lock."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.root = DirNode()
        self._sums = self._new_sums()
        self.other = Bucket(OTHER_TIER, None, self._sums[OTHER_TIER])
        self.root.bucket = self.other
        # (tier, model) -> bucket; a bucket exists exactly while its model's entry exists.
        self.models: dict[ModelKey, Bucket] = {}
        # Models whose totals changed, or that appeared or went, since `take_changes` last ran;
        # its one reader (the /metrics renderer) is remembered so that any other reader, or the
        # same one after the whole index was replaced, is told to read every model instead.
        self.changes: dict[ModelKey, None] = {}
        self._changes_reader: object | None = None
        self._inodes: dict[InodeKey, _Inode] = {}
        # Inodes whose set of links changed without a fresh lstat of the inode (a link grafted in by a
        # scan, a link removed): their other links' times, and whether the index knows every link,
        # are to be checked. Filled here, drained by the updater.
        self.suspects: dict[InodeKey, None] = {}
        # Directories indexed, the root included: one inotify watch each.
        self.dirs = 1

    # ----- queries -----

    def lookup(self, parts: Parts) -> DirNode | int | None:
        """The directory node, the file's size, or None when the path is not indexed."""
        node = self.root
        for name in parts[:-1]:
            child = node.dirs.get(name)
            if child is None:
                return None
            node = child
        if not parts:
            return node
        last = parts[-1]
        if last in node.dirs:
            return node.dirs[last]
        return node.files.get(last)

    def tier_totals(self) -> dict[str, tuple[int, int, int]]:
        """tier -> (bytes, files, models), with `other` included so totals always add up."""
        return {tier: (v[0], v[1], v[2]) for tier, v in self._sums.items()}

    def tier_allocated(self) -> dict[str, int]:
        """tier -> allocated bytes (512 * st_blocks), `other` included, each inode once."""
        return {tier: v[3] for tier, v in self._sums.items()}

    def _new_sums(self) -> dict[str, list[int]]:
        return {tier: [0, 0, 0, 0] for tier in (*self.layout.tiers, OTHER_TIER)}

    def take_changes(self, reader: object) -> list[ModelKey] | None:
        """The models changed since `reader` last took them (look each up in `models`: gone if
        absent), or None when `reader` must read them all: it is new, another reader took changes
        in between, or the index was replaced."""
        changed = list(self.changes)
        self.changes.clear()
        if self._changes_reader is not reader:
            self._changes_reader = reader
            return None
        return changed

    def pending_changes(self, reader: object) -> int | None:
        """How many models `take_changes(reader)` would return now; None when it would ask for all."""
        return len(self.changes) if self._changes_reader is reader else None

    def model_stats(self) -> list[ModelStat]:
        return [
            ModelStat(tier, model, b.bytes, b.files, b.changed, b.allocated) for (tier, model), b in self.models.items()
        ]

    def link_count(self, inode: InodeKey) -> int:
        """How many paths the index knows this inode by (0: not known as hard-linked)."""
        entry = self._inodes.get(inode)
        return len(entry.refs) if entry is not None else 0

    def inode_size(self, inode: InodeKey) -> int | None:
        entry = self._inodes.get(inode)
        return entry.size if entry is not None else None

    def take_suspects(self) -> list[InodeKey]:
        suspects = list(self.suspects)
        self.suspects.clear()
        return suspects

    def find_links(
        self, inodes: Iterable[InodeKey], *, any_size: bool = False
    ) -> tuple[dict[InodeKey, Parts], list[tuple[Parts, int]]]:
        """One walk of the directories, no I/O: for each known inode the path of one of its links,
        and every plain file whose size is one of theirs (where a link the index took for a plain
        file must be; with `any_size`, every plain file: one indexed before the inode was resized
        through another link has its old size). Costs O(directories) plus a C-level pass over each
        directory's sizes."""
        wanted: dict[int, list[tuple[str, InodeKey]]] = {}
        sizes: set[int] = set()
        for inode in inodes:
            entry = self._inodes.get(inode)
            if entry is None:
                continue
            node, name = entry.refs[0]
            wanted.setdefault(id(node), []).append((name, inode))
            sizes.add(entry.size)
        known: dict[InodeKey, Parts] = {}
        plain: list[tuple[Parts, int]] = []
        stack: list[tuple[DirNode, Parts]] = [(self.root, ())]
        while stack and (wanted or sizes):
            node, where = stack.pop()
            for name, inode in wanted.pop(id(node), ()):
                known[inode] = (*where, name)
            if any_size and sizes:
                hard = node.hard or {}
                plain.extend(((*where, name), size) for name, size in node.files.items() if name not in hard)
            elif sizes and not sizes.isdisjoint(node.files.sizes):
                hard = node.hard or {}
                plain.extend(
                    ((*where, name), size) for name, size in node.files.items() if size in sizes and name not in hard
                )
            stack.extend((child, (*where, name)) for name, child in node.dirs.items())
        return known, plain

    def single_file_models(self, parts: Parts = ()) -> list[Parts]:
        """Paths of the files directly in the tier directories at or below `parts` (each is a model)."""
        found: list[Parts] = []
        for dir_name in self.layout.tier_dirs:
            if parts and parts != (dir_name,):
                continue
            node = self.root.dirs.get(dir_name)
            if node is not None:
                found.extend((dir_name, name) for name in node.files)
        return found

    # ----- mutations -----

    def set_file(self, parts: Parts, info: FileInfo) -> None:
        """A regular file exists at `parts` with this size: add it or update it."""
        parent = self._ensure_dirs(parts[:-1])
        name = parts[-1]
        if name in parent.dirs:
            self._drop(parent, parts, name)
        old_inode = parent.hard.get(name) if parent.hard else None
        if old_inode is None and info.inode is None:
            # The common case, a plain file written again (or new): one name lookup, not four.
            old = parent.files.replace(name, info.size, info.blocks)
            if old is not None:
                bucket = self._file_bucket(parent, parts)
                delta = info.size - old[0]
                delta_allocated = (info.blocks - old[1]) * BLOCK_BYTES
                parent.own_bytes += delta
                parent.own_allocated += delta_allocated
                bucket.add(delta, 0, delta_allocated)
                bucket.touch(info.changed)
                return
        elif name in parent.files:
            if old_inode is not None and old_inode == info.inode:
                # The same inode, changed through this link: size and times are every link's.
                entry = self._inodes[old_inode]
                self._resize(entry, info.size, info.blocks)
                self._touch_links(entry, info.changed)
                return
            self._drop(parent, parts, name)
        self._attach_file(parent, parts, info)

    def set_dir(self, parts: Parts, changed: float) -> None:
        """A directory exists at `parts` (its contents are learnt from their own events or a scan)."""
        if not parts:
            return
        parent = self._ensure_dirs(parts[:-1])
        name = parts[-1]
        if name in parent.files:
            self._drop(parent, parts, name)
        if name not in parent.dirs:
            self._attach_dir(parent, parts, DirNode(changed))
        else:
            self.touch(parts, changed)

    def graft(self, parts: Parts, node: DirNode) -> None:
        """Put a scanned subtree at `parts`, replacing whatever the index had there."""
        if not parts:
            self._replace_root(node)
            return
        parent = self._ensure_dirs(parts[:-1])
        name = parts[-1]
        if name in parent.dirs or name in parent.files:
            self._drop(parent, parts, name)
        self._attach_dir(parent, parts, node)

    def remove(self, parts: Parts) -> bool:
        """The path is gone: subtract what it held. False when it was not indexed."""
        if not parts:
            self._replace_root(DirNode())
            return True
        parent = self._find_dir(parts[:-1])
        name = parts[-1]
        if parent is None or (name not in parent.dirs and name not in parent.files):
            return False
        self._drop(parent, parts, name)
        return True

    def move(self, src: Parts, dst: Parts) -> bool:
        """Re-key a file or subtree without stat-ing it. False when `src` was not indexed."""
        if not src or not dst or src == dst or dst[: len(src)] == src:
            return False
        src_parent = self._find_dir(src[:-1])
        name = src[-1]
        if src_parent is None:
            return False
        if name in src_parent.dirs:
            node = self._detach_dir(src_parent, src, name)
            self.graft(dst, node)
            return True
        if name in src_parent.files:
            size = src_parent.files[name]
            blocks = src_parent.files.blocks_of(name)
            inode = src_parent.hard.get(name) if src_parent.hard else None
            self._drop(src_parent, src, name)
            dst_parent = self._ensure_dirs(dst[:-1])
            dst_name = dst[-1]
            if dst_name in dst_parent.dirs or dst_name in dst_parent.files:
                self._drop(dst_parent, dst, dst_name)
            self._attach_file(dst_parent, dst, FileInfo(size, 0.0, inode, blocks))
            return True
        return False

    def touch(self, parts: Parts, changed: float) -> None:
        """Something at `parts` changed at `changed` (mtime/ctime): bump its model's time."""
        bucket = self._bucket_for_path(parts)
        if bucket is not None:
            bucket.touch(changed)

    def set_model_changed(self, parts: Parts, changed: float) -> None:
        """A single-file model's time, from its own lstat: set, not raised, as a scan can only
        give it the tier directory's newest time (see `_count_in`)."""
        bucket = self._bucket_for_path(parts)
        if bucket is not None:
            bucket.set_changed(changed)

    # ----- internals -----

    def _find_dir(self, parts: Parts) -> DirNode | None:
        node = self.root
        for name in parts:
            child = node.dirs.get(name)
            if child is None:
                return None
            node = child
        return node

    def _ensure_dirs(self, parts: Parts) -> DirNode:
        node = self.root
        for depth, name in enumerate(parts):
            child = node.dirs.get(name)
            if child is None:
                if name in node.files:
                    self._drop(node, parts[: depth + 1], name)
                child = DirNode()
                self._attach_dir(node, parts[: depth + 1], child)
            node = child
        return node

    def _bucket_for_path(self, parts: Parts) -> Bucket | None:
        tier, model = self.layout.classify(parts)
        if tier == OTHER_TIER:
            return self.other
        if model is None:
            return None
        return self.models.get((tier, model))

    def _file_bucket(self, parent: DirNode, parts: Parts) -> Bucket:
        if parent.bucket is not None:
            return parent.bucket
        # A file directly in a tier directory is a single-file model.
        tier, model = self.layout.classify(parts)
        assert model is not None
        return self.models[(tier, model)]

    def _new_model(self, parts: Parts) -> Bucket:
        tier, model = self.layout.classify(parts)
        assert model is not None
        bucket = Bucket(tier, model, self._sums[tier], self.changes)
        replaced = self.models.get((tier, model))
        if replaced is not None:  # not expected (its entry was dropped first), but never counted twice
            replaced.leave()
        self.models[(tier, model)] = bucket
        return bucket

    def _end_model(self, parts: Parts) -> None:
        tier, model = self.layout.classify(parts)
        assert model is not None
        bucket = self.models.pop((tier, model), None)
        if bucket is not None:
            bucket.leave()

    def _is_model_root(self, parts: Parts) -> bool:
        return len(parts) == 2 and self.layout.classify(parts)[1] is not None

    def _attach_file(self, parent: DirNode, parts: Parts, info: FileInfo) -> None:
        name = parts[-1]
        bucket = self._new_model(parts) if parent.bucket is None else parent.bucket
        parent.files.put(name, info.size, info.blocks)
        bucket.touch(info.changed)
        if info.inode is None:
            allocated = info.blocks * BLOCK_BYTES
            parent.own_bytes += info.size
            parent.own_files += 1
            parent.own_allocated += allocated
            bucket.add(info.size, 1, allocated)
            return
        if parent.hard is None:
            parent.hard = {}
        parent.hard[name] = info.inode
        self._link(info.inode, info.size, info.blocks, parent, name, info.changed)

    def _attach_dir(self, parent: DirNode, parts: Parts, node: DirNode) -> None:
        """Hang `node` (possibly a scanned subtree) at `parts` and count it in its buckets."""
        parent.dirs[parts[-1]] = node
        stack: list[tuple[DirNode, Parts]] = [(node, parts)]
        while stack:
            current, where = stack.pop()
            self.dirs += 1
            tier, model = self.layout.classify(where)
            if tier == OTHER_TIER:
                current.bucket = self.other
            elif model is None:
                current.bucket = None  # a tier directory: its files are models of their own
            elif len(where) == 2:
                current.bucket = self._new_model(where)
            else:
                current.bucket = self.models[(tier, model)]
            self._count_in(current, where)
            stack.extend((child, (*where, name)) for name, child in current.dirs.items())

    def _count_in(self, node: DirNode, where: Parts) -> None:
        """Add a freshly attached directory's own files to its bucket(s)."""
        hard = node.hard or {}
        node.own_bytes = node.own_files = node.own_allocated = 0
        if node.bucket is None:
            # Files of a tier directory: each is a model of its own. A scan keeps one newest time per
            # directory, not per file, so this is the directory's: never older than the file's, and
            # the caller sets the file's own right after (`set_model_changed`).
            for name, size, blocks in node.files.entries():
                bucket = self._new_model((*where, name))
                bucket.touch(node.changed)
                if name not in hard:
                    bucket.add(size, 1, blocks * BLOCK_BYTES)
                    node.own_bytes += size
                    node.own_files += 1
                    node.own_allocated += blocks * BLOCK_BYTES
        else:
            if hard:
                plain_bytes = sum(size for name, size in node.files.items() if name not in hard)
                plain_blocks = sum(blocks for name, _, blocks in node.files.entries() if name not in hard)
            else:
                plain_bytes = node.files.total()
                plain_blocks = node.files.total_blocks()
            node.own_bytes = plain_bytes
            node.own_files = len(node.files) - len(hard)
            node.own_allocated = plain_blocks * BLOCK_BYTES
            node.bucket.add(plain_bytes, node.own_files, node.own_allocated)
            node.bucket.touch(node.changed)
        if hard:
            for name, size, blocks in list(node.files.entries()):
                inode = hard.get(name)
                if inode is not None:
                    self._link(inode, size, blocks, node, name, None)

    def _detach_dir(self, parent: DirNode, parts: Parts, name: str) -> DirNode:
        """Take a subtree out of the index and subtract it; it can be attached again (a move)."""
        node = parent.dirs.pop(name)
        orphaned: dict[InodeKey, _Inode] = {}
        for current in node.walk():
            self.dirs -= 1
            # A tier directory (no bucket) takes its models with it below; nothing to subtract.
            if current.bucket is not None:
                current.bucket.add(-current.own_bytes, -current.own_files, -current.own_allocated)
            # Hard links leave with the subtree; inodes also linked elsewhere get a new owner there.
            for file_name, inode in (current.hard or {}).items():
                entry = self._inodes.get(inode)
                if entry is None:
                    continue
                was_owner = entry.refs[0] == (current, file_name)
                entry.refs.remove((current, file_name))
                if was_owner:
                    orphaned[inode] = entry  # once per inode, however many links leave
                if not entry.refs:
                    del self._inodes[inode]
                else:
                    # Removing a link moves the inode's ctime: the models of the links left changed.
                    self.suspects[inode] = None
        if self._is_model_root(parts):
            self._end_model(parts)
        elif node.bucket is None:
            tier = self.layout.classify(parts)[0]
            for model_name in (*node.files, *node.dirs):
                bucket = self.models.pop((tier, model_name), None)
                if bucket is not None:
                    bucket.leave()
        for entry in orphaned.values():
            self._reown(entry)
        return node

    def _drop(self, parent: DirNode, parts: Parts, name: str) -> None:
        """Delete the file or subtree at `parts` from the index."""
        if name in parent.dirs:
            self._detach_dir(parent, parts, name)
            return
        size, blocks = parent.files.pop(name)
        inode = parent.hard.pop(name) if parent.hard and name in parent.hard else None
        if inode is None:
            allocated = blocks * BLOCK_BYTES
            parent.own_bytes -= size
            parent.own_files -= 1
            parent.own_allocated -= allocated
            self._file_bucket(parent, parts).add(-size, -1, -allocated)
        else:
            self._unlink(inode, parent, name, parts)
        if parent.bucket is None:
            self._end_model(parts)

    def _link(self, inode: InodeKey, size: int, blocks: int, node: DirNode, name: str, changed: float | None) -> None:
        """Count a path of a hard-linked inode; `changed` is None when no lstat of it came with it (a scan)."""
        entry = self._inodes.get(inode)
        if entry is None:
            entry = self._inodes[inode] = _Inode(size, blocks)
        else:
            self._resize(entry, size, blocks)
            if changed is not None:
                # link() moved the inode's ctime, which every link shares: their models changed too.
                self._touch_links(entry, changed)
        if changed is None:
            self.suspects[inode] = None
        entry.refs.append((node, name))
        if len(entry.refs) == 1:
            allocated = blocks * BLOCK_BYTES
            node.own_bytes += size
            node.own_files += 1
            node.own_allocated += allocated
            self._owner_bucket(node, name).add(size, 1, allocated)

    def _unlink(self, inode: InodeKey, node: DirNode, name: str, parts: Parts) -> None:
        entry = self._inodes[inode]
        was_owner = entry.refs[0] == (node, name)
        entry.refs.remove((node, name))
        if was_owner:
            allocated = entry.blocks * BLOCK_BYTES
            node.own_bytes -= entry.size
            node.own_files -= 1
            node.own_allocated -= allocated
            self._file_bucket(node, parts).add(-entry.size, -1, -allocated)
            self._reown(entry)
        if entry.refs:
            # unlink() and rename() move the inode's ctime: the remaining links' models changed too.
            self.suspects[inode] = None
        else:
            del self._inodes[inode]

    def _resize(self, entry: _Inode, size: int, blocks: int) -> None:
        """The inode was rewritten (through any link): correct the owner's count and every link's table."""
        if size == entry.size and blocks == entry.blocks:
            return
        if entry.refs:
            owner, owner_name = entry.refs[0]
            delta = size - entry.size
            delta_allocated = (blocks - entry.blocks) * BLOCK_BYTES
            owner.own_bytes += delta
            owner.own_allocated += delta_allocated
            self._owner_bucket(owner, owner_name).add(delta, 0, delta_allocated)
        for ref_node, ref_name in entry.refs:
            # Tables hold each link's sizes too: a subtree moved later is re-counted from them.
            ref_node.files.put(ref_name, size, blocks)
        entry.size = size
        entry.blocks = blocks

    def _touch_links(self, entry: _Inode, changed: float) -> None:
        for ref_node, ref_name in entry.refs:
            self._owner_bucket(ref_node, ref_name).touch(changed)

    def _reown(self, entry: _Inode) -> None:
        if not entry.refs:
            return
        owner, owner_name = entry.refs[0]
        allocated = entry.blocks * BLOCK_BYTES
        owner.own_bytes += entry.size
        owner.own_files += 1
        owner.own_allocated += allocated
        self._owner_bucket(owner, owner_name).add(entry.size, 1, allocated)

    def _owner_bucket(self, node: DirNode, name: str) -> Bucket:
        if node.bucket is not None:
            return node.bucket
        for dir_name, tier in self.layout.tier_dirs.items():
            if self.root.dirs.get(dir_name) is node:
                return self.models[(tier, name)]
        raise KeyError(name)

    def _replace_root(self, node: DirNode) -> None:
        self.root = DirNode(node.changed)
        # Buckets of the old tree keep the old sums and changes: whatever still touches them counts nowhere.
        self._sums = self._new_sums()
        self.other = Bucket(OTHER_TIER, None, self._sums[OTHER_TIER])
        self.root.bucket = self.other
        self.models.clear()
        self.changes = {}
        self._changes_reader = None  # every model is new or gone: the reader starts over
        self._inodes.clear()
        self.dirs = 1
        self.root.files, self.root.hard = node.files, node.hard
        self._count_in(self.root, ())
        for name, child in node.dirs.items():
            self._attach_dir(self.root, (name,), child)

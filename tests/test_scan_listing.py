"""The scan's C loop (exporter/index/_listing.c) against the Python loop it replaces, its oracle.

Both read the same real directories; every figure the index keeps (names in order, sizes, blocks,
hard links, change stamps, subdirectories, errors) must come out identical.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.index import scan
from exporter.index.tree import DirNode
from tests.support import ROOT

Dump = list[tuple[Any, ...]]


def dump(node: DirNode | None) -> Dump:
    """Every directory of a scanned tree as plain values, in a fixed order."""
    if node is None:
        return []
    out: Dump = []
    stack: list[tuple[tuple[str, ...], DirNode]] = [((), node)]
    while stack:
        key, current = stack.pop()
        files = current.files
        out.append(
            (
                key,
                files.name_list(),
                list(files.sizes),
                list(files.blocks),
                files.blocks.typecode,
                current.hard,
                current.changed,
                list(current.dirs),
            )
        )
        stack.extend(((*key, name), child) for name, child in current.dirs.items())
    return sorted(out, key=lambda row: row[0])


def scan_both(path: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """`scan_local` with the C loop, then with the Python loop: what each saw, as plain values."""
    seen = []
    for one in (scan._scan_one_fast, scan._scan_one_plain):
        saved = scan._scan_one
        scan._scan_one = one
        try:
            result = scan.scan_local(path)
        finally:
            scan._scan_one = saved
        seen.append((dump(result.node), sorted(result.errors), result.files, result.dirs))
    return seen[0], seen[1]


def test_the_c_loop_is_built_and_is_what_the_scan_runs() -> None:
    # No silent fallback here: `make install` builds it (gcc and the Python headers, `make system-deps`).
    assert scan._listing is not None, "exporter/index/_listing.c was not built: run make install"
    assert scan._scan_one is scan._scan_one_fast


# ----- any tree: generated -----

NAMES = st.one_of(
    st.text(
        alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=12,
    ).filter(lambda n: n not in {".", ".."} and len(n.encode()) <= 255),
    # Not UTF-8: decoded with surrogateescape, as os.listdir does.
    st.binary(min_size=1, max_size=8)
    .filter(lambda b: b"/" not in b and b"\0" not in b and b not in {b".", b".."})
    .map(os.fsdecode),
)
KINDS = st.sampled_from(["file", "file", "file", "sparse", "dir", "dir", "link", "symlink", "fifo"])
ENTRIES = st.lists(st.tuples(st.integers(0, 5), NAMES, KINDS, st.integers(0, 70_000)), max_size=40)


def build(root: Path, entries: list[tuple[int, str, str, int]]) -> None:
    dirs = [root]
    files: list[Path] = []
    for parent, name, kind, size in entries:
        path = dirs[parent % len(dirs)] / name
        if os.path.lexists(path):
            continue
        if kind == "dir":
            path.mkdir()
            dirs.append(path)
        elif kind == "file":
            path.write_bytes(b"x" * size)
            files.append(path)
        elif kind == "sparse":
            with open(path, "wb") as out:
                out.truncate(size * 1000)
            files.append(path)
        elif kind == "link" and files:
            os.link(files[size % len(files)], path)
        elif kind == "symlink":
            path.symlink_to(files[size % len(files)] if files else "nowhere")
        elif kind == "fifo":
            os.mkfifo(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=ENTRIES)
def test_any_tree_reads_the_same_through_both_loops(entries: list[tuple[int, str, str, int]]) -> None:
    with tempfile.TemporaryDirectory(prefix="listing-") as tmp:
        root = Path(tmp) / "t"
        root.mkdir()
        build(root, entries)
        fast, plain = scan_both(str(root))
        assert fast == plain
        assert fast[2] == sum(1 for _ in _regular_files(root))


def _regular_files(root: Path) -> Iterator[str]:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if stat.S_ISREG(os.lstat(os.path.join(folder, name)).st_mode):
                yield name


def test_a_fixed_tree_with_every_kind_of_entry(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "big.bin").write_bytes(b"y" * 123_457)
    (root / "a" / "b" / "x").write_bytes(b"")
    os.link(root / "a" / "big.bin", root / "a" / "b" / "hard")
    (root / "a" / "sym").symlink_to("big.bin")
    os.mkfifo(root / "a" / "pipe")
    (root / os.fsdecode(b"\xff\xfe-odd")).write_bytes(b"z")
    fast, plain = scan_both(str(root))
    assert fast == plain
    assert fast[2] == 4 and fast[3] == 3
    rows = {row[0]: row for row in fast[0]}
    assert rows[("a",)][1] == ["big.bin"] and rows[("a",)][2] == [123_457]
    assert rows[("a",)][5] is not None and "big.bin" in rows[("a",)][5]
    assert rows[()][1] == [os.fsdecode(b"\xff\xfe-odd")]


# ----- the error paths: as an unprivileged user, and out of descriptors -----

_CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from tests.test_scan_listing import scan_both
{before}
fast, plain = scan_both({path!r})
print(json.dumps({{"equal": fast == plain, "errors": fast[1], "files": fast[2]}}))
"""


def _child(path: Path, before: str = "", user: bool = False) -> dict[str, Any]:
    code = _CHILD.format(root=str(ROOT), path=str(path), before=before)
    argv = [sys.executable, "-c", code]
    if user:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def public_tree() -> Iterator[Path]:
    """A tree `nobody` can reach, with a directory it can list but not stat in (r--) and one it cannot open."""
    base = Path(tempfile.mkdtemp(prefix="listing-unpriv-"))
    base.chmod(0o755)
    root = base / "t"
    (root / "listable").mkdir(parents=True)
    (root / "closed").mkdir()
    (root / "open").mkdir()
    for name in ("one", "two"):
        (root / "listable" / name).write_bytes(b"1234")
        (root / "closed" / name).write_bytes(b"1234")
    (root / "open" / "three").write_bytes(b"12345")
    (root / "listable").chmod(0o444)
    (root / "closed").chmod(0o000)
    for path in (root, root / "open"):
        path.chmod(0o755)
    try:
        yield root
    finally:
        (root / "listable").chmod(0o755)
        (root / "closed").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_unreadable_and_unsearchable_directories_fail_alike(public_tree: Path) -> None:
    seen = _child(public_tree, user=True)
    assert seen["equal"], seen
    assert seen["files"] == 1
    reasons = {Path(path).name: reason for path, reason in seen["errors"]}
    # r--: the names are read, then the first lstat fails: the directory is reported, nothing kept.
    assert reasons == {"listable": "Permission denied", "closed": "Permission denied"}


def test_out_of_descriptors_is_reported_alike(tmp_path: Path) -> None:
    # Every descriptor taken but one: the directory opens, then listing it needs a second (a dup).
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"abc")
    exhaust = (
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "import os\n"
        "held = []\n"
        "while True:\n"
        "    try:\n"
        "        held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "    except OSError:\n"
        "        break\n"
        "os.close(held.pop())\n"
        "import json as _json\n"
    )
    seen = _child(root, before=exhaust)
    assert seen["equal"], seen
    assert [reason for _path, reason in seen["errors"]] == ["Too many open files"]


def test_blocks_too_large_for_four_bytes_widen_the_table() -> None:
    # No real file here allocates 2 TiB: the listing's wide answer is handed in at the module's edge.
    node = DirNode()
    node.files.append("old", 1, 7)
    pending: scan.Pending = []
    result = scan.ScanResult(node)
    huge = 2**33
    wide: tuple[Any, ...] = (
        "big",
        1,
        (5).to_bytes(8, sys.byteorder),
        huge.to_bytes(8, sys.byteorder),
        True,
        [],
        1.0,
        [],
        0,
    )

    class Listing:
        @staticmethod
        def list_dir(fd: int, changed: float) -> tuple[Any, ...]:
            return wide

    saved = scan._listing
    scan._listing = Listing  # type: ignore[assignment]
    try:
        scan._scan_one_fast("/", node, result, pending, None)
    finally:
        scan._listing = saved
    assert node.files.blocks.typecode == "q"
    assert list(node.files.blocks) == [7, huge]
    assert list(node.files.sizes) == [1, 5]

"""What the scale work added stays correct: compact file tables, the fast scan loop, sliced applies."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.index.scan import Scanner, scan_local
from exporter.index.tree import FileTable, Tree
from shared.layout import Layout

NAMES = [f"n{i}" for i in range(80)]  # more than FileTable.INDEX_FROM, so the index is exercised


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "pop", "get"]),
            st.sampled_from(NAMES),
            st.integers(0, 10**12),
            # Block counts past 2**32 (2 TiB allocated) widen the table's 4-byte array.
            st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 2**40)),
        ),
        max_size=300,
    )
)
def test_file_table_behaves_like_a_dict(ops: list[tuple[str, str, int, int]]) -> None:
    table, ref = FileTable(), {}
    for kind, name, size, blocks in ops:
        if kind == "set":
            table.put(name, size, blocks)
            ref[name] = (size, blocks)
        elif kind == "pop":
            assert (name in table) == (name in ref)
            if name in ref:
                assert table.pop(name) == ref.pop(name)
        else:
            assert table.get(name) == (ref[name][0] if name in ref else None)
            if name in ref:
                assert table.blocks_of(name) == ref[name][1]
        assert len(table) == len(ref)
    assert {name: (size, blocks) for name, size, blocks in table.entries()} == ref
    assert table.total() == sum(v[0] for v in ref.values())
    assert table.total_blocks() == sum(v[1] for v in ref.values())
    assert pickle.loads(pickle.dumps(table)).blocks == table.blocks


def _tree(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    for m in range(6):
        for d in range(3):
            sub = models / "raw" / f"m{m}" / f"d{d}"
            sub.mkdir(parents=True)
            for f in range(40):
                (sub / f"f{f}").write_bytes(b"x" * (m + d + f))
    os.link(models / "raw" / "m0" / "d0" / "f1", models / "raw" / "m1" / "hard")
    os.symlink(models / "raw" / "m0" / "d0" / "f2", models / "raw" / "m1" / "soft")
    return models


def _totals(node_tree: Tree) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {k: (b.bytes, b.files, b.allocated) for k, b in node_tree.models.items()}


def test_pool_scan_and_local_scan_build_the_same_index(tmp_path: Path) -> None:
    models = _tree(tmp_path)
    local = scan_local(str(models))
    scanner = Scanner(2)
    scanner.start()
    try:
        pooled = scanner.scan(models)
    finally:
        scanner.close()
    assert local.node is not None and pooled.node is not None
    a, b = Tree(Layout()), Tree(Layout())
    a.graft((), local.node)
    b.graft((), pooled.node)
    assert _totals(a) == _totals(b)
    assert local.files == pooled.files == 6 * 3 * 40 + 1
    expected = sum(m + d + f for m in range(6) for d in range(3) for f in range(40))
    assert sum(v[0] for v in a.tier_totals().values()) == expected  # the hard link once, the symlink never
    # Allocated bytes came through the workers' pickled tables too: as du -B1 counts them.
    allocated = {
        os.lstat(p).st_ino: os.lstat(p).st_blocks * 512 for p in models.rglob("*") if p.is_file() and not p.is_symlink()
    }
    assert sum(a.tier_allocated().values()) == sum(b.tier_allocated().values()) == sum(allocated.values())


def test_events_in_a_large_scanned_directory_update_it(tmp_path: Path) -> None:
    models = _tree(tmp_path)
    result = scan_local(str(models))
    assert result.node is not None
    tree = Tree(Layout())
    tree.graft((), result.node)
    before = tree.models[("raw", "m2")].bytes
    # Past INDEX_FROM files: the lookups build the directory's name index on first use.
    from exporter.index.tree import FileInfo

    tree.set_file(("raw", "m2", "d1", "f5"), FileInfo(1000, 2.0))
    tree.remove(("raw", "m2", "d1", "f6"))
    tree.set_file(("raw", "m2", "d1", "new"), FileInfo(7, 2.0))
    assert tree.models[("raw", "m2")].bytes == before - (2 + 1 + 5) + 1000 - (2 + 1 + 6) + 7
    assert tree.models[("raw", "m2")].files == 3 * 40

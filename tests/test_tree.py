"""The pure index: any sequence of operations equals a fresh count of the resulting tree."""

from __future__ import annotations

import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.index.tree import DirNode, FileInfo, FileTable, Tree
from exporter.metrics.model_lines import ModelLinesCache, escape_label_value, format_value
from shared import metric_names as m
from shared.layout import Layout
from shared.metric_names import OTHER_TIER

NAMES = ["raw", "quantized", "repository", "m1", "m2", "a", "b"]
path_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=4).map(tuple)


class Reference:
    """The obvious model: a dict of files and a set of directories."""

    def __init__(self) -> None:
        # path -> (size, inode, blocks)
        self.files: dict[tuple[str, ...], tuple[int, tuple[int, int] | None, int]] = {}
        self.dirs: set[tuple[str, ...]] = set()

    def _clear(self, p: tuple[str, ...]) -> None:
        self.files = {k: v for k, v in self.files.items() if k[: len(p)] != p}
        self.dirs = {d for d in self.dirs if d[: len(p)] != p}

    def _parents(self, p: tuple[str, ...]) -> None:
        for i in range(1, len(p)):
            self.files.pop(p[:i], None)
            self.dirs.add(p[:i])

    def set_file(self, p, size, inode, blocks):  # type: ignore[no-untyped-def]
        self._parents(p)
        if p in self.dirs:
            self._clear(p)
        self.files[p] = (size, inode, blocks)

    def set_dir(self, p):  # type: ignore[no-untyped-def]
        self._parents(p)
        self.files.pop(p, None)
        self.dirs.add(p)

    def remove(self, p):  # type: ignore[no-untyped-def]
        self._clear(p)

    def move(self, src, dst):  # type: ignore[no-untyped-def]
        if src == dst or dst[: len(src)] == src:
            return
        moved_files = {k: v for k, v in self.files.items() if k[: len(src)] == src}
        moved_dirs = {d for d in self.dirs if d[: len(src)] == src}
        if not moved_files and not moved_dirs:
            return
        self._clear(src)
        self._parents(dst)
        self._clear(dst)
        for k, v in moved_files.items():
            self.files[dst + k[len(src) :]] = v
        for d in moved_dirs:
            self.dirs.add(dst + d[len(src) :])

    def totals(
        self, layout: Layout
    ) -> tuple[dict[tuple[str, str], tuple[int, int, int]], dict[str, int], int, dict[str, int]]:
        """Per model (bytes, files, allocated), models per tier, all bytes, allocated per tier."""
        models: dict[tuple[str, str], list[int]] = {}
        allocated: dict[str, int] = {}
        tier_models: dict[str, int] = {}
        for p in list(self.dirs) + list(self.files):
            tier, model = layout.classify(p)
            if model is not None and len(p) == 2:
                models.setdefault((tier, model), [0, 0, 0])
                tier_models[tier] = tier_models.get(tier, 0) + 1
        seen: set[tuple[int, int]] = set()
        grand = 0
        for p, (size, inode, blocks) in self.files.items():
            if inode is not None:
                if inode in seen:
                    continue
                seen.add(inode)
            grand += size
            tier, model = layout.classify(p)
            # A file that is no model's (a file named like a tier at the top) counts in `other`.
            place = tier if model is not None else OTHER_TIER
            allocated[place] = allocated.get(place, 0) + blocks * 512
            if model is not None:
                models[(tier, model)][0] += size
                models[(tier, model)][1] += 1
                models[(tier, model)][2] += blocks * 512
        return {k: (v[0], v[1], v[2]) for k, v in models.items()}, tier_models, grand, allocated


op_st = st.one_of(
    st.tuples(
        st.just("file"),
        path_st,
        st.integers(0, 1000),
        st.none() | st.sampled_from([(1, 1), (1, 2)]),
        st.integers(0, 16),  # blocks: independent of the size (sparse, compressed, preallocated)
    ),
    st.tuples(st.just("dir"), path_st),
    st.tuples(st.just("rm"), path_st),
    st.tuples(st.just("mv"), path_st, path_st),
)


def apply(tree: Tree, ref: Reference, op: tuple) -> None:  # type: ignore[type-arg]
    kind = op[0]
    if kind == "file":
        _, p, size, inode, blocks = op
        if inode is not None:
            # One inode has one size and one allocation: an lstat through any link sees them, so
            # the reference's other links take them too.
            for other, (_, other_inode, _) in list(ref.files.items()):
                if other_inode == inode:
                    ref.files[other] = (size, inode, blocks)
        tree.set_file(p, FileInfo(size, 1.0, inode, blocks))
        ref.set_file(p, size, inode, blocks)
    elif kind == "dir":
        tree.set_dir(op[1], 1.0)
        ref.set_dir(op[1])
    elif kind == "rm":
        tree.remove(op[1])
        ref.remove(op[1])
    else:
        tree.move(op[1], op[2])
        ref.move(op[1], op[2])


def fresh_lines(tree: Tree) -> set[str]:
    """The per-model series formatted from scratch, for comparison with the cache."""
    lines = set()
    for (tier, model), b in tree.models.items():
        labels = f'{{tier="{escape_label_value(tier)}",model="{escape_label_value(model)}"}}'
        lines.add(f"{m.MODEL_BYTES}{labels} {b.bytes}")
        lines.add(f"{m.MODEL_FILES}{labels} {b.files}")
        lines.add(f"{m.MODEL_LAST_CHANGED}{labels} {format_value(b.changed)}")
        lines.add(f"{m.MODEL_ALLOCATED_BYTES}{labels} {b.allocated}")
    return lines


def check(tree: Tree, ref: Reference, *, per_model: bool, cache: ModelLinesCache | None = None) -> None:
    layout = tree.layout
    models, tier_models, grand, allocated = ref.totals(layout)
    totals = tree.tier_totals()
    assert sum(v[0] for v in totals.values()) == grand
    if per_model:
        assert {t: v for t, v in tree.tier_allocated().items() if v} == {t: v for t, v in allocated.items() if v}
    else:  # a shared inode may count in either tier
        assert sum(tree.tier_allocated().values()) == sum(allocated.values())
    assert {t: v[2] for t, v in totals.items() if v[2]} == tier_models
    assert set(tree.models) == set(models)
    if per_model:
        assert {k: (b.bytes, b.files, b.allocated) for k, b in tree.models.items()} == models
    assert all(b.bytes >= 0 and b.files >= 0 and b.allocated >= 0 for b in tree.models.values())
    # The running tier sums agree with the buckets they are kept from.
    recount = {tier: [0, 0, 0] for tier in totals}
    for (tier, _model), bucket in tree.models.items():
        recount[tier][0] += bucket.bytes
        recount[tier][1] += bucket.files
        recount[tier][2] += 1
    recount[OTHER_TIER][0] += tree.other.bytes
    recount[OTHER_TIER][1] += tree.other.files
    assert totals == {tier: tuple(v) for tier, v in recount.items()}
    if cache is not None:
        # The cache, fed only the models that changed since the last op, says what a fresh format says.
        text = cache.render(tree).decode()
        assert {line for line in text.splitlines() if not line.startswith("#")} == fresh_lines(tree)


@settings(max_examples=400, deadline=None)
@given(st.lists(op_st.filter(lambda op: op[0] != "file" or op[3] is None), max_size=40))  # type: ignore[arg-type]
def test_any_operation_sequence_equals_a_fresh_count(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    tree, ref, cache = Tree(Layout()), Reference(), ModelLinesCache()
    for op in ops:
        apply(tree, ref, op)
        check(tree, ref, per_model=True, cache=cache)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=40))
def test_hard_links_count_once_whatever_happens(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    tree, ref, cache = Tree(Layout()), Reference(), ModelLinesCache()
    for op in ops:
        apply(tree, ref, op)
        check(tree, ref, per_model=False, cache=cache)


def test_graft_of_a_scanned_subtree_counts_its_files() -> None:
    tree = Tree(Layout())
    node = DirNode()
    node.add_file("w.bin", FileInfo(100, 5.0))
    sub = DirNode()
    sub.add_file("x", FileInfo(7, 9.0))
    node.dirs["sub"] = sub
    tree.graft(("raw", "llama"), node)
    assert tree.models[("raw", "llama")].bytes == 107
    assert tree.models[("raw", "llama")].files == 2
    assert tree.models[("raw", "llama")].changed == 9.0
    assert tree.tier_totals()["raw"] == (107, 2, 1)


def test_moving_a_model_across_tiers_moves_its_bytes_without_stat() -> None:
    tree = Tree(Layout())
    tree.set_file(("raw", "m", "w"), FileInfo(10, 1.0))
    tree.set_file(("raw", "m", "d", "x"), FileInfo(5, 1.0))
    assert tree.move(("raw", "m"), ("repository", "m"))
    assert tree.tier_totals()["raw"] == (0, 0, 0)
    assert tree.tier_totals()["repository"] == (15, 2, 1)


def test_single_file_models_and_other_tier() -> None:
    tree = Tree(Layout())
    tree.set_file(("raw", "model.gguf"), FileInfo(42, 1.0))
    tree.set_file(("README",), FileInfo(3, 1.0))
    tree.set_file(("scratch", "x"), FileInfo(4, 1.0))
    totals = tree.tier_totals()
    assert totals["raw"] == (42, 1, 1)
    assert totals["other"] == (7, 2, 0)
    tree.remove(("raw", "model.gguf"))
    assert tree.tier_totals()["raw"] == (0, 0, 0)
    assert ("raw", "model.gguf") not in tree.models


def test_a_hard_link_survives_its_owning_directory_going() -> None:
    tree = Tree(Layout())
    tree.set_file(("raw", "m1", "w"), FileInfo(100, 1.0, (1, 9)))
    tree.set_file(("raw", "m2", "w"), FileInfo(100, 1.0, (1, 9)))
    assert tree.tier_totals()["raw"] == (100, 1, 2)
    tree.remove(("raw", "m1"))
    assert tree.models[("raw", "m2")].bytes == 100
    assert tree.tier_totals()["raw"] == (100, 1, 1)
    tree.move(("raw", "m2"), ("quantized", "m2"))
    assert tree.tier_totals()["quantized"] == (100, 1, 1)
    tree.remove(("quantized", "m2", "w"))
    assert sum(v[0] for v in tree.tier_totals().values()) == 0


SMALL = st.lists(st.sampled_from(["raw", "m1", "m2"]), min_size=1, max_size=3).map(tuple)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("file"), SMALL, st.integers(1, 9), st.just((1, 1)), st.integers(0, 9)),
            st.tuples(st.just("rm"), SMALL),
            st.tuples(st.just("mv"), SMALL, SMALL),
        ),
        max_size=25,
    )
)
def test_hard_links_in_a_small_namespace(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    tree, ref, cache = Tree(Layout()), Reference(), ModelLinesCache()
    for op in ops:
        apply(tree, ref, op)
        check(tree, ref, per_model=False, cache=cache)


def test_removing_a_directory_with_a_link_asks_for_the_remaining_links_to_be_checked() -> None:
    # unlink() moves the inode's ctime, which no event reports for the link left in quantized/b.
    tree = Tree(Layout())
    tree.set_file(("raw", "a", "sub", "f"), FileInfo(64, 1.0, (1, 9)))
    tree.set_file(("quantized", "b", "f"), FileInfo(64, 1.0, (1, 9)))
    tree.take_suspects()
    tree.remove(("raw", "a"))
    assert tree.take_suspects() == [(1, 9)]
    tree.remove(("quantized", "b"))  # the last link: nothing left to check
    assert tree.take_suspects() == []


def test_a_rewrite_through_one_link_is_every_links_size_and_time() -> None:
    tree = Tree(Layout())
    tree.set_file(("raw", "m1", "w"), FileInfo(1000, 1.0, (1, 9)))
    tree.set_file(("quantized", "m2", "w"), FileInfo(1000, 1.0, (1, 9)))
    tree.set_file(("quantized", "m2", "w"), FileInfo(2000, 5.0, (1, 9)))
    assert sum(v[0] for v in tree.tier_totals().values()) == 2000
    assert tree.models[("raw", "m1")].changed == tree.models[("quantized", "m2")].changed == 5.0
    # A move re-counts m1 from its table: it must hold the new size, not the one m1 was indexed with.
    assert tree.move(("raw", "m1"), ("repository", "m1"))
    assert sum(v[0] for v in tree.tier_totals().values()) == 2000


def test_links_the_index_cannot_know_about_are_found_by_size() -> None:
    tree = Tree(Layout())
    tree.set_file(("raw", "m", "a"), FileInfo(1000, 1.0))  # indexed while it had one link
    tree.set_file(("raw", "m", "same-size"), FileInfo(1000, 1.0))
    tree.set_file(("raw", "m", "other-size"), FileInfo(5, 1.0))
    tree.set_file(("quantized", "q", "b"), FileInfo(1000, 2.0, (1, 9)))  # its new link
    assert tree.link_count((1, 9)) == 1
    known, plain = tree.find_links([(1, 9)])
    assert known == {(1, 9): ("quantized", "q", "b")}
    assert sorted(plain) == [(("raw", "m", "a"), 1000), (("raw", "m", "same-size"), 1000)]
    # What the updater does once an lstat shows `a` is that inode: counted once, at one of the two.
    tree.set_file(("raw", "m", "a"), FileInfo(1000, 2.0, (1, 9)))
    assert tree.link_count((1, 9)) == 2
    assert sum(v[0] for v in tree.tier_totals().values()) == 2005


def test_links_changed_without_an_lstat_of_the_inode_are_suspects() -> None:
    tree = Tree(Layout())
    node = DirNode()
    node.add_file("w", FileInfo(10, 1.0, (1, 9)))
    tree.graft(("raw", "m"), node)  # a scan: the inode's other links are not known
    assert tree.take_suspects() == [(1, 9)]
    tree.set_file(("raw", "n", "w"), FileInfo(10, 2.0, (1, 9)))  # an lstat: the caller checks st_nlink
    assert tree.take_suspects() == []
    tree.remove(("raw", "n", "w"))  # the other link's ctime moved
    assert tree.take_suspects() == [(1, 9)]


def test_single_file_models_take_their_own_time() -> None:
    tree = Tree(Layout())
    tier = DirNode(50.0)  # scanned: one newest time for the directory and its files
    tier.add_file("old.gguf", FileInfo(1, 3.0))
    tier.add_file("new.gguf", FileInfo(1, 50.0))
    tree.graft(("raw",), tier)
    assert sorted(tree.single_file_models()) == [("raw", "new.gguf"), ("raw", "old.gguf")]
    assert tree.single_file_models(("quantized",)) == []
    tree.set_model_changed(("raw", "old.gguf"), 3.0)
    assert tree.models[("raw", "old.gguf")].changed == 3.0
    assert tree.models[("raw", "new.gguf")].changed == 50.0


def _body_lines(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if not line.startswith("#")]


def test_the_cache_stays_right_across_blocks_and_reused_slots() -> None:
    """Hundreds of models over several blocks; rounds of rewrites, removals and new models (which
    take emptied slots), with the cache told only of the models that changed."""
    rng = random.Random(7)
    tree, cache = Tree(Layout()), ModelLinesCache()
    names = [f"m{i:04d}" for i in range(700)]
    for i, name in enumerate(names):
        tree.set_file(("raw", name, "w"), FileInfo(i, 1.0))
    for round_ in range(30):
        for name in rng.sample(names, 40):
            tree.set_file(("raw", name, "w"), FileInfo(rng.randrange(10_000), 2.0 + round_))
        for name in rng.sample(names, 15):
            tree.remove(("raw", name))
        for i in range(rng.randrange(25)):
            tree.set_file(("quantized", f"new-{round_}-{i}", "w"), FileInfo(i, 3.0))
        lines = _body_lines(cache.render(tree))
        assert len(lines) == len(set(lines))
        assert set(lines) == fresh_lines(tree)
    assert cache.formatted < 700 + 30 * 80  # changed models only, never the whole tree each round
    # Most models go: the emptied slots outnumber the used ones and the cache lays them out afresh.
    for name in names[:650]:
        tree.remove(("raw", name))
    before = cache.formatted
    assert set(_body_lines(cache.render(tree))) == fresh_lines(tree)
    assert cache.formatted - before == len(tree.models)


def test_every_cache_stays_right_when_two_take_turns_on_one_tree() -> None:
    tree = Tree(Layout())
    for i in range(300):
        tree.set_file(("raw", f"m{i}", "w"), FileInfo(i, 1.0))
    first, second = ModelLinesCache(), ModelLinesCache()
    for round_ in range(5):
        tree.set_file(("raw", f"m{round_}", "w"), FileInfo(10_000 + round_, 5.0))
        tree.remove(("raw", f"m{299 - round_}"))
        for cache in (first, second):
            assert set(_body_lines(cache.render(tree))) == fresh_lines(tree)


# ----- FileTable: names joined as a scan worker sent them, or a list -----

TABLE_OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "pop", "replace", "send", "read", "join"]),
        st.sampled_from([f"n{i}" for i in range(40)] + ["ünï", "a b"]),
        st.integers(0, 2**40),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(ops=TABLE_OPS)
def test_a_file_table_answers_alike_however_its_names_are_held(ops: list[tuple[str, str, int]]) -> None:
    # "send" is a trip through pickle, as from a scan worker: the names come back joined.
    table = FileTable()
    model: dict[str, tuple[int, int]] = {}
    for op, name, size in ops:
        blocks = size % 2**33
        if op == "put":
            table.put(name, size, blocks)
            model[name] = (size, blocks)
        elif op == "pop" and name in model:
            assert table.pop(name) == model.pop(name)
        elif op == "replace":
            assert table.replace(name, size, blocks) == model.get(name)
            if name in model:
                model[name] = (size, blocks)
        elif op == "send":
            table = pickle.loads(pickle.dumps(table))
        elif op == "join":
            # As the scan's C loop adds a directory's files: new names joined, then their sizes.
            new = [n for n in (name, name + "-2") if n not in model]
            table.extend_joined("\0".join(new))
            for n in new:
                table.sizes.append(size)
                table.blocks.fromlist([0])
                model[n] = (size, 0)
        elif op == "read":
            joined = table._joined is not None
            assert sorted(table) == sorted(model)
            assert len(table) == len(model)
            assert table.total() == sum(v[0] for v in model.values())
            # Reading every name keeps a joined table joined: its memory stays one string.
            assert (table._joined is not None) == joined
        assert {n: (s, b) for n, s, b in table.entries()} == model
        assert (table._names is None) != (table._joined is None)
    for name, (size, blocks) in model.items():
        assert name in table and table[name] == size and table.blocks_of(name) == blocks

"""RSS bytes per tracked file with the index of a generated tree (1,000,000 files by default) in memory.

The index keeps each file's apparent size and its allocated blocks. `BENCH_MEMORY_BEFORE=<dir>`
also measures the index code of another checkout (e.g. `git archive <commit>` of the code before a
change) on the same tree in the same run, for a before/after ratio.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from bench.common import env_int, generated_tree, report, warm, write_result

TARGET_BYTES_PER_FILE = 100.0


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _child(kind: str, path: str) -> None:
    """Runs in a fresh interpreter: RSS before and after holding the index, as JSON on stdout."""
    from exporter.index.scan import Scanner
    from exporter.index.tree import Tree
    from shared.layout import Layout

    gc.collect()
    before = rss_bytes()
    holder: object
    if kind == "index":
        scanner = Scanner(os.cpu_count() or 1)
        scanner.start()
        result = scanner.scan(path)
        scanner.close()
        tree = Tree(Layout())
        assert result.node is not None
        tree.graft((), result.node)
        files = result.files
        holder = tree
        del result
    else:
        # The obvious design, for the ratio: a dict of name -> size per directory.
        nested: dict[str, dict[str, int]] = {}
        files = 0
        for dirpath, _dirs, names in os.walk(path):
            sizes = {name: os.lstat(os.path.join(dirpath, name)).st_size for name in names}
            nested[dirpath] = sizes
            files += len(sizes)
        holder = nested
    gc.collect()
    after = rss_bytes()
    print(json.dumps({"before": before, "after": after, "files": files}))
    del holder


def _measure(kind: str, path: str, source: str | None = None) -> dict[str, int]:
    """Measure in a fresh interpreter; `source`: the checkout whose code to import (default: this one)."""
    env = None if source is None else {**os.environ, "PYTHONPATH": source}
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_exporter_memory", "--child", kind, path],
        check=True,
        capture_output=True,
        text=True,
        cwd=source,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> dict[str, object]:
    files = env_int("BENCH_FILES", 1_000_000)
    models = generated_tree(files)
    warm(models)
    index = _measure("index", str(models))
    per_file = (index["after"] - index["before"]) / index["files"]
    figures: dict[str, object] = {
        "files": index["files"],
        "rss_before_bytes": index["before"],
        "rss_after_bytes": index["after"],
        "bytes_per_file": round(per_file, 1),
        "target_bytes_per_file": TARGET_BYTES_PER_FILE,
        "met": per_file <= TARGET_BYTES_PER_FILE,
    }
    line = f"memory {index['files']:,} files: {per_file:.1f} B/file RSS (target <= {TARGET_BYTES_PER_FILE:g})"
    if env_int("BENCH_MEMORY_BASELINE", 1):
        base = _measure("dicts", str(models))
        base_per_file = (base["after"] - base["before"]) / base["files"]
        figures["baseline_dict_per_directory_bytes_per_file"] = round(base_per_file, 1)
        figures["ratio_vs_dict_per_directory"] = round(per_file / base_per_file, 3)
        line += f"; a dict per directory {base_per_file:.1f} B/file, ratio {per_file / base_per_file:.2f}"
    before_source = os.environ.get("BENCH_MEMORY_BEFORE")
    if before_source:
        old = _measure("index", str(models), before_source)
        old_per_file = (old["after"] - old["before"]) / old["files"]
        figures["before_bytes_per_file"] = round(old_per_file, 1)
        figures["ratio_vs_before"] = round(per_file / old_per_file, 3)
        line += f"; the code in {before_source} {old_per_file:.1f} B/file, ratio {per_file / old_per_file:.3f}"
    report(line)
    write_result("exporter_memory", figures)
    return figures


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()

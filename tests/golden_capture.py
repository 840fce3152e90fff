"""Capture what the real exporter serves on one fixed tree, for the golden "no behaviour change" test.

`python -m tests.golden_capture --venv VENV --out DIR` builds the tree in a temp directory, runs
VENV/bin/model-storage-exporter on a free loopback port, fetches /metrics, /openapi.json, /docs and
/storage/info (admin token), normalises them and writes one file each to DIR. tests/test_output_golden.py
runs the same capture against this checkout's exporter and compares with tests/data/golden/.

Invariants:
- It imports none of the project's packages (tests.support loads none), so it runs against any
  checkout's venv (the golden files were made from commit 8830761, the code before the API split)
  without importing that checkout's code.
- The tree is fixed: names, sizes, hard links and every mtime are set here; every regular file's
  size is 0 or a multiple of 4096 and written in full, so allocated bytes are the apparent bytes on
  the usual filesystems (ext4, xfs, tmpfs).
- Only what must vary is normalised; each rule is listed in NORMALISATIONS with why, and each rule
  matches only its own series or fields (a rule that matches nothing changes nothing).
- The exporter runs with the settings that make its output stable: scrub off, opens tracking off,
  reconcile interval 0 (no timed rescan), one scan worker, fixed capacity and tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support import free_port, http_get, start_process

ADMIN_TOKEN = "golden-admin-token-0123456789"
READ_TOKEN = "golden-read-token-0123456789"
BASE_MTIME = 1_750_000_000  # 2025-06-15, a fixed moment for every file and directory
BLOCK = 4096
OUTPUTS = ("metrics.txt", "openapi.json", "docs.html", "storage_info.json")
START_TIMEOUT_SECONDS = 60.0

# (tier, model name as bytes, {relative file path: size in bytes}); sizes multiples of BLOCK or 0.
MODELS: list[tuple[str, bytes, dict[str, int]]] = [
    ("raw", b"llama-3-8b", {"model.safetensors": 6 * BLOCK, "config.json": BLOCK, "tokenizer/vocab.txt": 2 * BLOCK}),
    ("raw", b"mistral-7b", {"weights.bin": 5 * BLOCK}),
    ("raw", b"bad\xffname\xfe", {"blob.bin": 3 * BLOCK}),
    ("raw", b'quote"back\\slash', {"w.bin": BLOCK}),
    ("raw", b"empty-model", {}),
    ("quantized", b"llama-3-8b-q4", {"model.gguf": 4 * BLOCK}),
    ("quantized", b"mistral-7b-q8", {"model.gguf": 2 * BLOCK, "zero.txt": 0}),
    ("quantized", b"phi-3 mini (q5)", {"a/b/c/deep.bin": BLOCK}),
    ("quantized", "caf\u00e9-\u6a21\u578b".encode(), {"m.bin": 2 * BLOCK}),
    ("repository", b"llama-3-8b", {"v1/model.safetensors": 6 * BLOCK, "v2/model.safetensors": 7 * BLOCK}),
    ("repository", b"gemma-2b", {"model.bin": 3 * BLOCK}),
    ("repository", b"tiny", {"t.bin": BLOCK}),
]
# (link, target) inside the models path: within one model, across models, across tiers.
HARD_LINKS: list[tuple[bytes, bytes]] = [
    (b"raw/mistral-7b/weights-copy.bin", b"raw/mistral-7b/weights.bin"),
    (b"repository/tiny/shared.bin", b"repository/gemma-2b/model.bin"),
    (b"quantized/llama-3-8b-q4/from-raw.bin", b"raw/llama-3-8b/config.json"),
]
# Files that are in no model: at the top of the models path, in an unknown directory, loose in a tier.
OUTSIDE: dict[bytes, int] = {b"README.txt": BLOCK, b"scratch/tmp.bin": 2 * BLOCK, b"raw/loose-file.bin": BLOCK}

# (what, pattern, replacement, why) applied in order to each output named in `what`.
NORMALISATIONS: list[tuple[str, str, str, str]] = [
    (
        "metrics.txt",
        r"(?m)^(?:# (?:HELP|TYPE) )?process_\S*.*\n",
        "",
        "process_* series (CPU, memory, fds, start time), should a process collector be registered, are "
        "the process's own, never the tree's",
    ),
    (
        "metrics.txt",
        r"(?m)^(model_storage_filesystem_(?:size|avail)_bytes) \S+$",
        r"\1 <fs-bytes>",
        "the real filesystem's size and free space under the temp directory",
    ),
    (
        "metrics.txt",
        r"(?m)^(model_storage_watch_limit) \S+$",
        r"\1 <sysctl>",
        "fs.inotify.max_user_watches of the machine (some tests lower it for a moment)",
    ),
    (
        "metrics.txt",
        r"(?m)^(model_storage_(?:scan_duration_seconds|last_full_scan_timestamp_seconds)) \S+$",
        r"\1 <clock>",
        "the start-up scan's duration and the moment it finished",
    ),
    (
        "metrics.txt",
        r"(?m)^(model_storage_model_last_changed_timestamp_seconds\{[^}]*\}) \S+$",
        r"\1 <ctime>",
        "newest mtime or ctime of a model: the ctime is when the tree was built and cannot be set",
    ),
    (
        "storage_info.json",
        r'"(last_changed|last_full_scan|scan_duration_seconds|generated_at)":[0-9.e+-]+',
        r'"\1":"<clock>"',
        "ctime of each model (as above), the scan's end and duration, the clock at the request",
    ),
    (
        "storage_info.json",
        r'"filesystem":\{"size_bytes":[0-9]+,"avail_bytes":[0-9]+,"usage_ratio":[0-9.e+-]+\}',
        '"filesystem":"<fs>"',
        "the real filesystem's size and free space under the temp directory",
    ),
]


def _write(path: bytes, size: int, mtime: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x5a" * size)
    os.utime(path, (mtime, mtime))


def build_tree(models: Path) -> None:
    """The fixed tree: three tiers, a dozen models, odd names, hard links, an empty model, strays."""
    root = os.fsencode(models)
    for tier in ("raw", "quantized", "repository"):
        os.makedirs(os.path.join(root, tier.encode()), exist_ok=True)
    for i, (tier, name, files) in enumerate(MODELS):
        model = os.path.join(root, tier.encode(), name)
        os.makedirs(model, exist_ok=True)
        for j, (rel, size) in enumerate(sorted(files.items())):
            _write(os.path.join(model, rel.encode()), size, BASE_MTIME + 3600 * i + 60 * j)
    for link, target in HARD_LINKS:
        os.link(os.path.join(root, target), os.path.join(root, link))
    for stray, stray_size in OUTSIDE.items():
        _write(os.path.join(root, stray), stray_size, BASE_MTIME - 86400)
    # Directories last and deepest first: creating a child touches its parent's mtime.
    dirs = [dirpath for dirpath, _dirs, _files in os.walk(root)]
    for dirpath in sorted(dirs, key=lambda d: -d.count(b"/")):
        os.utime(dirpath, (BASE_MTIME, BASE_MTIME))


def normalise(what: str, text: str) -> str:
    for target, pattern, replacement, _why in NORMALISATIONS:
        if target == what:
            text = re.sub(pattern, replacement, text)
    return text


@contextlib.contextmanager
def running_exporter(venv: Path, work: Path) -> Iterator[str]:
    """The real exporter over `work`/models with stable settings; yields its base URL, stops it by PID."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
    env.update(
        STORAGE_BASE_PATH=str(work / "base"),
        STORAGE_MODELS_PATH=str(work / "models"),
        STORAGE_STATE_PATH=str(work / "state"),
        STORAGE_AUDIT_LOG=str(work / "state" / "audit.log"),
        STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{port}",
        STORAGE_LOG_FORMAT="json",
        STORAGE_SCAN_WORKERS="1",
        STORAGE_SCRUB_STATS_PER_SECOND="0",
        STORAGE_OPENS_TRACKING="false",
        STORAGE_RECONCILE_INTERVAL_SECONDS="0",
        STORAGE_MAX_SIZE_GB="1",
        STORAGE_ADMIN_TOKEN=ADMIN_TOKEN,
        STORAGE_READ_TOKEN=READ_TOKEN,
    )
    (work / "base").mkdir(exist_ok=True)
    (work / "state").mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    argv = [str(venv / "bin" / "model-storage-exporter")]
    proc = start_process(argv, work / "exporter.log", url, "/readyz", env=env, timeout=START_TIMEOUT_SECONDS)
    try:
        yield url
    finally:
        proc.stop(15)


def _fetch(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, body = http_get(url, timeout=10, headers=headers)
    if status != 200:
        raise RuntimeError(f"GET {url}: {status} {body[:300]!r}")
    return body.decode("utf-8")


def capture(venv: Path) -> dict[str, str]:
    """The four outputs of VENV's exporter on the fixed tree, normalised: {file name: text}."""
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        work = Path(tmp)
        build_tree(work / "models")
        with running_exporter(venv, work) as url:
            raw = {
                "metrics.txt": _fetch(url + "/metrics"),
                "openapi.json": _fetch(url + "/openapi.json"),
                "docs.html": _fetch(url + "/docs"),
                "storage_info.json": _fetch(url + "/storage/info?top=1000", ADMIN_TOKEN),
            }
        # Temp paths: no output should hold one; if one ever does, it is named, not compared.
        raw = {k: v.replace(tmp, "<tmp>") for k, v in raw.items()}
    return {name: normalise(name, text) for name, text in raw.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden_capture", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True, help="the venv whose model-storage-exporter to run")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the golden files to")
    args = parser.parse_args(argv)
    outputs = capture(args.venv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

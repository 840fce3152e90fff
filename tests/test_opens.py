"""Last opened per model: the pure tracker on hand-built streams, the reader's translation of raw
inotify events, and the real exporter watching a child process that opens and maps a model."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from watchdog.observers.inotify_c import InotifyConstants as C

from exporter.index.opens import OpensTracker, parse_state
from exporter.index.opens_store import OpensRecorder
from exporter.index.reader import Handoff, InotifyReader
from shared.layout import Layout
from shared.own_reads import Session, own_reads
from tests.support import (
    exporter_env,
    http_get,
    make_model,
    make_service,
    parse_metrics,
    run_cleaner,
    save_age_plan,
    start_exporter,
    wait_until,
)

ROOT = "/m"
LAST_OPENED = "model_storage_model_last_opened_timestamp_seconds"
SINCE = "model_storage_opens_tracking_since_timestamp_seconds"

# A model server's load: open, read in pages, map and touch every page, close; once per file.
LOADER = """
import mmap, os, sys
for top in sys.argv[1:]:
    for dirpath, _, names in os.walk(top):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(4096):
                    pass
                if os.fstat(f.fileno()).st_size:
                    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                    for i in range(0, len(m), 4096):
                        m[i]
                    m.close()
"""


def load_models(*dirs: Path) -> None:
    subprocess.run([sys.executable, "-c", LOADER, *map(str, dirs)], check=True, timeout=120)


def tracker(**kw: object) -> OpensTracker:
    return OpensTracker(ROOT, Layout(), 0.0, **kw)  # type: ignore[arg-type]


def alive(_n: str, _s: Session) -> bool:
    return True


def no_session(_name: str) -> Session | None:
    return None


# ----- the pure tracker -----


def test_opens_in_a_model_count_per_model_and_outside_models_do_not() -> None:
    t = tracker()
    t.apply([("open", "/m/repository/a/w.bin"), ("open", "/m/raw/b"), ("open", "/m/x.txt")], 10.0, no_session, alive)
    t.apply([("open", "/m/repository/a/sub/c.json"), ("open", "/elsewhere/raw/z/f")], 20.0, no_session, alive)
    assert t.opened == {("repository", "a"): 20.0, ("raw", "b"): 10.0}


def test_own_reads_session_hides_exactly_the_opens_between_its_start_and_end() -> None:
    session = Session("h", 1, 1e9, frozenset({"repository/a"}))
    t = tracker()
    t.apply([("open", "/m/repository/a/w")], 1.0, no_session, alive)
    t.apply([("start", "s.json"), ("open", "/m/repository/a/w"), ("open", "/m/repository/b/w")], 2.0,
            lambda name: session if name == "s.json" else None, alive)  # fmt: skip
    assert t.opened == {("repository", "a"): 1.0, ("repository", "b"): 2.0}
    assert t.figures.own == 1
    t.apply([("end", "s.json"), ("open", "/m/repository/a/w")], 3.0, no_session, alive)
    assert t.opened[("repository", "a")] == 3.0


def test_a_session_whose_pid_died_or_deadline_passed_hides_nothing() -> None:
    for session, pid_alive in (
        (Session("h", 1, 1e9, frozenset({"repository/a"})), False),
        (Session("h", 1, 5.0, frozenset({"repository/a"})), True),
    ):
        t = tracker()

        def marker(_name: str, s: Session = session) -> Session | None:
            return s

        def live(_name: str, _s: Session, a: bool = pid_alive) -> bool:
            return a

        t.apply([("start", "s.json")], 1.0, marker, live)
        t.apply([("open", "/m/repository/a/w")], 6.0, no_session, live)
        assert t.opened == {("repository", "a"): 6.0}


def test_ignore_globs_match_paths_relative_to_the_models_path() -> None:
    t = tracker(ignore=("*/*/.cache/*", "repository/*/config.pbtxt"))
    items = [
        ("open", "/m/repository/a/config.pbtxt"),
        ("open", "/m/raw/b/.cache/x/y"),
        ("open", "/m/raw/c/weights.bin"),
    ]
    t.apply(items, 1.0, no_session, alive)
    assert t.opened == {("raw", "c"): 1.0}
    assert t.figures.ignored == 2


def test_held_opens_count_after_the_window_and_a_sweep_drops_them_and_what_follows() -> None:
    t = tracker(sweep_models=2, sweep_window=10.0)
    t.apply([("open", "/m/raw/a/f"), ("open", "/m/raw/b/f")], 1.0, no_session, alive)
    assert t.opened == {}  # held back
    t.apply([("open", "/m/raw/a/g")], 5.0, no_session, alive)
    t.tick(11.0)
    assert t.opened == {("raw", "a"): 5.0, ("raw", "b"): 1.0}
    # A sweep: three models within the window.
    t.apply([("open", f"/m/raw/{n}/f") for n in "cde"], 20.0, no_session, alive)
    assert t.figures.sweeps == 1
    t.apply([("open", "/m/raw/f/f")], 25.0, no_session, alive)  # still inside the sweep: dropped
    t.tick(40.0)
    assert set(t.opened) == {("raw", "a"), ("raw", "b")}
    t.apply([("open", "/m/raw/g/f")], 36.0, no_session, alive)  # 11 s after the last sweep open
    t.tick(46.0)
    assert t.opened[("raw", "g")] == 36.0


def test_an_overflow_is_a_gap_in_tracking() -> None:
    t = tracker(sweep_models=5, sweep_window=10.0)
    t.apply([("open", "/m/raw/a/f")], 1.0, no_session, alive)
    t.apply([("overflow", "")], 2.0, no_session, alive)
    t.tick(20.0)
    assert t.since == 2.0 and t.opened == {}


def test_saved_state_round_trips_and_junk_is_refused() -> None:
    t = tracker()
    t.apply([("open", "/m/raw/a/f"), ("open", "/m/repository/b\udcff/f")], 3.0, no_session, alive)
    since, saved_at, opened = parse_state(json.loads(json.dumps(t.to_json(4.0))))
    assert (since, saved_at, opened) == (0.0, 4.0, t.opened)
    junk: object
    for junk in ([], {"version": 2}, {"version": 1, "since": 1, "saved_at": 1, "opened": {"nomodel": 1}}):
        with pytest.raises(ValueError):
            parse_state(junk)


# ----- the reader -----


def test_reader_turns_file_opens_into_items_and_drops_directory_opens(tmp_path: Path) -> None:
    seen: list[object] = []
    reader = InotifyReader(str(tmp_path), Handoff(100), seen.append, lambda p, e: None, on_opens=seen.append)
    try:
        reader._paths[7] = f"{tmp_path}/repository/a"
        hints = reader.translate(
            [
                (7, C.IN_OPEN | C.IN_ISDIR, 0, b""),  # the watched directory listed
                (7, C.IN_OPEN | C.IN_ISDIR, 0, b"sub"),  # a subdirectory opened
                (7, C.IN_OPEN, 0, b""),
                (7, C.IN_OPEN, 0, b"w.bin"),
                (8, C.IN_OPEN, 0, b"x"),  # a watch we do not know
            ]
        )
        assert hints == []
        assert reader.take_opens() == [("open", f"{tmp_path}/repository/a/w.bin")]
    finally:
        reader._fd.close()


# ----- the real exporter, a child process loading a model -----


def test_a_child_process_that_opens_and_maps_a_model_sets_its_last_opened_once_per_file(tmp_path: Path) -> None:
    models = tmp_path / "models"
    files = {f"shard-{i:02d}.bin": os.urandom(64 * 1024) for i in range(12)}
    loaded = make_model(models, "repository", "llama", files)
    other = make_model(models, "repository", "other", {"w.bin": b"x" * 10000, "sub/c.json": b"{}"})
    svc = make_service(tmp_path, STORAGE_OPENS_SWEEP_MODELS="0")
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=60)
        before = time.time()
        # Not opens: stat, listing, O_PATH.
        os.stat(other / "w.bin")
        os.listdir(other / "sub")
        os.close(os.open(other / "w.bin", os.O_PATH))
        load_models(loaded)
        snap = wait_until(lambda: s if (s := svc.snapshot()).last_opened else None, timeout=30, what="last opened")
        assert [(t, m) for t, m, _ in snap.last_opened] == [("repository", "llama")]
        assert before <= snap.last_opened[0][2] <= time.time()
        assert snap.opens_since is not None and snap.opens_since <= before
        assert svc.opens is not None
        # One event per open: 12 files, each read in 16 pages and mapped; the loader's own
        # interpreter start opens nothing in the store.
        wait_until(lambda: svc.opens is not None and svc.opens.tracker.figures.seen >= 12, timeout=10)
        assert svc.opens.tracker.figures.seen == 12
    finally:
        svc.stop()


def test_metrics_of_a_real_exporter_pass_promtool_and_are_absent_for_models_never_opened(tmp_path: Path) -> None:
    models = tmp_path / "models"
    opened = make_model(models, "quantized", "mistral", {"w.gguf": b"q" * 5000})
    make_model(models, "quantized", "idle", {"w.gguf": b"q" * 5000})
    proc = start_exporter(models, tmp_path, tmp_path, STORAGE_OPENS_SWEEP_MODELS="0")
    try:
        load_models(opened)

        def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            return parse_metrics(http_get(proc.url + "/metrics")[1].decode())

        key = (LAST_OPENED, frozenset({("tier", "quantized"), ("model", "mistral")}))
        samples = wait_until(lambda: s if (s := scrape()).get(key) else None, timeout=30, what="last opened series")
        assert not any(name == LAST_OPENED and ("model", "idle") in labels for name, labels in samples)
        assert samples[(SINCE, frozenset())] <= samples[key]
        text = http_get(proc.url + "/metrics")[1]
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()
    finally:
        proc.stop()


def test_a_corrupt_state_file_is_logged_and_tracking_starts_afresh(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model(models, "raw", "a", {"f": b"1"})
    state = tmp_path / "state" / "opens.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"version": 1, "since": 1, "saved_at"')
    started = time.time()
    proc = start_exporter(models, tmp_path, tmp_path)
    try:
        samples = parse_metrics(http_get(proc.url + "/metrics")[1].decode())
        assert samples[(SINCE, frozenset())] >= started - 1
        assert not any(name == LAST_OPENED for name, _ in samples)
        lines = [line for line in proc.log().splitlines() if "opens.state_corrupt" in line]
        assert len(lines) == 1 and str(state) in lines[0], proc.log()[-2000:]
    finally:
        proc.stop()


def test_sigkill_loses_at_most_the_last_save_interval(tmp_path: Path) -> None:
    """Kill the exporter at several moments after an open: what was saved before survives exactly,
    the open is saved once an interval (plus slack) has passed, and the restart serves the file."""
    models = tmp_path / "models"
    interval = 1.0
    slack = 3.0  # event reading and a contended machine
    names = [f"m{i}" for i in range(6)]
    for name in names:
        make_model(models, "raw", name, {"f": b"x"})
    state = tmp_path / "state" / "opens.json"
    env = {"STORAGE_OPENS_SWEEP_MODELS": "0", "STORAGE_OPENS_SAVE_INTERVAL_SECONDS": str(interval)}
    saved: dict[str, float] = {}
    bounded = 0  # rounds killed long enough after the open that it must have been saved
    for kill_after, name in zip((0.0, 0.4, 0.9, 1.6, 2.6, 4.5), names, strict=True):
        before = dict(saved)
        proc = start_exporter(models, tmp_path, tmp_path, **env)
        load_models(models / "raw" / name)
        opened_at = time.time()
        while time.time() < opened_at + kill_after:  # a schedule, not a wait for a condition: the kill moment
            time.sleep(0.05)
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)
        killed = time.time()
        saved = json.loads(state.read_text())["opened"] if state.exists() else {}
        assert {k: saved.get(k) for k in before} == before
        if killed - opened_at > interval + slack:
            assert f"raw/{name}" in saved, (name, killed - opened_at, saved)
            bounded += 1
        restarted = start_exporter(models, tmp_path, tmp_path, **env)
        try:
            samples = parse_metrics(http_get(restarted.url + "/metrics")[1].decode())
            served = {dict(labels)["model"]: v for (n, labels), v in samples.items() if n == LAST_OPENED}
            assert served == {key.split("/")[1]: ts for key, ts in saved.items()}
        finally:
            assert restarted.stop() == 0
        saved = json.loads(state.read_text())["opened"] if state.exists() else {}
    assert bounded >= 1
    # A clean stop saves everything at once.
    proc = start_exporter(models, tmp_path, tmp_path, **env | {"STORAGE_OPENS_SAVE_INTERVAL_SECONDS": "3600"})
    load_models(*(models / "raw" / n for n in names))
    wait_until(lambda: len(parse_metrics(http_get(proc.url + "/metrics")[1].decode())) and True, timeout=5)
    assert proc.stop() == 0
    final = json.loads(state.read_text())["opened"]
    assert set(final) == {f"raw/{n}" for n in names}


# ----- model-storage's own opens -----


def test_a_real_cleaner_run_and_restore_do_not_move_last_opened(tmp_path: Path) -> None:
    models = tmp_path / "models"
    files = {f"part-{i}.bin": os.urandom(4096) for i in range(8)}
    model = make_model(models, "raw", "victim", files)
    busy = make_model(models, "raw", "busy", {"w": b"b" * 100})
    single = models / "raw" / "single.gguf"  # a single-file model: the checks open it to flock it
    single.write_bytes(b"g" * 1000)
    old = time.time() - 90 * 86400
    for path in [*model.iterdir(), model, single]:
        os.utime(path, (old, old))
    svc = make_service(tmp_path, STORAGE_OPENS_SWEEP_MODELS="0", STORAGE_OPENS_SAVE_INTERVAL_SECONDS="3600")
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=60)
        assert svc.opens is not None
        load_models(model)
        # The load's eight opens may be handled in two batches with two clocks: `first` is read once all
        # eight are counted, or a later batch of the load itself would look like a move.
        tracker = svc.opens.tracker
        wait_until(lambda: tracker.figures.counted == 8, timeout=30)
        first = {(t, m): v for t, m, v in svc.snapshot().last_opened}
        assert set(first) == {("raw", "victim")}, first
        env = exporter_env(models, tmp_path, STORAGE_BACKUP_MODE="archive", STORAGE_CLEANUP_GRACE_HOURS="0")
        plan_id = save_age_plan(env, ["raw/victim", "raw/single.gguf"])
        # The archive mode copies every file (reads) before removing the model; restore writes them back.
        run_cleaner(["run", "--plan", plan_id, "--json"], env, check=True)
        wait_until(lambda: not model.exists(), timeout=10)
        runs = [p.name for p in (tmp_path / "backup").iterdir()]
        run_cleaner(["restore", runs[0], "--json"], env, check=True)
        wait_until(lambda: (model / "part-7.bin").exists(), timeout=10)
        # A sentinel: events are handled in kernel order, so once this open is seen every open of
        # the run and the restore has been handled too.
        load_models(busy)
        wait_until(lambda: ("raw", "busy") in {(t, m) for t, m, _ in svc.snapshot().last_opened}, timeout=30)
        figures = tracker.figures
        # Counted: the load (8 files) and `busy`; the cleaner's checks and copies are its own.
        assert (figures.counted, figures.own) == (9, figures.seen - 9) and figures.own >= 8, figures
        after = {(t, m): v for t, m, v in svc.snapshot().last_opened}
        assert after.get(("raw", "victim")) == first[("raw", "victim")], (first, after)
        assert ("raw", "single.gguf") not in after
        assert not list((tmp_path / "state" / "reading").glob("*.json"))  # every session ended
    finally:
        svc.stop()


def test_own_reads_marker_is_written_before_and_renamed_after(tmp_path: Path) -> None:
    with own_reads(tmp_path, ["raw/a", "raw/b"], deadline_seconds=60):
        (active,) = (tmp_path / "reading").glob("*.json")
        data = json.loads(active.read_text())
        assert data["pid"] == os.getpid() and data["models"] == ["raw/a", "raw/b"]
        assert time.time() < data["deadline"] <= time.time() + 60
    assert not active.exists() and active.with_suffix(".done").exists()


# ----- races: the stream is read after the cleaner is gone -----


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    return child.pid


def _recorder(tmp_path: Path, now: float = 1000.0) -> OpensRecorder:
    return OpensRecorder(
        ROOT,
        Layout(),
        tmp_path,
        ignore=(),
        sweep_models=0,
        sweep_window=60.0,
        save_interval=60.0,
        clock=lambda: now,
    )


def test_a_session_ended_before_its_opens_were_read_still_covers_them(tmp_path: Path) -> None:
    """The cleaner wrote its marker, opened, renamed it to .done and exited, all before the exporter
    read the stream: the marker is read under its .done name and covers until its end item."""
    (tmp_path / "reading").mkdir()
    session = Session(socket.gethostname(), _dead_pid(), 5000.0, frozenset({"raw/a"}))
    (tmp_path / "reading" / "s.done").write_text(json.dumps(session.to_json()))
    rec = _recorder(tmp_path)
    rec.handle([("start", "s.json"), ("open", "/m/raw/a/f"), ("end", "s.json"), ("open", "/m/raw/b/f")])
    assert rec.tracker.opened == {("raw", "b"): 1000.0} and rec.tracker.figures.own == 1


def test_a_killed_cleaners_session_stops_covering_once_its_pid_is_gone(tmp_path: Path) -> None:
    (tmp_path / "reading").mkdir()
    session = Session(socket.gethostname(), _dead_pid(), 5000.0, frozenset({"raw/a"}))
    (tmp_path / "reading" / "s.json").write_text(json.dumps(session.to_json()))
    rec = _recorder(tmp_path)
    rec.handle([("start", "s.json"), ("open", "/m/raw/a/f")])
    assert rec.tracker.opened == {("raw", "a"): 1000.0}


def test_concurrent_loaders_and_cleaner_sessions_under_load_match_the_oracle(tmp_path: Path) -> None:
    """Seeded rounds: loader processes and own-reads sessions (in child processes) open random models
    at once while both cores are busy. Oracle: a model counts as opened exactly when a loader opened it."""
    seed = int(os.environ.get("OPENS_RACE_SEED", "16"))
    rng = random.Random(seed)
    models = tmp_path / "models"
    names = [f"m{i:02d}" for i in range(12)]
    for name in names:
        make_model(models, "raw", name, {f"f{j}": b"x" * 100 for j in range(3)})
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    svc = make_service(tmp_path, STORAGE_OPENS_SWEEP_MODELS="0")
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=60)
        recorder = svc.opens
        assert recorder is not None
        for round_ in range(4):
            loaded = set(rng.sample(names, 3))
            own = set(rng.sample([n for n in names if n not in loaded], 4))
            before = {m for (_, m) in recorder.view()[1]}
            script = (
                "import sys; from pathlib import Path; from shared.own_reads import own_reads\n"
                "from tests.test_opens import load_models\n"
                "with own_reads(Path(sys.argv[1]), ['raw/' + n for n in sys.argv[3:]]):\n"
                "    load_models(*[Path(sys.argv[2]) / n for n in sys.argv[3:]])\n"
            )
            cleaner = subprocess.Popen(
                [sys.executable, "-c", script, str(tmp_path / "state"), str(models / "raw"), *sorted(own)],
                cwd=Path(__file__).resolve().parent.parent,
            )
            load_models(*(models / "raw" / n for n in sorted(loaded)))
            assert cleaner.wait(120) == 0
            sentinel = names[round_ % len(names)]
            load_models(models / "raw" / sentinel)  # in kernel order after both
            key = ("raw", sentinel)
            wait_until(lambda: key in recorder.view()[1], timeout=30)  # noqa: B023 (used within the iteration)
            seen = {m for (_, m) in recorder.view()[1]}
            assert seen - before <= loaded | {sentinel}, (seed, round_, seen - before, loaded, own)
            assert loaded <= seen, (seed, round_, loaded - seen)
    finally:
        svc.stop()
        for burner in burners:
            burner.kill()
            burner.wait(10)


def test_a_session_under_way_when_the_exporter_starts_is_taken_up(tmp_path: Path) -> None:
    (tmp_path / "reading").mkdir()
    session = Session(socket.gethostname(), os.getpid(), 5000.0, frozenset({"raw/a"}))
    (tmp_path / "reading" / "s.json").write_text(json.dumps(session.to_json()))
    (tmp_path / "reading" / "t.json").write_text(json.dumps(session.to_json()))
    (tmp_path / "reading" / "t.json").rename(tmp_path / "reading" / "t.done")  # ended already
    rec = _recorder(tmp_path)
    rec.adopt()
    assert set(rec.tracker.sessions) == {"s.json"}
    rec.handle([("open", "/m/raw/a/f"), ("end", "s.json"), ("open", "/m/raw/a/g")])
    assert rec.tracker.figures.own == 1 and rec.tracker.opened == {("raw", "a"): 1000.0}


def test_falling_back_to_polling_saves_and_stops_tracking(tmp_path: Path) -> None:
    models = tmp_path / "models"
    loaded = make_model(models, "raw", "a", {"f": b"1"})
    svc = make_service(tmp_path, STORAGE_OPENS_SWEEP_MODELS="0", STORAGE_OPENS_SAVE_INTERVAL_SECONDS="3600")
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=60)
        load_models(loaded)
        wait_until(lambda: svc.snapshot().last_opened, timeout=30)
        assert svc._reader is not None
        svc._reader.failed = True  # what a failed read or watch sets; the updater falls back
        wait_until(lambda: svc.polling and svc.opens is None, timeout=30)
        snap = svc.snapshot()
        assert snap.opens_since is None and snap.last_opened == ()
        saved = json.loads((tmp_path / "state" / "opens.json").read_text())
        assert set(saved["opened"]) == {"raw/a"} and saved["saved_at"] <= time.time()
    finally:
        svc.stop()

"""The front page `/`: pure rendering (escaping, gaps, what is hidden) and the real exporter in headless Chromium."""

from __future__ import annotations

import html.parser
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from exporter.api.csp import csp_hash
from exporter.api.page import PAGE_CSP, PAGE_STYLE, human_bytes, render_page
from exporter.api.page_data import LastRun, ScrubView, page_data
from exporter.index.fsinfo import FsUsage
from exporter.index.tree import ModelStat
from shared.cleanup_state import CleanupState, write_cleanup_state
from shared.plan_summary import PlannedEviction, summarize, summary_path, write_plan_summary
from tests.chromium import run_chromium, screenshot
from tests.support import make_model, parse_metrics, running, start_exporter, wait_until
from tests.test_opens import LAST_OPENED, SINCE, load_models

HOSTILE = [
    "<script>alert(1)</script>",
    "\"><img src=x onerror=alert('a')>",
    'it\'s "quoted" & <b>bold</b>',
    "bad-\udcff\udcfe-bytes",
    "<svg onload=alert(2)>",
]
SCREENSHOT_COPY = Path(tempfile.gettempdir()) / "model-storage-page.png"


class Tags(html.parser.HTMLParser):
    """Every start tag with its attributes, and the text, of a document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(document: str) -> Tags:
    parser = Tags()
    parser.feed(document)
    parser.close()
    return parser


def sample(show_details: bool = True, names: list[str] | None = None, **kwargs: object) -> str:
    names = names if names is not None else HOSTILE
    models = [ModelStat("raw", name, 1000 * (i + 1), i + 1, 1.7e9 + i) for i, name in enumerate(names)]
    plan = summarize("p1", 1.7e9, [PlannedEviction("raw", name, 10, "age") for name in names])
    run = LastRun(1.7e9, False, 3, "<b>1 eviction(s) failed</b>", {"age": 5}, {"age": 1}, {"in_use": 1})
    data = page_data(
        tiers={"raw": (sum(m.bytes for m in models), len(models), len(models)), "quantized": (0, 0, 0)},
        models=models,
        capacity_bytes=100_000,
        filesystem=FsUsage(10**9, 4 * 10**8),
        ready=True,
        polling=False,
        last_full_scan=1.7e9,
        show_details=show_details,
        now=1.7e9 + 3600,
        last_run=run,
        trash_bytes=123,
        trash_limit_bytes=1000,
        plan=plan,
        links=(("/metrics", "/metrics"),),
        **kwargs,  # type: ignore[arg-type]
    )
    return render_page(data)


def test_hostile_model_names_are_text_never_markup() -> None:
    page = sample()
    tags = parse(page)
    assert not [t for t, a in tags.tags if t in ("script", "img", "iframe", "object", "embed")]
    assert not [(t, a) for t, a in tags.tags for key in a if key.startswith("on")], "an event handler attribute"
    assert not [(t, a) for t, a in tags.tags if "style" in a], "inline style attributes break the CSP"
    text = "".join(tags.text)
    for name in ("<script>alert(1)</script>", "\"><img src=x onerror=alert('a')>", "<svg onload=alert(2)>"):
        assert text.count(name) == 2, name  # once among the largest, once among the plan's evictions
    assert "bad-\\xff\\xfe-bytes" in text, "undecodable bytes are shown as on /metrics"
    assert "<b>1 eviction(s) failed</b>" in text, "the error text is escaped, not bold"


def test_every_link_is_a_local_path_and_no_svg_holds_an_outside_name() -> None:
    tags = parse(sample())
    hrefs = [a.get("href") for t, a in tags.tags if t == "a"]
    assert hrefs == ["/metrics"]
    for tag, attrs in tags.tags:
        for key, value in attrs.items():
            assert key not in ("src", "xlink:href") and not (value or "").startswith("javascript:"), (tag, key)


def test_without_read_access_no_model_name_or_error_text_is_on_the_page() -> None:
    page = sample(show_details=False, names=["secret-model-one", "secret-model-two"])
    assert "secret-model" not in page
    assert "eviction(s) failed" not in page
    assert "read or admin token" in page
    assert "2 models in all" in page, "counts stay: /metrics serves them openly"
    assert "data-policy='age'" in page and "would free" in page


def test_figures_the_exporter_does_not_measure_are_marked_gaps_not_numbers() -> None:
    page = sample()
    assert "id='allocated-gap'" in page and "id='last-opened-gap'" in page and "id='scrub-gap'" in page
    assert ">allocated bytes<" not in page and ">last opened<" not in page


def test_with_allocated_bytes_capacity_is_measured_in_them_and_apparent_bytes_stand_beside() -> None:
    # raw is sparse: 100,000 bytes long, 20,000 allocated; quantized dense.
    data = page_data(
        tiers={"raw": (100_000, 2, 1), "quantized": (30_000, 1, 1)},
        models=[],
        capacity_bytes=200_000,
        filesystem=None,
        ready=True,
        polling=False,
        last_full_scan=0,
        show_details=True,
        now=10.0,
        allocated={"raw": 20_000, "quantized": 32_768},
    )
    page = render_page(data)
    assert "id='allocated-gap'" not in page and ">allocated bytes<" in page
    assert "id='allocated-total' data-bytes='52768'" in page and "id='apparent-total' data-bytes='130000'" in page
    assert "(26.4%)" in page and "(65.0%)" in page  # allocated and apparent against the capacity
    assert "data-allocated-bytes='20000'" in page and "data-allocated-bytes='32768'" in page
    assert "aria-label='models&#x27; allocated bytes by tier against the capacity, 26.4%'" in page


def test_last_opened_fills_its_column_when_tracked_and_never_shows_a_zero() -> None:
    names = ["a", "b"]
    page = sample(names=names, last_opened={("raw", "b"): 1.7e9 + 3000}, opens_since=1.7e9 - 50)
    assert "id='last-opened-gap'" not in page and ">last opened<" in page and "id='last-opened-note'" in page
    rows = model_rows(page, "model")
    assert [r[1] for r in rows] == ["b", "a"]
    cells = Rows("model")
    cells.feed(page)
    opened = [row["cells"][6] for row in cells.rows]  # type: ignore[index]
    assert opened == [
        "2023-11-14 23:03:20Z (10 min ago)",
        "not since 2023-11-14 22:12:30Z",
    ]
    assert "1970" not in page


def test_the_scrub_section_says_what_the_scrub_found_or_that_it_is_off() -> None:
    off = sample()
    assert "id='scrub-gap'" in off and "STORAGE_SCRUB_STATS_PER_SECOND=0" in off
    clean = sample(scrub=ScrubView(0, 0, 510.0, 1.7e9 + 3000, 500.0))
    assert "id='scrub-gap'" not in clean
    assert "data-corrections='0'" in clean and "found no drift" in clean
    assert "took 8 min, ended 10 min ago" in clean
    drifted = sample(scrub=ScrubView(3, 4096, 0.0, 1.7e9, 500.0))
    assert "data-corrections='3'" in drifted and "4.00 KiB of drift" in drifted
    assert "first cycle under way" in drifted and "event path missed changes" in drifted


def test_the_csp_allows_exactly_the_one_style_and_nothing_else() -> None:
    assert f"style-src {csp_hash(PAGE_STYLE)};" in PAGE_CSP
    assert "default-src 'none'" in PAGE_CSP and "script-src" not in PAGE_CSP
    assert sample().count("<style>") == 1 and f"<style>{PAGE_STYLE}</style>" in sample()


def test_a_store_past_its_capacity_draws_a_full_bar_with_an_end_mark() -> None:
    models = [ModelStat("raw", "huge", 500, 1, 1.0)]
    data = page_data(
        tiers={"raw": (500, 1, 1)},
        models=models,
        capacity_bytes=100,
        filesystem=None,
        ready=True,
        polling=False,
        last_full_scan=0,
        show_details=True,
        now=10.0,
    )
    page = render_page(data)
    assert "stroke='#d62728'" in page and "500.0%" in page
    assert "No plan yet" in page and "has not run yet" in page


# ----- the real exporter, in headless Chromium ---------------------------------------------------


def build_store(store: Path) -> dict[str, int]:
    models = store / "models"
    sizes = {"raw/llama-7b": 300_000, "raw/mistral": 120_000, "quantized/llama-q4": 80_000, "repository/bert": 50_000}
    for key, size in sizes.items():
        tier, name = key.split("/")
        make_model(models, tier, name, {"weights.bin": b"\0" * size, "config.json": b"{}"})
    for i, name in enumerate(["\"><img src=x onerror=alert('a')>", "<svg onload=alert(2)>", "it's & <b>"]):
        make_model(models, "raw", name, {"w.bin": b"x" * (1000 + i)})
    # A sparse model: 2 MB long, a few KiB allocated.
    sparse = make_model(models, "repository", "sparse", {"config.json": b"{}"})
    with open(sparse / "weights.bin", "wb") as handle:
        handle.write(b"s" * 4096)
        handle.truncate(2_000_000)
    bad = os.fsencode(str(models / "quantized")) + b"/bad-\xff-name"
    os.mkdir(bad)
    with open(bad + b"/w.bin", "wb") as handle:
        handle.write(b"y" * 2048)
    settings_state = store / "state"
    write_cleanup_state(
        settings_state / "last-run.json",
        CleanupState(
            timestamp=time.time() - 7200,
            success=True,
            run_id="run-1",
            exit_code=0,
            evicted_bytes_total={"age": 40_000, "size": 12_000},
            evicted_models_total={"age": 2, "size": 1},
            skipped={"in_use": 1},
            trash_bytes=52_000,
        ),
    )
    write_plan_summary(
        summary_path(settings_state),
        summarize(
            "plan-1",
            time.time() - 600,
            [
                PlannedEviction("raw", "mistral", 120_002, "age"),
                PlannedEviction("raw", "<svg onload=alert(2)>", 1001, "size"),
            ],
        ),
    )
    return sizes


def dom_figures(dom: str) -> dict[str, object]:
    tags = parse(dom)
    tiers: dict[str, int] = {}
    allocated: dict[str, int] = {}
    current = None
    for tag, attrs in tags.tags:
        if tag == "tr":
            current = attrs.get("data-tier")
        elif tag == "td" and current is not None and attrs.get("data-bytes") is not None:
            tiers[str(current)] = int(str(attrs["data-bytes"]))
        elif tag == "td" and current is not None and attrs.get("data-allocated-bytes") is not None:
            allocated[str(current)] = int(str(attrs["data-allocated-bytes"]))
    by_id = {str(a["id"]): a for _, a in tags.tags if a.get("id")}
    return {
        "tiers": tiers,
        "allocated": allocated,
        "allocated_total": int(str(by_id["allocated-total"]["data-bytes"])),
        "capacity": int(str(by_id["capacity-bytes"]["data-bytes"])),
    }


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return int(width), int(height)


def test_the_page_in_headless_chromium_matches_storage_info_with_no_console_messages(
    store: Path, logs_dir: Path, tmp_path: Path
) -> None:
    build_store(store)
    env = {"STORAGE_MAX_SIZE_GB": "0.001", "STORAGE_OPENS_SWEEP_MODELS": "0"}
    with running(start_exporter(store / "models", store, logs_dir, **env)) as exporter:
        url = exporter.url + "/"
        load_models(store / "models" / "raw" / "mistral")  # a child process opens and maps it
        opened_key = (LAST_OPENED, frozenset({("tier", "raw"), ("model", "mistral")}))
        metrics = wait_until(
            lambda: (
                m
                if (m := parse_metrics(httpx.get(exporter.url + "/metrics", timeout=10).text)).get(opened_key)
                else None
            ),
            timeout=30,
            what="mistral's last opened on /metrics",
        )
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert response.headers["content-security-policy"] == PAGE_CSP

        dom_run = run_chromium(url, "--dump-dom")
        assert dom_run.console_lines == [], dom_run.console_lines
        shot = tmp_path / "page.png"
        shot_run = screenshot(url, shot)
        assert shot_run.console_lines == [], shot_run.console_lines
        shutil.copyfile(shot, SCREENSHOT_COPY)
        width, height = png_size(shot)
        assert (width, height) == (1280, 2600) and shot.stat().st_size > 20_000, "a blank or tiny screenshot"

        info = httpx.get(exporter.url + "/storage/info?top=25", timeout=10).json()
        figures = dom_figures(dom_run.stdout)
        assert figures["tiers"] == {tier: t["bytes"] for tier, t in info["tiers"].items()}
        assert figures["allocated"] == {tier: t["allocated_bytes"] for tier, t in info["tiers"].items()}
        assert figures["allocated_total"] == info["total"]["allocated_bytes"]
        # The sparse model: its length counts in apparent bytes, its holes nowhere on disk.
        assert info["total"]["allocated_bytes"] < info["total"]["bytes"] - 1_000_000
        assert figures["capacity"] == info["capacity_bytes"]
        tags = parse(dom_run.stdout)
        assert not [t for t, _ in tags.tags if t in ("script", "img")], "the hostile names became elements"
        text = " ".join("".join(tags.text).split())
        assert f"{info['total']['models']:,} models in all" in text
        shown = model_rows(dom_run.stdout, "model")
        # The page, /storage/info and /metrics spell undecodable bytes alike (`shared.names`).
        expected = [(m["tier"], m["model"], m["bytes"]) for m in info["largest_models"]]
        assert shown == expected
        assert len(shown) == len(info["largest_models"])
        evict = model_rows(dom_run.stdout, "evict")
        assert evict == [("raw", "mistral", 120_002), ("raw", "<svg onload=alert(2)>", 1001)]
        assert "bad-\\xff-name" in text and "<svg onload=alert(2)>" in text
        assert "would free" in text and "succeeded" in text
        # Last opened: the figure /metrics serves for the model opened, "not since" tracking began for the rest.
        rows = Rows("model")
        rows.feed(dom_run.stdout)
        opened = {row["cells"][1]: row["cells"][6] for row in rows.rows}  # type: ignore[index]
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(metrics[opened_key]))
        since = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(metrics[(SINCE, frozenset())]))
        assert opened["mistral"].startswith(stamp + " ("), opened
        assert {v for k, v in opened.items() if k != "mistral"} == {f"not since {since}"}, opened
        assert "id='last-opened-gap'" not in dom_run.stdout


class Rows(html.parser.HTMLParser):
    """The cells' text and data-bytes of each <tr class=CLASS>, in page order."""

    def __init__(self, row_class: str) -> None:
        super().__init__(convert_charrefs=True)
        self.row_class = row_class
        self.rows: list[dict[str, object]] = []
        self._in_row = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr":
            self._in_row = found.get("class") == self.row_class
            if self._in_row:
                self.rows.append({"cells": [], "bytes": None})
        elif tag == "td" and self._in_row:
            self._cell = []
            if found.get("data-bytes") is not None:
                self.rows[-1]["bytes"] = int(str(found["data-bytes"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            cells = self.rows[-1]["cells"]
            assert isinstance(cells, list)
            cells.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self._in_row = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def model_rows(dom: str, row_class: str) -> list[tuple[str, str, int]]:
    """(tier, model, bytes) of each row of class `row_class`."""
    parser = Rows(row_class)
    parser.feed(dom)
    out = []
    for row in parser.rows:
        cells = row["cells"]
        assert isinstance(cells, list) and isinstance(row["bytes"], int)
        out.append((cells[0], cells[1], row["bytes"]))
    return out


def test_the_console_check_sees_a_page_that_logs_an_error_or_breaks_its_csp(tmp_path: Path) -> None:
    """The check the page test relies on must be able to fail: these pages log, the clean one does not."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><body><script>console.error('boom-from-page')</script></body></html>")
    assert any("boom-from-page" in line for line in run_chromium(bad.as_uri(), "--dump-dom").console_lines)
    blocked = tmp_path / "blocked.html"
    blocked.write_text(
        "<!doctype html><html><head><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'\">"
        "</head><body><p style='color:red'>x</p></body></html>"
    )
    lines = run_chromium(blocked.as_uri(), "--dump-dom").console_lines
    assert any("Content Security Policy" in line for line in lines), lines
    clean = tmp_path / "clean.html"
    clean.write_text(sample())
    assert run_chromium(clean.as_uri(), "--dump-dom").console_lines == []


READ = "page-read-token-0123456789abcdef"
ADMIN = "page-admin-token-0123456789abcdef"


def test_with_a_read_token_configured_model_rows_need_a_token_and_figures_do_not(store: Path, logs_dir: Path) -> None:
    build_store(store)
    env = {"STORAGE_READ_TOKEN": f"viewer:{READ}", "STORAGE_ADMIN_TOKEN": f"ops:{ADMIN}"}
    with running(start_exporter(store / "models", store, logs_dir, **env)) as exporter:
        url = exporter.url + "/"
        anonymous = httpx.get(url, timeout=10)
        assert anonymous.status_code == 200
        assert "llama-7b" not in anonymous.text and "mistral" not in anonymous.text
        assert "read or admin token" in anonymous.text and "token sent was not accepted" not in anonymous.text
        assert "data-tier='raw'" in anonymous.text, "the tier figures /metrics serves openly are shown"
        wrong = httpx.get(url, headers={"Authorization": "Bearer not-a-token"}, timeout=10)
        assert wrong.status_code == 200 and "llama-7b" not in wrong.text
        assert "token sent was not accepted" in wrong.text and "not-a-token" not in wrong.text
        for token in (READ, ADMIN):
            allowed = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert allowed.status_code == 200 and "llama-7b" in allowed.text and "mistral" in allowed.text
            assert token not in allowed.text
        bad = httpx.get(url + "?top=3", timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    assert READ not in exporter.log() and ADMIN not in exporter.log()


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (15 * 1024 + 512, "15.5 KiB"),
        (1010 * 1024, "1010 KiB"),
        (1023 * 1024 + 1023, "1024 KiB"),
        (3 * 1024**3 // 2, "1.50 GiB"),
        (5 * 1024**7, "5120 EiB"),
    ],
)
def test_human_bytes_never_shows_an_exponent(n: int, shown: str) -> None:
    assert human_bytes(n) == shown

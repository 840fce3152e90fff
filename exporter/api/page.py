"""The exporter's front page: the store at a glance, as plain HTML with inline SVG. Pure: data in, HTML out.

Invariants:
- Every figure on the page is one `/metrics` serves (tiers, capacity, filesystem, the cleaner's and
  the last plan's figures) or one `/storage/info` serves. Per-model rows (the largest models, the
  models the last plan would evict) and the last run's error text are `show_details` material:
  the route sets it exactly when `/storage/info` would answer the caller (see exporter/api/page_route.py).
- Everything that comes from outside (model and tier names, policy and reason names, error text)
  goes through `_h`: HTML-escaped, quotes included, and names that are not UTF-8 shown as `\\xNN`
  as on `/metrics`. Nothing is ever placed in a URL, a script or a style.
- No script, no external asset, no inline `style` attribute: the only CSS is the one <style>
  element, allowed by hash in PAGE_CSP; SVG uses presentation attributes, which CSP does not govern.
- A figure the exporter does not measure yet (last opened; the scrub while it is off; allocated bytes
  when the caller gives none) is a marked gap on the page, never a made-up or zero figure.
- Capacity is what fills the disk: with allocated bytes, the capacity sentence, bar and "of capacity"
  column are of allocated bytes (as instance:model_storage_usage:ratio and /storage/info's
  usage_ratio), the apparent figures beside them.
- Rendering is O(rows shown), not O(models): the caller picks the largest models
  (`page_data` in exporter/api/page_data.py, with the page's row values).
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable

from exporter.api.csp import csp_hash
from exporter.api.page_data import PageData, TierRow
from shared.names import name_text
from shared.plan_summary import POLICIES

EVICTIONS_SHOWN = 25
TIER_COLORS = {"raw": "#4e79a7", "quantized": "#59a14f", "repository": "#f28e2b", "other": "#9c9c9c"}
POLICY_COLORS = {"age": "#76b7b2", "usage": "#edc948", "size": "#b07aa1"}
FALLBACK_COLOR = "#bab0ac"


# ----- formatting ------------------------------------------------------------------------------


def _h(value: object) -> str:
    """Escaped for HTML text and quoted attributes; undecodable bytes as `\\xNN`, as /metrics shows them."""
    return html.escape(name_text(str(value)), quote=True)


def human_bytes(n: float) -> str:
    """1024-based, at least three significant figures, never an exponent: 1.50 GiB, 1010 KiB, 512 B."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            if unit == "B":
                return f"{int(value)} B"
            digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
            return f"{value:.{digits}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds // 86400)} d"


def _stamp(timestamp: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))
    return f"<time datetime='{stamp}'>{stamp}</time>"


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "<span class='muted'>never</span>"
    return f"{_stamp(timestamp)} <span class='muted'>({human_age(now - timestamp)} ago)</span>"


def _opened(timestamp: float | None, data: PageData) -> str:
    if timestamp is None and data.opens_since is not None:
        return f"<span class='muted'>not since {_stamp(data.opens_since)}</span>"
    return _when(timestamp, data.generated_at)


def _bytes_cell(n: int) -> str:
    return f"<td class='num' data-bytes='{n}' title='{n:,} bytes'>{human_bytes(n)}</td>"


def _allocated_cell(n: int) -> str:
    return f"<td class='num' data-allocated-bytes='{n}' title='{n:,} bytes allocated'>{human_bytes(n)}</td>"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "n/a"


# ----- SVG -------------------------------------------------------------------------------------

BAR_WIDTH = 600
BAR_HEIGHT = 22


def bar_svg(segments: Iterable[tuple[str, int, str]], whole: int, label: str) -> str:
    """A horizontal bar: each (name, value, color) a segment, against `whole` (the bar's full width).

    Past `whole` the bar is drawn full with a red end mark. The figures are also in the text around
    it: the picture only repeats them.
    """
    parts = [(name, max(0, value), color) for name, value, color in segments]
    used = sum(v for _, v, _ in parts)
    scale_to = max(whole, used, 1)
    x = 0.0
    rects = []
    for name, value, color in parts:
        width = BAR_WIDTH * value / scale_to
        if width <= 0:
            continue
        rects.append(
            f"<rect x='{x:.2f}' y='0' width='{width:.2f}' height='{BAR_HEIGHT}' fill='{color}'>"
            f"<title>{_h(name)}: {human_bytes(value)}</title></rect>"
        )
        x += width
    marks = ""
    if whole > 0 and used > whole:
        edge = BAR_WIDTH * whole / scale_to
        marks = f"<line x1='{edge:.2f}' y1='0' x2='{edge:.2f}' y2='{BAR_HEIGHT}' stroke='#d62728' stroke-width='3'/>"
    return (
        f"<svg class='bar' role='img' aria-label='{_h(label)}' width='{BAR_WIDTH}' height='{BAR_HEIGHT}' "
        f"viewBox='0 0 {BAR_WIDTH} {BAR_HEIGHT}' xmlns='http://www.w3.org/2000/svg'>"
        f"<rect x='0' y='0' width='{BAR_WIDTH}' height='{BAR_HEIGHT}' fill='#eeeeee'/>"
        + "".join(rects)
        + marks
        + "</svg>"
    )


def _swatch(color: str) -> str:
    return (
        "<svg width='10' height='10' viewBox='0 0 10 10' xmlns='http://www.w3.org/2000/svg' aria-hidden='true'>"
        f"<rect width='10' height='10' fill='{color}'/></svg>"
    )


# ----- sections --------------------------------------------------------------------------------


def _status(data: PageData) -> str:
    state = "ready" if data.ready else "not ready (initial scan, or the index cannot be kept current)"
    mode = "polling" if data.polling else "inotify"
    return (
        f"<p class='status'>Index <b id='ready'>{state}</b>, watching by {mode}; last full scan "
        f"{_when(data.last_full_scan, data.generated_at)}. Page made {_stamp(data.generated_at)}.</p>"
    )


def _capacity(data: PageData) -> str:
    total = data.total_bytes
    tracked = data.allocated_tracked
    allocated = data.total_allocated_bytes
    # What the capacity is measured in: allocated bytes when known (what fills the disk).
    used = allocated if tracked else total

    def on_disk(t: TierRow) -> int:
        if tracked:
            return t.allocated_bytes or 0
        return t.bytes

    segments = [(t.tier, on_disk(t), TIER_COLORS.get(t.tier, FALLBACK_COLOR)) for t in data.tiers]
    rows = []
    for t in data.tiers:
        rows.append(
            f"<tr data-tier='{_h(t.tier)}'><th scope='row'>{_swatch(TIER_COLORS.get(t.tier, FALLBACK_COLOR))} "
            f"{_h(t.tier)}</th>{_bytes_cell(t.bytes)}"
            + (_allocated_cell(on_disk(t)) if tracked else "")
            + f"<td class='num'>{t.files:,}</td><td class='num'>{t.models:,}</td>"
            f"<td class='num'>{_pct(on_disk(t), data.capacity_bytes)}</td></tr>"
        )
    allocated_head = "<th>allocated bytes</th>" if tracked else ""
    allocated_total = _allocated_cell(allocated) if tracked else ""
    table = (
        "<table><thead><tr><th>tier</th><th>apparent bytes</th>"
        f"{allocated_head}<th>files</th><th>models</th><th>of capacity</th></tr></thead><tbody>"
        + "".join(rows)
        + f"<tr id='total' class='total'><th scope='row'>total</th>{_bytes_cell(total)}{allocated_total}"
        f"<td class='num'>{sum(t.files for t in data.tiers):,}</td>"
        f"<td class='num'>{sum(t.models for t in data.tiers):,}</td>"
        f"<td class='num'>{_pct(used, data.capacity_bytes)}</td></tr></tbody></table>"
    )
    capacity = (
        f"<b id='capacity-bytes' data-bytes='{data.capacity_bytes}'>{human_bytes(data.capacity_bytes)}</b> capacity"
    )
    if tracked:
        headline = (
            f"<p>Models take <b id='allocated-total' data-bytes='{allocated}'>{human_bytes(allocated)}</b> on disk "
            f"(allocated bytes) of the {capacity} ({_pct(allocated, data.capacity_bytes)}); their apparent size is "
            f"<b id='apparent-total' data-bytes='{total}'>{human_bytes(total)}</b> "
            f"({_pct(total, data.capacity_bytes)}). Sparse files count by what they allocated, compressed "
            "files by their compressed size.</p>"
        )
    else:
        headline = (
            f"<p>Models hold <b data-bytes='{total}'>{human_bytes(total)}</b> of the {capacity} "
            f"({_pct(total, data.capacity_bytes)}), apparent bytes.</p>"
        )
    kind = "allocated" if tracked else "apparent"
    out = [
        "<section id='capacity'><h2>Capacity</h2>",
        headline,
        bar_svg(
            segments,
            data.capacity_bytes,
            f"models' {kind} bytes by tier against the capacity, {_pct(used, data.capacity_bytes)}",
        ),
        table,
    ]
    if not tracked:
        out.append(
            "<p class='gap' id='allocated-gap'>Allocated bytes (what the files take on disk, sparse and "
            "compressed files included) are not measured by this exporter yet: the figures above are "
            "apparent sizes.</p>"
        )
    fs = data.filesystem
    if fs is not None:
        fs_used = fs.size_bytes - fs.avail_bytes
        out.append(
            f"<h3>Filesystem</h3><p id='filesystem' data-size='{fs.size_bytes}' data-avail='{fs.avail_bytes}'>"
            f"{human_bytes(fs_used)} used of {human_bytes(fs.size_bytes)} ({_pct(fs_used, fs.size_bytes)}), "
            f"{human_bytes(fs.avail_bytes)} available, whoever else writes to it.</p>"
            + bar_svg([("used", fs_used, "#7f7f7f")], fs.size_bytes, "filesystem used")
        )
    out.append("</section>")
    return "".join(out)


def _hidden_note(data: PageData, what: str) -> str:
    why = "the token sent was not accepted; " if data.token_rejected else ""
    return (
        f"<p class='gap'>{what} are shown only to callers with a read or admin token, as on "
        f"<code>/storage/info</code> ({why}send <code>Authorization: Bearer TOKEN</code>).</p>"
    )


def _largest(data: PageData) -> str:
    out = [f"<section id='largest'><h2>Largest models</h2><p>{data.models_total:,} models in all.</p>"]
    if not data.show_details:
        out.append(_hidden_note(data, "Model names and sizes"))
        out.append("</section>")
        return "".join(out)
    if not data.largest:
        out.append("<p class='muted'>No models.</p></section>")
        return "".join(out)
    biggest = max(1, data.largest[0].bytes)
    opened_head = "<th>last opened</th>" if data.last_opened_tracked else ""
    rows = []
    for r in data.largest:
        width = 160 * r.bytes / biggest
        color = TIER_COLORS.get(r.tier, FALLBACK_COLOR)
        spark = (
            "<svg width='160' height='10' viewBox='0 0 160 10' xmlns='http://www.w3.org/2000/svg' aria-hidden='true'>"
            f"<rect width='{width:.1f}' height='10' fill='{color}'/></svg>"
        )
        opened = f"<td class='when'>{_opened(r.last_opened, data)}</td>" if data.last_opened_tracked else ""
        rows.append(
            f"<tr class='model'><td>{_h(r.tier)}</td><td class='name'>{_h(r.model)}</td>{_bytes_cell(r.bytes)}"
            f"<td>{spark}</td><td class='num'>{r.files:,}</td>"
            f"<td class='when'>{_when(r.last_changed, data.generated_at)}</td>{opened}</tr>"
        )
    out.append(
        "<table><thead><tr><th>tier</th><th>model</th><th>size</th><th></th><th>files</th>"
        f"<th>last changed</th>{opened_head}</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    if not data.last_opened_tracked:
        out.append(
            "<p class='gap' id='last-opened-gap'>Last opened: not tracked by this exporter (off, or polling).</p>"
        )
    elif data.opens_since is not None:
        out.append(
            f"<p class='muted' id='last-opened-note'>Last opened: by anyone but model-storage; tracked since "
            f"{_stamp(data.opens_since)}.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _plan(data: PageData) -> str:
    plan = data.plan
    out = ["<section id='plan'><h2>Last cleanup plan</h2>"]
    if plan is None:
        out.append("<p class='muted'>No plan yet: run <code>model-storage-cleaner plan</code>.</p></section>")
        return "".join(out)
    frees = sum(plan.bytes.values())
    applied = " (after the run that applied it: what it did not evict)" if plan.applied_run_id else ""
    out.append(
        f"<p>Made {_when(plan.timestamp, data.generated_at)}{applied}; it would free "
        f"<b id='plan-bytes' data-bytes='{frees}'>{human_bytes(frees)}</b> "
        f"({_pct(frees, data.total_bytes)} of the models) from {plan.evictions_total:,} models.</p>"
    )
    policies = sorted({*POLICIES, *plan.bytes})
    segments = [(p, plan.bytes.get(p, 0), POLICY_COLORS.get(p, FALLBACK_COLOR)) for p in policies]
    out.append(bar_svg(segments, data.total_bytes, "what the plan would free, by policy, against the models' bytes"))
    rows = "".join(
        f"<tr data-policy='{_h(p)}'><th scope='row'>{_swatch(POLICY_COLORS.get(p, FALLBACK_COLOR))} {_h(p)}</th>"
        f"{_bytes_cell(plan.bytes.get(p, 0))}<td class='num'>{plan.models.get(p, 0):,}</td></tr>"
        for p in policies
    )
    out.append(
        f"<table><thead><tr><th>policy</th><th>would free</th><th>models</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    if not data.show_details:
        out.append(_hidden_note(data, "The models it would evict"))
    elif plan.evictions:
        shown = plan.evictions[:EVICTIONS_SHOWN]
        rows = "".join(
            f"<tr class='evict'><td>{_h(e.tier)}</td><td class='name'>{_h(e.model)}</td>{_bytes_cell(e.bytes)}"
            f"<td>{_h(e.policy)}</td></tr>"
            for e in shown
        )
        more = plan.evictions_total - len(shown)
        out.append(
            "<h3>Would evict</h3><table><thead><tr><th>tier</th><th>model</th><th>size</th><th>policy</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>"
            + (
                f"<p class='muted'>and {more:,} more (<code>model-storage-cleaner plan</code> lists them all).</p>"
                if more > 0
                else ""
            )
        )
    out.append("</section>")
    return "".join(out)


def _cleanup(data: PageData) -> str:
    out = ["<section id='cleanup'><h2>Last cleanup and trash</h2>"]
    run = data.last_run
    if run is None:
        out.append("<p class='muted'>The cleaner has not run yet (no state file).</p>")
    else:
        result = (
            "<b class='ok'>succeeded</b>" if run.success else f"<b class='bad'>failed</b> (exit code {run.exit_code})"
        )
        error = f": {_h(run.error)}" if run.error and data.show_details else ""
        out.append(f"<p id='last-run'>Last run {_when(run.timestamp, data.generated_at)}: {result}{error}.</p>")
        policies = sorted({*POLICIES, *run.evicted_bytes_total})
        rows = "".join(
            f"<tr><th scope='row'>{_h(p)}</th>{_bytes_cell(run.evicted_bytes_total.get(p, 0))}"
            f"<td class='num'>{run.evicted_models_total.get(p, 0):,}</td></tr>"
            for p in policies
        )
        out.append(
            "<table><thead><tr><th>policy</th><th>evicted, all runs</th><th>models</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
        if run.skipped:
            skipped = ", ".join(f"{_h(reason)} {count:,}" for reason, count in sorted(run.skipped.items()))
            out.append(f"<p>Skipped in the last run: {skipped}.</p>")
    out.append("<h3>Trash</h3>")
    if data.trash_bytes is None:
        out.append(f"<p class='muted'>Unknown until the cleaner runs; limit {human_bytes(data.trash_limit_bytes)}.</p>")
    else:
        out.append(
            f"<p id='trash' data-bytes='{data.trash_bytes}'>{human_bytes(data.trash_bytes)} in the trash, limit "
            f"{human_bytes(data.trash_limit_bytes)} ({_pct(data.trash_bytes, data.trash_limit_bytes)}).</p>"
            + bar_svg([("trash", data.trash_bytes, "#8c564b")], data.trash_limit_bytes, "trash against its limit")
        )
    out.append("</section>")
    return "".join(out)


def _scrub(data: PageData) -> str:
    scrub = data.scrub
    if scrub is None:
        return (
            "<section id='scrub'><h2>Scrub</h2><p class='gap' id='scrub-gap'>The scrub is off "
            "(<code>STORAGE_SCRUB_STATS_PER_SECOND=0</code>): only events and the hourly reconcile keep "
            "the figures exact.</p></section>"
        )
    if scrub.last_cycle_seconds > 0:
        cycle = (
            f"last full cycle took {human_age(scrub.last_cycle_seconds)}, ended "
            f"{human_age(data.generated_at - scrub.last_cycle_timestamp)} ago"
        )
    else:
        cycle = "first cycle under way"
    state = "found drift: the event path missed changes" if scrub.corrections_total else "found no drift"
    return (
        f"<section id='scrub'><h2>Scrub</h2><p id='scrub-state' data-corrections='{scrub.corrections_total}'>"
        f"Every directory is checked against the disk about every {human_age(scrub.expected_cycle_seconds)} "
        f"({cycle}). Since the exporter started it {state}: {scrub.corrections_total} correction(s), "
        f"{human_bytes(scrub.drift_bytes_total)} of drift.</p></section>"
    )


def _links(data: PageData) -> str:
    items = "".join(f"<li><a href='{_h(path)}'>{_h(label)}</a></li>" for path, label in data.links)
    return f"<nav><ul>{items}</ul></nav>"


PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:62em;margin:1em auto;padding:0 1em;color:#222}"
    "h1{margin-bottom:.2em}h2{border-top:1px solid #ccc;padding-top:.6em}"
    "table{border-collapse:collapse;margin:.6em 0}th,td{padding:.15em .6em;text-align:left;vertical-align:middle}"
    "thead th{border-bottom:1px solid #999}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "td.num,td.when{white-space:nowrap}"
    "tr.total{border-top:1px solid #999;font-weight:bold}td.name{word-break:break-all;max-width:28em}"
    ".muted{color:#666}.gap{color:#666;font-style:italic}.ok{color:#2a7d2a}.bad{color:#c62828}"
    "svg.bar{display:block;max-width:100%;height:auto;margin:.4em 0}"
    "nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:1em}"
)


PAGE_CSP = (
    f"default-src 'none'; style-src {csp_hash(PAGE_STYLE)}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def render_page(data: PageData) -> str:
    """The whole page. Pure."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>model-storage</title><style>{PAGE_STYLE}</style></head><body>"
        "<h1>model-storage</h1>"
        + _status(data)
        + _links(data)
        + _capacity(data)
        + _largest(data)
        + _plan(data)
        + _cleanup(data)
        + _scrub(data)
        + "</body></html>"
    )

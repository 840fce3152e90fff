"""The README and docs/ stay true to the code: every setting, metric, alert, command and make target
is documented where a reader looks for it, the README stays short, and every link resolves."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from shared import metric_names
from shared.settings_table import FIELDS
from tools import settings_doc

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS_DIR = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS_DIR.glob("*.md"))]
ALL_TEXT = "\n".join(path.read_text() for path in MARKDOWN)
README_MAX_LINES = 250


def doc(name: str) -> str:
    return (DOCS_DIR / name).read_text()


def section(text: str, heading: str) -> str:
    """From `heading` (a whole line) to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    body = text.split(f"\n{heading}\n", 1)[1]
    match = re.search(rf"^#{{1,{len(level)}}} ", body, re.MULTILINE)
    return body[: match.start()] if match else body


def test_the_readme_is_short() -> None:
    assert len(README.splitlines()) <= README_MAX_LINES


def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = doc("configuration.md").split(settings_doc.BEGIN, 1)[1].split(settings_doc.END, 1)[0]
    for field in FIELDS:
        assert f"`{field.key}`" in reference, field.key
        assert f"`{field.env}`" in reference, field.env


def test_the_configuration_reference_is_what_make_docs_generates() -> None:
    text = doc("configuration.md")
    assert text.count(settings_doc.BEGIN) == 1 and text.count(settings_doc.END) >= 1
    assert settings_doc.rewritten(text) == text, "docs/configuration.md is stale: run `make docs`"


def test_the_generator_only_adds_words_to_settings_that_exist() -> None:
    keys = {field.key for field in FIELDS}
    for extra in (settings_doc.NOTES, settings_doc.DERIVED, settings_doc.SHOWN_DEFAULT):
        assert set(extra) <= keys, sorted(set(extra) - keys)
    # A derived default is None in the table: the loader fills it from the base path.
    assert all(field.default is None for field in FIELDS if field.key in settings_doc.DERIVED)


def test_the_generated_table_has_one_row_per_setting_in_table_order() -> None:
    rows = [line for line in settings_doc.render().splitlines() if line.startswith("| `")]
    assert [row.split("`", 2)[1] for row in rows] == [field.key for field in FIELDS]
    assert all(len(re.split(r"(?<!\\)\|", row)) == 8 for row in rows), "a cell broke the table"


def test_every_exported_metric_is_in_the_metrics_reference() -> None:
    reference = section(doc("metrics.md"), "## Metrics reference")
    counters = {
        metric_names.EVENTS,
        metric_names.EVENT_OVERFLOWS,
        metric_names.ERRORS,
        metric_names.CLEANUP_EVICTED_BYTES,
        metric_names.CLEANUP_EVICTED_MODELS,
        metric_names.SCRUB_CORRECTIONS,
        metric_names.SCRUB_DRIFT_BYTES,
        metric_names.SCAN_FAILURES,
    }
    for name, value in vars(metric_names).items():
        if not name.isupper() or not value.startswith("model_storage_") or value == metric_names.PREFIX:
            continue
        exposed = value + "_total" if value in counters else value
        exposed = exposed + "_info" if value == metric_names.BUILD_INFO else exposed
        assert f"`{exposed}`" in reference, exposed


def alert_names() -> set[str]:
    return {
        rule["alert"]
        for path in (ROOT / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text()).get("groups", [])
        for rule in group["rules"]
        if "alert" in rule
    }


def test_every_alert_has_a_runbook_section() -> None:
    headings = set(re.findall(r"^## (\S+)$", doc("runbook.md"), re.MULTILINE))
    alerts = alert_names()
    assert alerts, "no alerts found"
    assert alerts <= headings, sorted(alerts - headings)


def test_quick_start_is_the_two_make_commands_and_ci_runs_make_test() -> None:
    quick = section(README, "## Quick start")
    block = re.search(r"```sh\n(.*?)```", quick, re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_documented_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"`make (\w+)`", ALL_TEXT))
    assert {"run", "test", "check", "docs", "kubernetes", "bench"} <= targets
    for target in targets:
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target


def test_every_cleaner_command_in_the_docs_exists() -> None:
    from cleaner.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    # `model-storage-cleaner [--global VALUE ...] COMMAND`, but not an image name after --entrypoint.
    used = re.findall(r"(?<!--entrypoint )model-storage-cleaner (?:--\S+ \S+ )*([a-z]+)\b", ALL_TEXT)
    assert {"plan", "run", "restore", "purge", "trash", "policies", "audit"} <= set(used)
    for command in set(used):
        assert command in (subcommands or ()), command


def github_anchors(markdown: str) -> list[str]:
    """The anchors GitHub gives the headings, in order: lower case, punctuation dropped, spaces to
    hyphens, and a -1, -2, ... suffix on repeats (so a second "Performance" is #performance-1)."""
    seen: dict[str, int] = {}
    anchors = []
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"^#{1,6} (.+)$", line)
        if in_code or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.append(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_github_anchor_rule_numbers_repeated_headings() -> None:
    assert github_anchors("# A b\n## `x` (y)\n### A b\n```\n# not a heading\n```\n") == ["a-b", "x-y", "a-b-1"]


def relative_links(markdown: str) -> set[str]:
    """Link targets outside code that are not URLs: `file.md`, `file.md#anchor`, `#anchor`."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return {t for t in re.findall(r"\]\(([^)\s]+)\)", prose) if not re.match(r"[a-z]+:", t)}


def assert_resolves(source: Path, target: str) -> None:
    path_text, _, anchor = target.partition("#")
    path = (source.parent / path_text).resolve() if path_text else source
    assert path.exists(), f"{source.name}: {target}: no such file"
    if anchor:
        anchors = github_anchors(path.read_text())
        assert anchor in anchors, f"{source.name}: {target}: no such heading"
        # A repeated heading makes the plain anchor point at the first of them, maybe not the intended one.
        assert f"{anchor}-1" not in anchors, f"{source.name}: {target}: the heading is repeated"


def test_relative_links_are_found_and_checked() -> None:
    assert relative_links("[a](x.md#b) [c](https://e/f) `[g](h)`\n```\n[i](j.md)\n```\n[k](#l)") == {"x.md#b", "#l"}
    assert_resolves(ROOT / "README.md", "docs/runbook.md#runbook")


def test_every_link_in_the_readme_and_docs_resolves_to_a_file_and_heading() -> None:
    checked = 0
    for source in MARKDOWN:
        for target in relative_links(source.read_text()):
            assert_resolves(source, target)
            checked += 1
    assert checked >= 40, checked


def test_the_readme_links_every_doc() -> None:
    linked = {t.partition("#")[0] for t in relative_links(README)}
    assert {f"docs/{path.name}" for path in DOCS_DIR.glob("*.md")} <= linked


def test_every_runbook_url_names_its_alert_section_once() -> None:
    urls = set()
    for path in (ROOT / "rules").glob("*.yml"):
        urls |= set(re.findall(r"runbook_url: (\S+)", path.read_text()))
    assert len(urls) == len(alert_names())
    for url in urls:
        assert url.startswith("docs/runbook.md#"), url
        assert_resolves(ROOT / "README.md", url)


def where_things_are() -> list[tuple[str, str]]:
    """(package, what it holds) rows of the map at the top of docs/development.md."""
    text = section(doc("development.md"), "## Where things are")
    return re.findall(r"^\| `([\w/.]+)` \| (.+) \|$", text, re.MULTILINE)


def mapped_modules() -> tuple[set[str], set[str]]:
    """Modules the map names, and those it calls pure (`name.py` *(pure)*), as dotted names."""
    named, pure = set(), set()
    for package, holds in where_things_are():
        if package.endswith(".py"):
            named.add(package.removesuffix(".py").replace("/", "."))
        prefix = package.strip("/").replace("/", ".")
        named |= {f"{prefix}.{stem}" for stem in re.findall(r"`(\w+)\.py`", holds)}
        pure |= {f"{prefix}.{stem}" for stem in re.findall(r"`(\w+)\.py` \*\(pure\)\*", holds)}
    return named, pure


def pure_contract_modules() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in pyproject["tool"]["importlinter"]["contracts"] if c["name"].startswith("Pure modules")]
    return set(contract["source_modules"])


def test_the_map_has_one_line_per_package() -> None:
    packages = [package for package, _ in where_things_are()]
    expected = ["exporter/cli.py", "exporter/index/", "exporter/metrics/", "exporter/api/", "cleaner/"]
    expected += ["cleaner/commands/", "shared/", "tools/", "rules/", "grafana/", "deploy/", "bench/", "tests/"]
    assert packages == expected


def test_the_map_and_the_pure_contract_name_the_same_pure_modules() -> None:
    named, pure = mapped_modules()
    listed = pure_contract_modules()
    assert listed, "no pure modules in pyproject.toml"
    assert listed <= named, f"pure in pyproject.toml, missing from docs/development.md: {sorted(listed - named)}"
    assert pure <= listed, f"called pure in docs/development.md, not in pyproject.toml: {sorted(pure - listed)}"


def test_no_doc_repeats_a_heading() -> None:
    """A repeated heading gets an anchor no reader would guess (#alerting-1): each doc names each section once."""
    for source in MARKDOWN:
        anchors = github_anchors(source.read_text())
        repeated = [anchor for anchor in anchors if f"{anchor}-1" in anchors]
        assert not repeated, (source.name, repeated)

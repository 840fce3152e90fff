"""The README stays true to the code: every setting, metric, alert, command and make target is documented."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from shared import metric_names
from shared.settings_table import FIELDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    for field in FIELDS:
        assert f"`{field.key}`" in reference, field.key
        assert f"`{field.env}`" in reference, field.env


def test_every_exported_metric_is_in_the_metrics_reference() -> None:
    reference = README.split("## Metrics reference", 1)[1].split("\n## ", 1)[0]
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


def test_every_alert_has_a_runbook_section() -> None:
    runbook = README.split("## Runbook", 1)[1].split("\n## ", 1)[0]
    headings = set(re.findall(r"^### (\S+)$", runbook, re.MULTILINE))
    alerts = {
        rule["alert"]
        for path in (ROOT / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text()).get("groups", [])
        for rule in group["rules"]
        if "alert" in rule
    }
    assert alerts, "no alerts found"
    assert alerts <= headings, sorted(alerts - headings)


def test_quick_start_is_the_two_make_commands_and_ci_runs_make_test() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quick, re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_documented_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make (\w+)`", README)):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target


def test_every_cleaner_command_in_the_readme_exists() -> None:
    from cleaner.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    # `model-storage-cleaner [--global VALUE ...] COMMAND`, but not an image name after --entrypoint.
    used = re.findall(r"(?<!--entrypoint )model-storage-cleaner (?:--\S+ \S+ )*([a-z]+)\b", README)
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


def test_every_internal_link_and_runbook_url_names_a_heading_once() -> None:
    anchors = github_anchors(README)
    links = set(re.findall(r"\]\(#([^)]+)\)", README))
    for path in (ROOT / "rules").glob("*.yml"):
        links |= set(re.findall(r"README\.md#([\w-]+)", path.read_text()))
    assert links
    for link in links:
        assert link in anchors, link
        # A repeated heading makes the plain anchor point at the first of them, maybe not the intended one.
        assert f"{link}-1" not in anchors, link

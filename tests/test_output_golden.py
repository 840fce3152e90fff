"""The exporter serves the same bytes as the code before the API split (issue 17: "no behaviour change").

The golden files under tests/data/golden/ were written by `python -m tests.golden_capture --venv
<checkout of 8830761>/.venv --out tests/data/golden`; this test runs the same capture against this
checkout's `model-storage-exporter` and compares byte for byte after the normalisations listed in
tests/golden_capture.py. A change to any served byte (a HELP text, a schema, the docs page, a JSON
key) fails here: regenerate the golden files only for an intended change, and say so in the commit.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from tests.golden_capture import MODELS, OUTPUTS, capture
from tests.support import ROOT, VENV_BIN

GOLDEN = ROOT / "tests" / "data" / "golden"


@pytest.fixture(scope="module")
def served() -> dict[str, str]:
    return capture(VENV_BIN.parent)


@pytest.mark.parametrize("name", OUTPUTS)
def test_exporter_output_matches_golden(served: dict[str, str], name: str) -> None:
    expected = (GOLDEN / name).read_text(encoding="utf-8")
    actual = served[name]
    if actual != expected:
        # openapi.json, docs.html and storage_info.json are one line each: show where they part first.
        at = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), None)
        at = min(len(expected), len(actual)) if at is None else at
        where = f"first difference at character {at}:\n  golden: {expected[max(0, at - 120) : at + 120]!r}\n"
        where += f"  served: {actual[max(0, at - 120) : at + 120]!r}\n"
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                f"golden/{name}",
                f"served {name}",
            )
        )
        pytest.fail(f"{name} differs from the golden file; {where}{diff[:3000]}")


def test_golden_files_hold_every_output_and_odd_names() -> None:
    # The tree's odd names reach /metrics and /storage/info: a capture that lost them would compare nothing.
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(OUTPUTS)
    metrics = (GOLDEN / "metrics.txt").read_text(encoding="utf-8")
    info = (GOLDEN / "storage_info.json").read_text(encoding="utf-8")
    for text in (metrics, info):
        assert 'model="bad\\\\xffname\\\\xfe"' in text or '"model":"bad\\\\xffname\\\\xfe"' in text
        assert 'quote\\"back\\\\slash' in text
    assert 'model_storage_model_bytes{tier="raw",model="empty-model"} 0' in metrics
    assert Path(GOLDEN / "openapi.json").read_text(encoding="utf-8").startswith('{"openapi":"3.1.0"')


def test_normalisations_are_narrow() -> None:
    # Each rule replaced exactly the lines or fields it names, and nothing else: 13 models, one value each.
    metrics = (GOLDEN / "metrics.txt").read_text(encoding="utf-8")
    assert metrics.count(" <ctime>\n") == len(MODELS) + 1  # + raw/loose-file.bin, a file loose in a tier
    assert metrics.count(" <fs-bytes>\n") == 2
    assert metrics.count(" <clock>\n") == 2
    assert metrics.count(" <sysctl>\n") == 1
    assert "process_" not in metrics
    info = (GOLDEN / "storage_info.json").read_text(encoding="utf-8")
    assert info.count('"last_changed":"<clock>"') == len(MODELS) + 1
    assert info.count('"<clock>"') == len(MODELS) + 1 + 3
    assert info.count('"<fs>"') == 1
    for name in ("openapi.json", "docs.html"):
        text = (GOLDEN / name).read_text(encoding="utf-8")
        assert not any(mark in text for mark in ("<clock>", "<ctime>", "<fs", "<sysctl>", "<tmp>")), name

"""The /metrics renderer: cached per-model lines agree with prometheus_client and pass promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.index.service import ExporterService
from exporter.index.tree import FileInfo, Tree
from exporter.metrics.endpoint import INLINE_MODELS, MetricsRenderer, build_registry
from exporter.metrics.model_lines import ModelLinesCache, escape_label_value, format_value
from shared.config import load_settings
from shared.layout import Layout
from tests.support import have, parse_metrics

ODD = ['we"ird\nname', "back\\slash", "bad-\udcff-utf8", "bad-\udcfe-utf8", "back\\slash-\udcff", "ünïcode", "plain"]


def _samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {k: v for k, v in parse_metrics(body.decode()).items() if "filesystem" not in k[0]}


@pytest.fixture
def service(store: Path) -> ExporterService:
    settings = load_settings(env={"STORAGE_BASE_PATH": str(store), "STORAGE_SCAN_WORKERS": "1"})
    svc = ExporterService(settings)  # not started: the tests fill the index by hand
    for i, name in enumerate(ODD):
        svc.tree.set_file(("raw", name, "w"), FileInfo(10 + i, 1.7e9 + 0.5, None, 8 * i))
    svc.tree.set_file(("quantized", "q.gguf"), FileInfo(20, 1.6e9))
    svc.tree.set_file(("README",), FileInfo(3, 1.0))
    return svc


def test_cached_renderer_says_what_prometheus_client_says(service: ExporterService) -> None:
    render = MetricsRenderer(service, service.settings).render
    plain = generate_latest(build_registry(service, service.settings))
    assert _samples(render()) == _samples(plain)


def test_each_family_has_help_and_type_once(service: ExporterService) -> None:
    body = MetricsRenderer(service, service.settings).render().decode()
    types = [line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert "model_storage_model_bytes" in types
    names = [f.name for f in text_string_to_metric_families(body)]
    assert len(names) == len(set(names))


@pytest.mark.skipif(not have("promtool"), reason="promtool not installed")
def test_promtool_accepts_the_cached_output(service: ExporterService) -> None:
    body = MetricsRenderer(service, service.settings).render()
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == b"" and check.stderr.strip() == b"", check.stdout + check.stderr
    samples = _samples(body)
    assert samples[("model_storage_allocated_bytes", frozenset({("tier", "raw")}))] == 512 * 8 * sum(range(len(ODD)))
    key = ("model_storage_model_allocated_bytes", frozenset({("tier", "raw"), ("model", "plain")}))
    assert samples[key] == 512 * 8 * ODD.index("plain")


def test_names_that_differ_only_in_invalid_utf8_are_distinct_series(service: ExporterService) -> None:
    """os.fsdecode keeps each undecodable byte as a surrogate; replacing them all with U+FFFD made
    `bad-\xff-utf8` and `bad-\xfe-utf8` one label: duplicate series in one scrape."""
    for body in (
        MetricsRenderer(service, service.settings).render(),
        generate_latest(build_registry(service, service.settings)),
    ):
        labels = [
            dict(labels)["model"]
            for (name, labels) in _samples(body)
            if name == "model_storage_model_bytes" and dict(labels)["tier"] == "raw"
        ]
        assert sorted(labels) == sorted(
            [
                'we"ird\nname',
                "back\\slash",
                "bad-\\xff-utf8",
                "bad-\\xfe-utf8",
                "back\\\\slash-\\xff",
                "ünïcode",
                "plain",
            ]
        )
        lines = [line for line in body.decode().splitlines() if line.startswith("model_storage_model_bytes{")]
        assert len(lines) == len(set(lines)) == len(ODD) + 1


def test_only_changed_models_are_reformatted() -> None:
    tree = Tree(Layout())
    for i in range(50):
        tree.set_file(("raw", f"m{i}", "w"), FileInfo(i, 1.0))
    cache = ModelLinesCache()
    cache.render(tree)
    assert cache.formatted == 50
    cache.render(tree)
    assert cache.formatted == 50
    tree.set_file(("raw", "m7", "w"), FileInfo(700, 2.0))
    text = cache.render(tree).decode()
    assert cache.formatted == 51
    assert 'model_storage_model_bytes{tier="raw",model="m7"} 700\n' in text


def test_deleted_models_vanish_and_swapped_trees_rerender() -> None:
    tree = Tree(Layout())
    tree.set_file(("raw", "a", "w"), FileInfo(1, 1.0))
    tree.set_file(("raw", "b", "w"), FileInfo(2, 1.0))
    cache = ModelLinesCache()
    cache.render(tree)
    tree.remove(("raw", "a"))
    assert 'model="a"' not in cache.render(tree).decode()
    # A reconcile swaps in a fresh tree, whose changes this cache never took.
    fresh = Tree(Layout())
    fresh.set_file(("raw", "b", "w"), FileInfo(99, 1.0))
    assert 'model_storage_model_bytes{tier="raw",model="b"} 99\n' in cache.render(fresh).decode()


def test_label_escaping_and_values() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    # An undecodable byte as `\xff` in the label value (its backslash escaped again in the text).
    assert escape_label_value("x\udcffy") == "x\\\\xffy"
    assert escape_label_value("ünï") == "ünï"
    assert format_value(3) == "3"
    assert format_value(1.5) == "1.5"
    assert format_value(2.0) == "2"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("nan")) == "NaN"


def test_render_now_never_waits_and_declines_large_work(service: ExporterService) -> None:
    """The event loop's render: None while a lock is held, the cache is cold, or more than
    INLINE_MODELS models changed; otherwise exactly what the waiting render says."""
    renderer = MetricsRenderer(service, service.settings)
    assert renderer.render_now() is None  # cold: every model would be formatted
    first = renderer.render()
    service.tree.set_file(("raw", "plain", "w"), FileInfo(12345, 1.8e9))
    now = renderer.render_now()
    assert now is not None and b'model_storage_model_bytes{tier="raw",model="plain"} 12345\n' in now
    assert _samples(now) != _samples(first) and _samples(now) == _samples(renderer.render())
    with service.lock:  # the updater applying a slice
        assert renderer.render_now() is None
    service.polling = True  # as on a network filesystem: its statvfs may hang, so never on the loop
    assert renderer.render_now() is None
    service.polling = False
    assert renderer.render_now() is not None
    for i in range(INLINE_MODELS + 1):
        service.tree.set_file(("raw", f"many-{i}", "w"), FileInfo(i, 1.0))
    assert renderer.render_now() is None
    assert _samples(renderer.render()) == _samples(generate_latest(build_registry(service, service.settings)))
    assert renderer.render_now() is not None  # the waiting render took those changes
    # Removing most models, though fewer than INLINE_MODELS, lays the cache out afresh: not on the loop.
    for i in range(INLINE_MODELS * 6 // 10):
        service.tree.remove(("raw", f"many-{i}"))
    assert renderer.render_now() is None
    assert _samples(renderer.render()) == _samples(generate_latest(build_registry(service, service.settings)))

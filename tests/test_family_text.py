"""`families_text` writes exactly what prometheus_client's `generate_latest` writes (its oracle)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.index.service import ExporterService
from exporter.index.tree import FileInfo
from exporter.metrics.endpoint import MetricsRenderer
from exporter.metrics.family_text import _fast_lines, families_text
from shared.cleanup_state import CleanupState, write_cleanup_state
from shared.config import load_settings
from shared.plan_summary import PlanSummary, summary_path, write_plan_summary


class _Given(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _oracle(families: list[Metric]) -> bytes:
    return generate_latest(_Given(families))


# Names mostly in the legacy character set, sometimes not (a dot, a dash, a letter outside ASCII,
# a trailing newline): those take the fallback, which must write the same bytes too.
_NAME = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_:]{0,12}", fullmatch=True),
    st.sampled_from(["a.b", "dash-name", "ünï", "x\n", "a:b"]),
)
_LABEL = st.one_of(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), st.sampled_from(["a.b", "é"]))
_VALUE = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.7e9, 1e21, 123456789.0, 5e-324]),
)
_SUFFIX = st.sampled_from(["", "_total", "_created", "_info", "_sum", "_count", "_bucket", "_gsum", "_gcount"])
_TYPE = st.sampled_from(["gauge", "counter", "info", "summary", "histogram", "gaugehistogram", "unknown", "stateset"])
_TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(['a"b\\c\nd', "\\n"])


@st.composite
def _family(draw: st.DrawFn) -> Metric:
    name = draw(_NAME)
    metric = Metric(name, draw(_TEXT), draw(_TYPE))
    for _ in range(draw(st.integers(0, 4))):
        labels = draw(st.dictionaries(_LABEL, _TEXT, max_size=3))
        timestamp = draw(st.none() | st.floats(0, 2e9))
        sample_name = draw(st.one_of(_SUFFIX.map(lambda suffix: name + suffix), _NAME))
        metric.add_sample(sample_name, labels, draw(_VALUE), timestamp)
    return metric


@settings(max_examples=400, deadline=None)
@given(st.lists(_family(), max_size=5))
def test_the_same_bytes_as_generate_latest_for_any_families(families: list[Metric]) -> None:
    assert families_text(families) == _oracle(families)


def test_the_fast_path_covers_gauges_counters_and_info_and_hands_on_the_rest() -> None:
    gauge = GaugeMetricFamily("g", 'help "with" \\ and\nnewline', labels=["tier", "model"])
    gauge.add_metric(["raw", 'we"ird\nname\\'], 1.7e9)
    gauge.add_metric(["quantized", "ünï"], math.nan)
    counter = CounterMetricFamily("c", "a counter", labels=["kind"])
    counter.add_metric(["scan"], 3)
    info = InfoMetricFamily("build", "build", labels=["version"])
    info.add_metric(["1.0"], {})
    created = CounterMetricFamily("made", "with a created time", value=1, created=1.7e9)
    stamped = GaugeMetricFamily("stamped", "with a timestamp")
    stamped.add_metric([], 1, timestamp=1.7e9)
    dotted = Metric("a.b", "outside the legacy set", "gauge")
    dotted.add_sample("a.b", {}, 1)
    summary = Metric("s", "a summary", "summary")
    summary.add_sample("s_sum", {}, 2)
    for covered in (gauge, counter, info):
        assert _fast_lines(covered) is not None
    for handed_on in (created, stamped, dotted, summary):
        assert _fast_lines(handed_on) is None
    everything = [gauge, created, counter, stamped, info, dotted, summary]
    assert families_text(everything) == _oracle(everything)


def test_the_exporters_own_fixed_families_are_written_as_generate_latest_writes_them(store: Path) -> None:
    settings_ = load_settings(env={"STORAGE_BASE_PATH": str(store), "STORAGE_SCAN_WORKERS": "1"})
    service = ExporterService(settings_)  # not started: the index is filled by hand
    service.tree.set_file(("raw", "m", "w"), FileInfo(10, 1.7e9 + 0.5, None, 8))
    write_cleanup_state(
        settings_.cleanup_state_file,
        CleanupState(
            timestamp=1.7e9,
            success=True,
            run_id="r1",
            exit_code=0,
            evicted_bytes_total={"age": 10, "custom": 2},
            evicted_models_total={"age": 1, "custom": 1},
            skipped={"in_use": 2},
            trash_bytes=5,
            usage_blind=False,
        ),
    )
    write_plan_summary(
        summary_path(settings_.state_path), PlanSummary("p1", 1.7e9 + 0.25, {"size": 1 << 40}, {"size": 3})
    )
    renderer = MetricsRenderer(service, settings_)
    got = service.read_index(lambda tree: None)
    assert got is not None
    families = [*renderer._collector.families(got[0], models=False), *renderer._plan.collect()]
    assert {f.type for f in families} == {"gauge", "counter", "info"}
    assert all(_fast_lines(f) is not None for f in families)  # none takes the slow path
    text = families_text(families)
    assert text == _oracle(families)
    assert b'model_storage_cleanup_evicted_bytes_total{policy="custom"} 2.0' in text
    assert b'model_storage_cleanup_planned_bytes{policy="size"} 1.099511627776e+12' in text

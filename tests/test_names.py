"""One spelling of a file name in /metrics, the audit log and the API (`shared.names`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from exporter.metrics.endpoint import MetricsRenderer
from shared import metric_names as m
from shared.audit import AuditLog, verify_audit
from shared.names import name_text
from tests.support import http_get, http_json, make_service, parse_metrics, running, start_exporter, wait_until

# Names as the filesystem holds them: bytes. Each is hostile in its own way.
HOSTILE = (
    b"bad-\xff-utf8",
    b"bad-\xfe-utf8",  # differs from the one above only in an undecodable byte
    b"surrogate-\xed\xa0\x80-utf8",  # U+D800 encoded as UTF-8: not valid UTF-8
    b"truncated-\xc3",
    b"back\\slash-\xff",
    b"back\\slash",
    b'quo"te-\xfe',
    b'quo"te',
    b"new\nline-\xff",
    b"new\nline",
    "ünïcode-✓".encode(),
    b"plain",
)
VALID = ('we"ird\nname', "back\\slash\\", "ünïcode", "日本語-模型", "emoji-🦙", "tab\tand space", "plain.gguf")


def old_label_text(name: str) -> str:
    """The /metrics spelling before `shared.names` (base f6d0ff2), kept as the oracle of byte-identity."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    raw = name.encode("utf-8", "surrogateescape")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def exposition_escape(value: str) -> str:
    """Label value escaping by the text exposition format itself."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@given(st.binary(max_size=40))
def test_every_name_from_the_filesystem_keeps_its_metrics_spelling(raw: bytes) -> None:
    name = os.fsdecode(raw)
    assert name_text(name) == old_label_text(name)
    assert name_text(name).encode("utf-8").decode("utf-8") == name_text(name)  # always valid UTF-8


@given(st.text(max_size=20))
def test_valid_text_is_itself(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        assert name_text(name) != name
    else:
        assert name_text(name) == name


@given(st.binary(max_size=12), st.binary(max_size=12))
def test_two_names_that_are_not_utf8_never_render_alike(a: bytes, b: bytes) -> None:
    first, second = os.fsdecode(a), os.fsdecode(b)
    invalid = [not _valid(first), not _valid(second)]
    if a != b and all(invalid):
        assert name_text(first) != name_text(second)


def _valid(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_surrogates_a_caller_builds_by_hand_are_escaped_too() -> None:
    assert name_text("a\ud800b\\") == "a\\ud800b\\\\"
    assert name_text("\udcc3\udca9") == "\\xc3\\xa9"  # not folded into the valid "é"


def test_metrics_audit_and_api_spell_each_hostile_name_alike(tmp_path: Path) -> None:
    models = tmp_path / "models"
    raw_tier = os.fsencode(str(models / "raw"))
    os.makedirs(raw_tier)
    for i, name in enumerate(HOSTILE):
        os.mkdir(raw_tier + b"/" + name)
        with open(raw_tier + b"/" + name + b"/w", "wb") as handle:
            handle.write(b"x" * (100 + i))
    expected = {name_text(os.fsdecode(name)): 100 + i for i, name in enumerate(HOSTILE)}
    assert len(expected) == len(HOSTILE)

    with running(start_exporter(models, tmp_path, tmp_path)) as proc:
        info = http_json(proc.url + f"/storage/info?top={len(HOSTILE)}")
        metrics = parse_metrics(http_text(proc.url + "/metrics"))
    api = {entry["model"]: entry["bytes"] for entry in info["largest_models"] if entry["tier"] == "raw"}
    labels = {
        dict(labels)["model"]: int(value)
        for (family, labels), value in metrics.items()
        if family == m.MODEL_BYTES and dict(labels)["tier"] == "raw"
    }
    log = AuditLog(tmp_path / "audit.log")
    for name in HOSTILE:
        log.append("skip", actor="test", target="raw/" + os.fsdecode(name), details={"model": os.fsdecode(name)})
    assert verify_audit(tmp_path / "audit.log").ok
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_bytes().decode("utf-8").splitlines()]
    audited = [record["details"]["model"] for record in records]

    assert api == expected
    assert labels == expected
    assert audited == [name_text(os.fsdecode(name)) for name in HOSTILE]
    assert [record["target"] for record in records] == ["raw/" + model for model in audited]


def http_text(url: str) -> str:
    status, body = http_get(url)
    assert status == 200, (url, status, body[:300])
    return body.decode("utf-8")


def test_two_models_differing_only_in_undecodable_bytes_are_two_entries_in_storage_info(tmp_path: Path) -> None:
    models = tmp_path / "models"
    raw_tier = os.fsencode(str(models / "raw"))
    os.makedirs(raw_tier)
    for name, size in ((b"m-\xff", 10), (b"m-\xfe", 20)):
        os.mkdir(raw_tier + b"/" + name)
        with open(raw_tier + b"/" + name + b"/w", "wb") as handle:
            handle.write(b"x" * size)
    with running(start_exporter(models, tmp_path, tmp_path)) as proc:
        info = http_json(proc.url + "/storage/info")
    largest = [(entry["model"], entry["bytes"]) for entry in info["largest_models"]]
    assert largest == [("m-\\xfe", 20), ("m-\\xff", 10)]
    assert len({model for model, _ in largest}) == 2


def test_metrics_are_byte_for_byte_the_exposition_of_each_name_on_a_real_tree(store: Path) -> None:
    raw_tier = os.fsencode(str(store / "models" / "raw"))
    names = [name.encode() for name in VALID] + list(HOSTILE)
    for i, name in enumerate(dict.fromkeys(names)):
        os.mkdir(raw_tier + b"/" + name)
        with open(raw_tier + b"/" + name + b"/w", "wb") as handle:
            handle.write(b"x" * (1000 + i))
    svc = make_service(store)
    svc.start()
    try:
        wait_until(svc.is_ready, timeout=30, what="initial scan")
        body = MetricsRenderer(svc, svc.settings).render()
    finally:
        svc.stop()
    lines = {line for line in body.decode("utf-8").splitlines() if line.startswith(m.MODEL_BYTES + "{")}
    for i, name in enumerate(dict.fromkeys(names)):
        label = exposition_escape(old_label_text(os.fsdecode(name)))
        assert f'{m.MODEL_BYTES}{{tier="raw",model="{label}"}} {1000 + i}' in lines, (name, sorted(lines))
    assert len(lines) == len(set(names))

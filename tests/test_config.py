"""The one settings object: precedence, validation, one-line errors, secrets kept out of sight."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import load_settings
from shared.errors import ConfigError
from shared.settings_table import FIELDS


def test_defaults_follow_the_spec() -> None:
    s = load_settings(env={})
    assert s.models_path == Path("storage/models")
    assert s.metrics_path == Path("storage/metrics")
    assert s.grafana_path == Path("storage/grafana")
    assert s.capacity_bytes == 100 * 10**9
    assert s.cleaner.age_days == 30
    assert s.cleaner.min_requests == 10
    assert s.cleaner.request_timeframe_days == 7
    assert s.exporter.listen == ("127.0.0.1", 8470)
    assert all(source == "default" for source in s.sources.values())


def test_env_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("storage:\n  base_path: /from-file\n  max_size_gb: 5\ncleaner:\n  age_days: 3\n")
    s = load_settings(config, env={"STORAGE_MAX_SIZE_GB": "7.5"})
    assert s.base_path == Path("/from-file")
    assert s.models_path == Path("/from-file/models")
    assert s.capacity_bytes == 7_500_000_000
    assert s.cleaner.age_days == 3
    assert s.sources["storage.max_size_gb"] == "env"
    assert s.sources["cleaner.age_days"] == "file"
    assert s.sources["cleaner.min_requests"] == "default"


def test_config_file_from_env_variable(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("exporter:\n  listen: '[::1]:9999'\n")
    assert load_settings(env={"STORAGE_CONFIG": str(config)}).exporter.listen == ("::1", 9999)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STORAGE_MAX_SIZE_GB": "-1"}, "STORAGE_MAX_SIZE_GB='-1': expected a number > 0"),
        ({"STORAGE_MAX_SIZE_GB": "nan"}, "STORAGE_MAX_SIZE_GB"),
        ({"STORAGE_CLEANUP_POLICIES": "age,magic"}, "subset of age, usage, size"),
        ({"STORAGE_USAGE_TIERS": "attic"}, "STORAGE_USAGE_TIERS"),
        ({"STORAGE_CLEANUP_LOW_WATERMARK": "1.5"}, "STORAGE_CLEANUP_LOW_WATERMARK"),
        ({"STORAGE_EXPORTER_LISTEN": "127.0.0.1"}, "HOST:PORT"),
        ({"STORAGE_FORCE_POLLING": "perhaps"}, "true or false"),
        ({"STORAGE_RAW_DIR": "x", "STORAGE_QUANTIZED_DIR": "x"}, "three different"),
        ({"STORAGE_PROMETHEUS_MATCHERS": "instance=a"}, "label matchers"),
        ({"STORAGE_USAGE_QUERY": "sum(up)"}, "$window"),
        ({"STORAGE_TLS_CERT_FILE": "/c.pem"}, "both or neither"),
        ({"STORAGE_TRASH_RETENTION_DAYS": "0"}, "STORAGE_TRASH_RETENTION_DAYS='0': expected a number > 0"),
        ({"STORAGE_TRASH_MAX_GB": "0"}, "STORAGE_TRASH_MAX_GB='0': expected a number > 0"),
        ({"STORAGE_TRASH_MAX_GB": "-3"}, "choose STORAGE_BACKUP_MODE=none explicitly"),
        ({"STORAGE_TRASH_RETENTION_DAYS": "0"}, "to delete evicted models directly"),
        ({"STORAGE_BASE_PATH": "/s", "STORAGE_TRASH_PATH": "/s/models/trash"}, "outside the models path"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    line = caught.value.one_line()
    assert needle in line
    assert "\n" not in line
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STORAGE_TRASH_PATH": "/s"}, "STORAGE_TRASH_PATH='/s' contains the models path '/s/models'"),
        ({"STORAGE_TRASH_PATH": "/"}, "STORAGE_TRASH_PATH='/' contains the models path"),
        ({"STORAGE_TRASH_PATH": "/s/models"}, "STORAGE_TRASH_PATH='/s/models' is the models path"),
        ({"STORAGE_TRASH_PATH": "/s/models/raw/t"}, "STORAGE_TRASH_PATH='/s/models/raw/t' is inside"),
        ({"STORAGE_BACKUP_PATH": "/s"}, "STORAGE_BACKUP_PATH='/s' contains the models path"),
        ({"STORAGE_BACKUP_PATH": "/s/models/b"}, "STORAGE_BACKUP_PATH='/s/models/b' is inside"),
        ({"STORAGE_STATE_PATH": "/s/models"}, "STORAGE_STATE_PATH='/s/models' is the models path"),
        ({"STORAGE_AUDIT_LOG": "/s/models/raw/audit.log"}, "STORAGE_AUDIT_LOG='/s/models/raw/audit.log' is inside"),
        ({"STORAGE_MODELS_PATH": "/s"}, "cleaner.trash.path='/s/trash' (derived from storage.base_path) is inside"),
        (
            {"STORAGE_MODELS_PATH": "/s/trash/m"},
            "cleaner.trash.path='/s/trash' (derived from storage.base_path) contains",
        ),
    ],
)
def test_trash_backup_state_and_audit_paths_must_not_overlap_the_models_path(env: dict[str, str], needle: str) -> None:
    # A trash containing the models path would list live models as trash entries, and purge them.
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"STORAGE_BASE_PATH": "/s", **env})
    line = caught.value.one_line()
    assert needle in line, line
    assert "expected a path outside the models path" in line and "\n" not in line
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("backup", ["/s/trash", "/s/trash/archive", "/s"])
def test_an_archive_path_overlapping_the_trash_is_refused(backup: str) -> None:
    # Purge takes every run directory under the trash for trash: archived copies there would go too.
    env = {"STORAGE_BASE_PATH": "/s", "STORAGE_MODELS_PATH": "/m", "STORAGE_BACKUP_MODE": "archive"}
    with pytest.raises(ConfigError, match="apart from the trash") as caught:
        load_settings(env={**env, "STORAGE_BACKUP_PATH": backup})
    assert caught.value.exit_code == 2 and "STORAGE_BACKUP_PATH" in caught.value.one_line()
    assert load_settings(env={**env, "STORAGE_BACKUP_PATH": "/s/archive"}).backup_path == Path("/s/archive")


def test_a_state_path_above_the_models_path_is_allowed() -> None:
    # The state directory holds only the cleaner's own files under fixed names: it may contain the models.
    settings = load_settings(env={"STORAGE_BASE_PATH": "/s", "STORAGE_STATE_PATH": "/s"})
    assert settings.state_path == Path("/s")


def test_overlapping_paths_are_refused_from_the_config_file_under_their_yaml_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("storage:\n  base_path: /s\ncleaner:\n  trash:\n    path: /s\n")
    with pytest.raises(ConfigError, match=r"cleaner.trash.path='/s' contains the models path"):
        load_settings(config, env={})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yml", env={})
    bad = tmp_path / "bad.yml"
    bad.write_text("storage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, env={})
    unknown = tmp_path / "unknown.yml"
    unknown.write_text("storage:\n  max_sizegb: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'storage\.max_sizegb'"):
        load_settings(unknown, env={})


def test_named_tokens_and_token_files(tmp_path: Path) -> None:
    secret = tmp_path / "admin.token"
    secret.write_text("s3cr3t-token-value-0123\n")
    s = load_settings(env={"STORAGE_ADMIN_TOKEN_FILE": str(secret), "STORAGE_READ_TOKEN": "grafana:r" + "x" * 20})
    assert s.api.admin_tokens == {"admin": "s3cr3t-token-value-0123"}
    assert s.api.read_tokens == {"grafana": "r" + "x" * 20}
    public = s.public()
    assert public["api.admin_tokens"] == ["admin"]
    assert "s3cr3t" not in repr(public)


def test_secrets_stay_out_of_the_settings_repr() -> None:
    # A repr reaches an assertion message, a debugger or a log line with locals: names only.
    env = {"STORAGE_ADMIN_TOKEN": "ops:" + "s3cret" * 4, "STORAGE_PROMETHEUS_PASSWORD": "hunter2-hunter2"}
    shown = repr(load_settings(env=env))
    assert "s3cret" not in shown and "hunter2" not in shown
    assert "admin_tokens=['ops']" in shown


GENERATED = {
    "base64 with padding": "R0evGwU2cW5pZ3h0c2VjcmV0dG9rZW4xMjM0NTY3OA==",
    "base64, one =": "R0evGwU2cW5pZ3h0c2VjcmV0dG9rZW4xMjM0NTY3=",
    "urlsafe base64": "Xy-_0a9ZqQ1kV3-_x2bLpQ7Rt8uWm4nE",
    "hex": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
}


@pytest.mark.parametrize("token", GENERATED.values(), ids=GENERATED.keys())
def test_what_generators_print_is_one_bare_token(token: str, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(token + "\n")
    assert load_settings(env={"STORAGE_ADMIN_TOKEN": token}).api.admin_tokens == {"admin": token}
    assert load_settings(env={"STORAGE_ADMIN_TOKEN_FILE": str(secret)}).api.admin_tokens == {"admin": token}
    assert load_settings(env={"STORAGE_READ_TOKEN": token}).api.read_tokens == {"read": token}


def test_named_tokens_take_a_colon_and_bare_ones_are_numbered() -> None:
    padded, hexed = GENERATED["base64 with padding"], GENERATED["hex"]
    s = load_settings(env={"STORAGE_ADMIN_TOKEN": f"ops:{padded}, ci.bot-2:{hexed}"})
    assert s.api.admin_tokens == {"ops": padded, "ci.bot-2": hexed}
    s = load_settings(env={"STORAGE_ADMIN_TOKEN": f"{padded},{hexed}"})  # a rotation: old and new
    assert s.api.admin_tokens == {"admin": padded, "admin-2": hexed}


def test_the_old_name_equals_form_is_refused_with_how_to_migrate() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"STORAGE_ADMIN_TOKEN": "ops=hunter2-but-longer-than-16"})
    line = caught.value.one_line()
    assert caught.value.exit_code == 2
    assert "NAME=TOKEN is no longer read" in line and "NAME:TOKEN" in line, line
    assert "hunter" not in line and "ops" not in line


def test_a_short_token_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"STORAGE_ADMIN_TOKEN": "ops:hunter2"})
    assert "hunter2" not in caught.value.one_line()
    assert "item 1 of 1: expected a token of at least 16 characters" in caught.value.one_line()


def test_fractional_durations_are_accepted() -> None:
    s = load_settings(env={"STORAGE_CLEANUP_AGE_DAYS": "0.0005", "STORAGE_CLEANUP_GRACE_HOURS": "0"})
    assert s.cleaner.age_days * 86400 == pytest.approx(43.2)


def test_every_field_has_a_distinct_env_var() -> None:
    envs = [f.env for f in FIELDS]
    assert len(envs) == len(set(envs))
    assert all(env.startswith("STORAGE_") for env in envs)

"""The typed views a command hands inward, each built once here from the whole settings.

Only the command modules (and cleaner.cli) see `Settings`; every other cleaner module is handed
one of these, or a section such as `settings.cleaner`.
"""

from __future__ import annotations

from cleaner.report import ShownSettings
from cleaner.store_paths import StorePaths
from shared.config import Settings
from shared.settings_table import FIELDS


def store_paths(settings: Settings) -> StorePaths:
    return StorePaths(
        models_path=settings.models_path,
        layout=settings.layout,
        state_path=settings.state_path,
        trash_path=settings.trash_path,
        backup_path=settings.backup_path,
        audit_log_path=settings.audit_log_path,
        cleanup_state_file=settings.cleanup_state_file,
    )


def shown_settings(settings: Settings) -> ShownSettings:
    return ShownSettings(
        values=settings.public(),
        sources=settings.sources,
        envs={f.key: f.env for f in FIELDS},
        enabled=settings.cleaner.policies,
    )

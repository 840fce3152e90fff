"""Where the cleaner reads and writes: the paths derived from the settings, as one small typed view.

Built once at the command's edge (cleaner.commands.views) from the whole settings, then handed
inward instead of them: the planner, the executor, recovery, restore and purge see these paths and
the `cleaner` section, nothing else. Each field is named as the `Settings` property it copies, so
`paths.trash_path` is `settings.trash_path`.

Pure: values only; nothing here touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.layout import Layout


@dataclass(frozen=True, slots=True)
class StorePaths:
    """The store and the cleaner's own places, each resolved from its setting or storage.base_path."""

    models_path: Path
    layout: Layout
    state_path: Path
    trash_path: Path
    backup_path: Path
    audit_log_path: Path
    cleanup_state_file: Path

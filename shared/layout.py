"""Which tier and which model a path under the models path belongs to: one rule, used everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from shared.metric_names import OTHER_TIER


@dataclass(frozen=True, slots=True)
class Layout:
    """The tier names as they are laid out on disk (directory name -> tier label)."""

    raw_dir: str = "raw"
    quantized_dir: str = "quantized"
    repository_dir: str = "repository"

    @property
    def tier_dirs(self) -> dict[str, str]:
        """Directory name under the models path -> the tier label used in metrics."""
        return {self.raw_dir: "raw", self.quantized_dir: "quantized", self.repository_dir: "repository"}

    @property
    def tiers(self) -> tuple[str, ...]:
        return ("raw", "quantized", "repository")

    def dir_for_tier(self, tier: str) -> str:
        for directory, label in self.tier_dirs.items():
            if label == tier:
                return directory
        raise KeyError(tier)

    def classify(self, parts: tuple[str, ...]) -> tuple[str, str | None]:
        """(tier, model) for a path relative to the models path, as its components.

        A model is a first-level entry of a tier directory; the tier directory itself and
        anything outside the three tiers have no model. Everything outside them is `other`.
        """
        if not parts:
            return OTHER_TIER, None
        tier = self.tier_dirs.get(parts[0])
        if tier is None:
            return OTHER_TIER, None
        if len(parts) == 1:
            return tier, None
        return tier, parts[1]

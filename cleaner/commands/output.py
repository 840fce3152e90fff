"""What every command prints: a JSON document or lines for people, sizes in SI units, the actor."""

from __future__ import annotations

import argparse
import json
from typing import Any


def actor_of(args: argparse.Namespace) -> str:
    return str(getattr(args, "actor", None) or "cli")


def emit(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"

"""Content-Security-Policy source hashes, for the pages that inline their one style and script. Pure."""

from __future__ import annotations

import base64
import hashlib


def csp_hash(source: str) -> str:
    """The `'sha256-...'` source expression that allows exactly this inline text."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"

"""A file name as text that is valid UTF-8: the one spelling /metrics, the audit log and the API share.

Invariants (pure; tested against the three outputs in tests/test_names.py):
- A name that is valid UTF-8 is itself: the cleaner maps a label back to its path, and /metrics
  stays byte-for-byte what it was.
- A name that is not (`os.fsdecode` keeps each undecodable byte as a lone surrogate U+DC80..U+DCFF)
  gets each such byte as `\\xNN` and each of its own backslashes doubled, so two names that differ
  only in those bytes stay two names (U+FFFD for all of them made one). Any other lone surrogate,
  which only a caller building strings by hand can produce, becomes `\\udNNN` the same way.
- Among names that are not valid UTF-8 no two render alike. (A valid name spelled exactly like
  another name's escaped form would still clash with it: that takes intent.)
"""

from __future__ import annotations

import re

# A backslash or a lone surrogate: what a name that is not valid UTF-8 spells differently.
_SPECIAL = re.compile(r"[\\\ud800-\udfff]")


def name_text(name: str) -> str:
    """`name` as valid UTF-8 text, by the rules in the module docstring."""
    if name.isascii():
        return name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return _SPECIAL.sub(_escape, name)
    return name


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's home for the bytes 0x80..0xFF
        return f"\\x{code - 0xDC00:02x}"
    if code == ord("\\"):
        return "\\\\"
    return f"\\u{code:04x}"

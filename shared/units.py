"""Unit constants shared by both processes: bytes per GB (decimal, as the settings say) and seconds per day and hour.

Pure: constants only, so a pure module (cleaner.policies) can use them without importing the
settings loader, which reads files and the environment.
"""

from __future__ import annotations

GB = 10**9
DAY_SECONDS = 86400.0
HOUR_SECONDS = 3600.0

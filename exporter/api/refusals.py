"""How many refused API requests reach the audit log: bounded per caller address, the rest counted.

Every refused request (a bad token, an admin operation without one) is worth an audit line, but the
audit log lives next to the models: a client hammering the API with bad tokens must not be able to
fill the disk it is meant to watch, nor make every request pay for an fsync'd append. So each remote
address gets `limit` audit lines per window; what goes beyond is counted, logged once, and reported
in the first audit line of that address's next window (`refusals_not_audited`). Pure: the clock
is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# Addresses remembered at once; past this, addresses whose window ended are forgotten first, then
# every further address shares one bucket, so memory stays bounded whatever the callers.
MAX_ADDRESSES = 4096
SHARED = "*"


class Verdict(NamedTuple):
    write: bool  # write an audit line for this refusal
    left_out: int  # refusals of this address not audited in its previous window (report them now)
    first_left_out: bool  # the first refusal of this window not to be written (log it once)


@dataclass
class _Window:
    started: float
    written: int = 0
    left_out: int = 0


@dataclass
class RefusalThrottle:
    """At most `limit` audited refusals per address per `window_seconds`; 0 means no limit."""

    limit: int
    window_seconds: float = 60.0
    _windows: dict[str, _Window] = field(default_factory=dict)

    def admit(self, address: str, now: float) -> Verdict:
        if self.limit <= 0:
            return Verdict(True, 0, False)
        key = self._key(address, now)
        window = self._windows.get(key)
        if window is None or now - window.started >= self.window_seconds:
            carried = window.left_out if window is not None else 0
            self._windows[key] = _Window(started=now, written=1)
            return Verdict(True, carried, False)
        if window.written < self.limit:
            window.written += 1
            return Verdict(True, 0, False)
        window.left_out += 1
        return Verdict(False, 0, window.left_out == 1)

    def _key(self, address: str, now: float) -> str:
        if address in self._windows or len(self._windows) < MAX_ADDRESSES:
            return address
        # An ended window's unreported count is dropped with it: it was logged when it began.
        expired = [a for a, w in self._windows.items() if now - w.started >= self.window_seconds]
        for stale in expired:
            del self._windows[stale]
        return address if len(self._windows) < MAX_ADDRESSES else SHARED

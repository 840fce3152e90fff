"""The reduced torture run (tests/cleaner_torture.py): writers against a real cleaner killed and held at its
windows, in rename, copy-fallback (a tmpfs mounted here) and archive modes; no byte a writer wrote is lost.
`make stress-cleaner` runs every crash point x every mode."""

from __future__ import annotations

from tests import cleaner_torture


def test_reduced_torture_loses_no_byte_any_writer_wrote() -> None:
    chosen = cleaner_torture.scenarios(full=False)
    assert {s.name for s in chosen} == cleaner_torture.REDUCED  # every named scenario exists
    outcomes = cleaner_torture.torture(chosen, seed=13)
    report = cleaner_torture.summary(outcomes)
    assert all(o.reached for o in outcomes), report
    assert all(not o.lost and not o.problems for o in outcomes), report
    assert sum(o.written_bytes for o in outcomes) == sum(o.found_bytes for o in outcomes) > 0, report
    assert sum(o.acts for o in outcomes) > len(outcomes) * 4, report  # every window saw every writer

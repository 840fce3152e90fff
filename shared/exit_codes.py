"""The cleaner's exit codes, one table for both processes: the cleaner exits with them, the exporter's API reads them.

The values are a contract (timers, CronJobs, alerts and the API's answers depend on them): never renumber.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # done, including nothing to do and models skipped by a check
    UNEXPECTED = 1  # an unexpected error; `audit verify`: the chain is broken
    CONFIG = 2  # bad configuration or usage
    PARTIAL = 3  # at least one eviction failed on an error; what was done is restorable
    PRECONDITION = 4  # nothing touched: the lock held, Prometheus unreachable, a read-only place
    FILESYSTEM = 5  # the filesystem refused an operation (ENOSPC, EDQUOT, EACCES, EPERM, EROFS)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it

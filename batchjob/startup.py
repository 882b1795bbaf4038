"""Start-up milestones, for the log: each one's time since the process started.

`run`, `worker` and `serve` pay their start-up on every start (a cron job, a container), so
where it goes is worth seeing: imports done, artifact verified, replicas spawned, each
replica ready (and its own steps), tokenizer loaded, first records, first batch dispatched.
Each is one DEBUG line of the `batchjob.startup` logger, `+1.234s <what> (monotonic N)`:
the monotonic clock is the machine's, shared by every process, so a replica's steps line up
with its parent's, and a caller that noted the clock before starting the process can take
its own differences (bench/startup_bench.py does).
"""

from __future__ import annotations

import functools
import logging
import os
import time

log = logging.getLogger("batchjob.startup")
_seen: set[str] = set()


@functools.cache
def process_started() -> float:
    """The monotonic clock when this process started (to the kernel's clock tick, 10 ms), or
    when this was first asked where /proc can't tell."""
    return _process_started() or time.monotonic()


def _process_started() -> float | None:
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22, starttime, in clock ticks after boot; the name (field 2) may hold spaces.
            ticks = int(f.read().rpartition(")")[2].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return None
    return time.monotonic() - age


def mark(event: str, at: float | None = None, *, once: bool = False) -> None:
    """Log that `event` happened (now, or at the monotonic time `at`); with `once`, only the
    first time this process marks it."""
    if once:
        if event in _seen:
            return
        _seen.add(event)
    if log.isEnabledFor(logging.DEBUG):
        when = time.monotonic() if at is None else at
        log.debug("%+.3fs %s (monotonic %.6f)", when - process_started(), event, when)

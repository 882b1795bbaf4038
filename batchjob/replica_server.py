"""The fork server replicas are forked from: started first thing by `run`, `worker` and `serve`.

A replica needs torch, and importing torch is the longest part of its start (well over a
second here). multiprocessing's forkserver is a fresh interpreter, not a copy of this
process's threads and state, that imports torch once (`batchjob.replica_preload`) before it
forks anything: N replicas cost one torch import rather than N at once, and started with the
process, that import overlaps the driver's own imports, the listing of shards and the
artifact's verification. This module imports nothing heavy, so that it can start the server
before the rest of batchjob is imported.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
from typing import Final

PRELOAD = ["batchjob.replica_preload"]  # what the server imports before its first fork
CONTEXT: Final = "forkserver"


def start_replica_server() -> None:
    """Start the fork server now, unless it runs: it imports torch while the caller goes on."""
    multiprocessing.get_context(CONTEXT).set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()


def stop_replica_server() -> None:
    """Kill the fork server, should it run, even mid-import (a process that ends early, on a
    refusal, need not wait for it); the next pool starts another. Only once no pool runs:
    the replicas are its children."""
    # CPython keeps the server's pid private; without it, the server ends by itself once it
    # sees this process gone (after its imports).
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid, stop = getattr(server, "_forkserver_pid", None), getattr(server, "_stop", None)
    if pid is None or stop is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        stop()  # reaps it and forgets it

"""What the replicas' fork server imports once, before it forks any replica (replicas.py).

Imported in that server only: torch (a second or more, the longest part of a replica's
start) and the modules a replica unpickles and loads with. The garbage collector is off
meanwhile (importing torch allocates a great deal: a collection pass every so often costs
tenths of a second), then everything imported is frozen out of it, so that the replicas,
forked from here, share those pages rather than copy them when they collect.
"""

from __future__ import annotations

import gc
import time

from batchjob.startup import process_started

STARTED = process_started()  # the fork server's own start (the replicas' steps name it)
BEGAN = time.monotonic()
gc.disable()
try:
    import torch  # noqa: F401

    TORCH_IMPORTED = time.monotonic()
    import batchjob.artifact
    import batchjob.backends.cpu
    import batchjob.replica_process  # noqa: F401
finally:
    gc.freeze()
    gc.enable()
IMPORTED = time.monotonic()

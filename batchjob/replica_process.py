"""One replica process: its main loop.

The process is spawned by the pool in `replicas.py`; it applies its placement (planned in
`cores.py`), loads the model once through a picklable loader, reports ready, then answers
batches until told to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Protocol

import numpy as np

from batchjob.cores import Placement, plan_placements
from batchjob.startup import process_started

# Placement and plan_placements live in cores.py; the runner, worker and server import them
# from here.
__all__ = ["Loader", "Placement", "Predict", "plan_placements", "replica_main"]


class Predict(Protocol):
    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray: ...


class Loader(Protocol):  # picklable (a module-level frozen dataclass); runs in the replica
    def __call__(self) -> Predict: ...


def replica_main(placement: Placement, loader: Loader, conn: Connection) -> None:
    """A replica process: apply the placement, load once, answer batches until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides how replicas stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    steps = {"process started": process_started(), "replica began": time.monotonic()}
    try:
        if placement.neuron_cores is not None:  # the Neuron runtime reads it when the model loads
            os.environ["NEURON_RT_VISIBLE_CORES"] = placement.neuron_cores
        if placement.cpus:
            os.sched_setaffinity(0, placement.cpus)
            import torch

            torch.set_num_threads(len(placement.cpus))
            with contextlib.suppress(RuntimeError):  # settable only before inter-op work starts
                torch.set_num_interop_threads(1)
            steps["torch imported"] = time.monotonic()
        predict = loader()
        steps["model loaded"] = time.monotonic()
    except Exception as e:
        traceback.print_exc()  # the whole traceback goes to the job's log via inherited stderr
        conn.send(("failed", traceback.format_exception_only(e)[-1].strip()))
        raise SystemExit(1) from None
    conn.send(("ready", os.getpid(), steps))
    with contextlib.suppress(EOFError):  # EOF: the parent is gone, nobody wants our results
        while (msg := conn.recv()) is not None:  # None: stop
            batch_id, arrays = msg
            try:
                conn.send(("ok", batch_id, predict(arrays)))
            except Exception as e:
                conn.send(("error", batch_id, f"{type(e).__name__}: {e}"))

"""One replica process: its main loop.

The process is started by the pool in `replicas.py` (forked from its fork server, torch
already imported there); it takes the parent's environment, applies its placement (planned
in `cores.py`), loads the model once through a picklable loader, reports ready with the
times of its steps (for the start-up log), then answers batches until told to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
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


def replica_main(
    placement: Placement, loader: Loader, conn: Connection, environ: dict[str, str] | None = None
) -> None:
    """A replica process: apply the placement, load once, answer batches until told to stop.
    `environ`: the parent's environment when it started this replica (a fork server's own is
    that of the process's start), in force before anything loads."""
    # Ctrl-C reaches the whole process group; the parent decides how replicas stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    steps = _steps_so_far()
    if environ is not None and environ != os.environ:
        os.environ.clear()
        os.environ.update(environ)
    try:
        if placement.neuron_cores is not None:  # the Neuron runtime reads it when the model loads
            os.environ["NEURON_RT_VISIBLE_CORES"] = placement.neuron_cores
        if placement.cpus:
            os.sched_setaffinity(0, placement.cpus)
            import torch

            torch.set_num_threads(len(placement.cpus))
            with contextlib.suppress(RuntimeError):  # settable only before inter-op work starts
                torch.set_num_interop_threads(1)
            steps.setdefault("torch imported", time.monotonic())  # unless the fork server did
        predict = loader()
        steps["model loaded"] = time.monotonic()
    except Exception as e:
        traceback.print_exc()  # the whole traceback goes to the job's log via inherited stderr
        conn.send(("failed", traceback.format_exception_only(e)[-1].strip()))
        raise SystemExit(1) from None
    # The parent gone (killed, say): nobody wants our results, and nobody needs a traceback.
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        conn.send(("ready", os.getpid(), steps))
        while (msg := conn.recv()) is not None:  # None: stop
            batch_id, arrays = msg
            try:
                answer: tuple[str, int, object] = ("ok", batch_id, predict(arrays))
            except Exception as e:
                answer = ("error", batch_id, f"{type(e).__name__}: {e}")
            conn.send(answer)


def _steps_so_far() -> dict[str, float]:
    """When this replica's start-up steps happened (monotonic): forked from the fork server,
    the server's own steps; spawned, this process's start."""
    preload = sys.modules.get("batchjob.replica_preload")
    if preload is not None:
        steps = {"fork server started": preload.STARTED, "torch imported": preload.TORCH_IMPORTED}
        steps["fork server ready"] = preload.IMPORTED
    else:
        steps = {"process started": process_started()}
    steps["replica began"] = time.monotonic()
    return steps

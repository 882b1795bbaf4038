"""One replica process: where it runs (its placement) and its main loop.

The process is spawned by the pool in `replicas.py`; it pins itself, loads the model once
through a picklable loader, reports ready, then answers batches until told to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol

import numpy as np


class Predict(Protocol):
    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray: ...


class Loader(Protocol):  # picklable (a module-level frozen dataclass); runs in the replica
    def __call__(self) -> Predict: ...


@dataclass(frozen=True, slots=True)
class Placement:
    index: int
    cpus: tuple[int, ...]
    neuron_cores: str | None = None  # NEURON_RT_VISIBLE_CORES: "2" or "2-3"


def plan_placements(replicas: int | None, cores_per_replica: int, device: str) -> list[Placement]:
    """One placement per replica: CPU ids to pin to, and NeuronCores on Neuron devices."""
    if cores_per_replica < 1:
        raise ValueError(f"--cores-per-replica must be ≥ 1, got {cores_per_replica}")
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas must be ≥ 1, got {replicas}")
    available = sorted(os.sched_getaffinity(0))
    k = cores_per_replica
    if device == "cpu":
        m, n = len(available), replicas or max(1, len(available) // k)
        # More replicas (or cores) than CPUs wrap around: allowed, the CPUs are then shared.
        cpus = [
            tuple(dict.fromkeys(available[(i * k + j) % m] for j in range(k))) for i in range(n)
        ]
        return [Placement(i, c) for i, c in enumerate(cpus)]
    if device in ("neuron", "neuronx"):
        # How many NeuronCores are visible is only known to the runtime: default to one replica.
        return [
            Placement(i, tuple(available), f"{i * k}" if k == 1 else f"{i * k}-{i * k + k - 1}")
            for i in range(replicas or 1)
        ]
    raise ValueError(f"--device must be 'cpu' or 'neuron', got {device!r}")


def replica_main(placement: Placement, loader: Loader, conn: Connection) -> None:
    """A replica process: apply the placement, load once, answer batches until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides how replicas stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if placement.neuron_cores is not None:  # the Neuron runtime reads it when the model loads
            os.environ["NEURON_RT_VISIBLE_CORES"] = placement.neuron_cores
        if placement.cpus:
            os.sched_setaffinity(0, placement.cpus)
            import torch

            torch.set_num_threads(len(placement.cpus))
            with contextlib.suppress(RuntimeError):  # settable only before inter-op work starts
                torch.set_num_interop_threads(1)
        predict = loader()
    except Exception as e:
        traceback.print_exc()  # the whole traceback goes to the job's log via inherited stderr
        conn.send(("failed", traceback.format_exception_only(e)[-1].strip()))
        raise SystemExit(1) from None
    conn.send(("ready", os.getpid()))
    with contextlib.suppress(EOFError):  # EOF: the parent is gone, nobody wants our results
        while (msg := conn.recv()) is not None:  # None: stop
            batch_id, arrays = msg
            try:
                conn.send(("ok", batch_id, predict(arrays)))
            except Exception as e:
                conn.send(("error", batch_id, f"{type(e).__name__}: {e}"))

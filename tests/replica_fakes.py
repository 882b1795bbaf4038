"""Toy loaders for tests/test_replicas.py, importable by name in spawned replica processes."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np

from batchjob.replica_process import Predict


@dataclass(frozen=True)
class Toy:
    """Row i of the output is [sum of input_ids row i, pid of the replica].

    A batch with a "probe" array instead returns where and how the replica runs.
    """

    delay: float = 0.0  # seconds per batch
    load_delay: float = 0.0
    load_error: str | None = None  # raise RuntimeError(load_error) while loading
    die_on: int | None = None  # os._exit(3) on a batch holding this value
    raise_on: int | None = None  # raise ValueError on a batch holding this value
    slow_on: int | None = None  # sleep 60 s on a batch holding this value

    def __call__(self) -> Predict:
        time.sleep(self.load_delay)
        if self.load_error is not None:
            raise RuntimeError(self.load_error)
        return functools.partial(_predict, self)


def _predict(toy: Toy, arrays: dict[str, np.ndarray]) -> np.ndarray:
    if "probe" in arrays:
        import torch

        info = {
            "pid": os.getpid(),
            "cpus": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(),
            "neuron_cores": os.environ.get("NEURON_RT_VISIBLE_CORES"),
        }
        return np.array([info], dtype=object)
    ids = arrays["input_ids"]
    if toy.die_on is not None and (ids == toy.die_on).any():
        os._exit(3)
    if toy.raise_on is not None and (ids == toy.raise_on).any():
        raise ValueError(f"bad input {toy.raise_on}")
    time.sleep(60 if toy.slow_on is not None and (ids == toy.slow_on).any() else toy.delay)
    sums = ids.sum(axis=1, keepdims=True).astype(np.float32)
    return np.concatenate([sums, np.full_like(sums, os.getpid())], axis=1)

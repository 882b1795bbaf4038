"""Stand-ins for the model: `Toy` loaders for real replica processes (importable by name in
spawned processes), and `StandInPool`, a pool answering in-process, for engine-level tests."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from batchjob.replica_process import Predict

if TYPE_CHECKING:
    from batchjob.replicas import ReplicaPool


async def all_ready(pool: ReplicaPool, seconds: float = 30.0) -> None:
    """Wait until every replica of a started pool is ready: the pool takes batches from the
    first one ready, and a test that needs each replica to answer must wait for the others."""
    deadline = time.monotonic() + seconds
    while pool.ready_replicas < pool.size:  # polled: the pool has no event for it
        assert time.monotonic() < deadline, f"{pool.ready_replicas} of {pool.size} ready"
        await asyncio.sleep(0.01)


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
    # The replica placed on these neuron cores loads late: once the file `gate` exists (then
    # fails to, with `late_error`).
    late: str | None = None
    gate: str = ""
    late_error: str | None = None

    def __call__(self) -> Predict:
        time.sleep(self.load_delay)
        if self.load_error is not None:
            raise RuntimeError(self.load_error)
        if self.late is not None and os.environ.get("NEURON_RT_VISIBLE_CORES") == self.late:
            while not os.path.exists(self.gate):
                time.sleep(0.01)
            if self.late_error is not None:
                raise RuntimeError(self.late_error)
        return functools.partial(_predict, self)


def _predict(toy: Toy, arrays: dict[str, np.ndarray]) -> np.ndarray:
    if "probe" in arrays:
        import torch

        info = {
            "pid": os.getpid(),
            "cpus": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(),
            "neuron_cores": os.environ.get("NEURON_RT_VISIBLE_CORES"),
            "probe_env": os.environ.get("BATCHJOB_PROBE"),
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


class StandInPool:
    """Logits [sum of the record's ids / 1e4, 0, 0]: a function of the record alone. A
    packed row holds several records (segments); the graph answers one row per segment."""

    size = 1

    def __init__(
        self,
        hold: asyncio.Event | None = None,
        fail: Exception | None = None,
        defer: bool = False,
    ) -> None:
        self.hold, self.fail, self.defer = hold, fail, defer
        self.batches: list[dict[str, np.ndarray]] = []
        self.submitting = 0
        self.running: list[tuple[asyncio.Future[np.ndarray], np.ndarray]] = []  # when deferred

    async def submit(self, arrays: dict[str, np.ndarray]) -> asyncio.Future[np.ndarray]:
        self.submitting += 1
        if self.hold is not None:
            await self.hold.wait()  # as a pool whose replicas are all busy
        self.submitting -= 1
        self.batches.append(arrays)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        if self.fail is not None:
            future.set_exception(self.fail)
        else:
            sums = self.record_sums(arrays) / 1e4
            outputs = np.stack([sums, 0 * sums, 0 * sums], axis=1).astype(np.float32)
            if self.defer:  # the batch runs until finish() is called
                self.running.append((future, outputs))
            else:
                future.set_result(outputs)
        return future

    def finish(self) -> None:
        for future, outputs in self.running:
            future.set_result(outputs)
        self.running.clear()

    @staticmethod
    def record_sums(arrays: dict[str, np.ndarray]) -> np.ndarray:
        ids = arrays["input_ids"]
        if "segment_ids" not in arrays:
            return ids.sum(axis=1)
        segments, slots = arrays["segment_ids"], arrays["segment_index"].shape[1]
        return np.array([[ids[r][segments[r] == j + 1].sum() for j in range(slots)]
                         for r in range(len(ids))]).reshape(-1)  # fmt: skip

    def valid_rows(self) -> list[int]:
        """Records per batch (a padding row attends to one token only)."""
        counts = []
        for b in self.batches:
            if "segment_ids" in b:
                counts.append(sum(len(set(row[row > 0].tolist())) for row in b["segment_ids"]))
            else:
                counts.append(int((b["attention_mask"].sum(axis=1) > 1).sum()))
        return counts

"""The bench's measurements, one function per row; all timing with time.perf_counter."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_TICK = os.sysconf("SC_CLK_TCK")


# -- where a process tree's time goes (from /proc, sampled) -----------------------------------


def _sched(pid: int) -> tuple[float, float] | None:
    """Seconds `pid`'s threads have run on a CPU, and waited runnable for one (preempted)."""
    run = wait = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                fields = f.read().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    return run / 1e9, wait / 1e9


def _children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _replicas(root: int) -> list[int]:
    """The replica processes under `root`: children of its replicas' fork server (batchjob's
    way), or spawned children."""
    found = []
    for child in _children(root):
        cmdline = _cmdline(child)
        if b"multiprocessing.forkserver" in cmdline:
            found += _children(child)
        elif b"multiprocessing-fork" in cmdline and b"resource_tracker" not in cmdline:
            found.append(child)
    return found


def cpu_snapshot(root: int) -> dict[str, Any]:
    """(run, wait) seconds so far of `root` and of each replica under it."""
    replicas = {c: _sched(c) for c in _replicas(root)}
    return {"main": _sched(root), "replicas": {k: v for k, v in replicas.items() if v}}


def _descendants_cpu(root: int) -> float:
    """CPU seconds of the live processes under `root`, with the children each has reaped
    (utime, stime, cutime, cstime): the replicas' fork server outlives its pool, so its
    children's time never reaches this process's RUSAGE_CHILDREN."""
    total, todo = 0.0, _children(root)
    while todo:
        pid = todo.pop()
        todo += _children(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
            total += sum(int(v) for v in fields[11:15]) / _TICK
        except (OSError, ValueError):
            continue
    return total


@dataclass(frozen=True)
class CpuUse:
    """Where the replicas' time went over an interval: computing, preempted, or idle."""

    main: float  # seconds the dispatching process ran
    replicas: list[float]  # seconds each replica ran on a CPU
    preempted: list[float]  # seconds each replica was runnable but waited for a CPU
    seconds: float  # the interval

    def _share(self, values: list[float]) -> float:
        return sum(values) / max(len(values) * self.seconds, 1e-9)

    @property
    def replica_busy(self) -> float:
        return self._share(self.replicas)

    @property
    def replica_preempted(self) -> float:
        return self._share(self.preempted)

    @property
    def replica_idle(self) -> float:
        """Neither running nor runnable: waiting for work."""
        return max(0.0, 1.0 - self.replica_busy - self.replica_preempted)

    @property
    def main_busy(self) -> float:
        return self.main / max(self.seconds, 1e-9)


def cpu_use(start: dict[str, Any], end: dict[str, Any], seconds: float) -> CpuUse | None:
    pids = [p for p in start["replicas"] if p in end["replicas"]]
    if start["main"] is None or end["main"] is None or not pids:
        return None
    run = [end["replicas"][p][0] - start["replicas"][p][0] for p in pids]
    wait = [end["replicas"][p][1] - start["replicas"][p][1] for p in pids]
    return CpuUse(end["main"][0] - start["main"][0], run, wait, seconds)


class OtherLoad:
    """How much of the machine other processes used while a row ran (a context manager).

    The machine's busy CPU time (/proc/stat) minus this process's and its descendants'
    (getrusage for those waited for, /proc for the live ones), as a share of all cores over
    the interval: 0 on a quiet machine.
    """

    def __enter__(self) -> OtherLoad:
        self._start = self._snapshot()
        self.share = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        (b0, o0, t0), (b1, o1, t1) = self._start, self._snapshot()
        cores = len(os.sched_getaffinity(0))
        self.share = max(0.0, (b1 - b0) - (o1 - o0)) / max((t1 - t0) * cores, 1e-9)

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        with open("/proc/stat", encoding="ascii") as f:
            # cpu  user nice system idle iowait irq softirq steal ...
            user, nice, system, _, _, irq, softirq = map(int, f.readline().split()[1:8])
        busy = (user + nice + system + irq + softirq) / _TICK
        own = _descendants_cpu(os.getpid()) + sum(
            r.ru_utime + r.ru_stime
            for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        )
        return busy, own, time.perf_counter()


# -- (b) and the reference: `batchjob run` end to end ----------------------------------------


@dataclass(frozen=True)
class RunResult:
    documents: int
    real_tokens: int
    compiled_tokens: int
    batches: int
    pipeline_seconds: float  # the manifest's: replicas ready → last shard committed
    wall_seconds: float  # the whole subprocess, start-up included
    cpu: CpuUse | None  # from the pool-ready log line to exit, over pipeline_seconds


def batchjob_run(
    artifact: Path, input_dir: Path, output_dir: Path, flags: list[str] | None = None
) -> RunResult:
    command = [sys.executable, "-m", "batchjob", "run", "--model", str(artifact)]
    command += ["--input", str(input_dir), "--output", str(output_dir), "--progress", "none"]
    command += flags or []
    log: list[str] = []
    marks: dict[str, Any] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "replica pool ready" in line and "ready" not in marks:
                marks["ready"] = cpu_snapshot(proc.pid)
            log.append(line)

    def sample() -> None:  # the last CPU time seen of each process of the tree
        last: dict[str, Any] = {"main": None, "replicas": {}}
        while proc.poll() is None:
            snapshot = cpu_snapshot(proc.pid)
            if snapshot["main"] is not None:
                last["main"] = snapshot["main"]
            last["replicas"] |= snapshot["replicas"]  # replicas exit before the main process
            marks["last"] = last
            time.sleep(0.1)

    threads = [threading.Thread(target=f, daemon=True) for f in (read_log, sample)]
    for t in threads:
        t.start()
    proc.wait()
    wall = time.perf_counter() - started
    for t in threads:
        t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{''.join(log[-30:])}")
    manifest = json.loads((output_dir / "_manifest.json").read_text())
    counts, timings = manifest["counts"], manifest["timings"]
    cpu = None
    if "ready" in marks and "last" in marks:
        cpu = cpu_use(marks["ready"], marks["last"], timings["pipeline_seconds"])
    return RunResult(
        documents=counts["documents"],
        real_tokens=counts["real_tokens"],
        compiled_tokens=counts["compiled_tokens"],
        batches=counts["batches"],
        pipeline_seconds=timings["pipeline_seconds"],
        wall_seconds=wall,
        cpu=cpu,
    )


# -- (c) the model alone: the same batches through a ReplicaPool ------------------------------


@dataclass(frozen=True)
class PoolResult:
    documents: int
    real_tokens: int
    compiled_tokens: int
    batches: int
    shapes: dict[str, int]  # "BxS" → batches of that shape
    seconds: list[float]  # per pass: after start() to the last result
    cpu: list[CpuUse | None]


def run_batches(artifact_path: Path, ids: list[str], texts: list[str]) -> tuple[Any, list[Any]]:
    """The artifact, and the texts as `batchjob run` batches them for it: tokenized, then
    BucketBatcher(artifact.shapes, sort_window=4096) for a bucket artifact, the packing
    batcher for a packed one."""
    from batchjob.artifact import load_artifact
    from batchjob.batching import Item, make_batcher
    from batchjob.records import Record
    from batchjob.tokens import RecordTokenizer

    artifact = load_artifact(str(artifact_path))
    tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
    encoded = tokenizer.encode([Record(i, t) for i, t in zip(ids, texts, strict=True)])
    batcher = make_batcher(
        artifact.strategy,
        artifact.shapes,
        max_segments=artifact.max_segments,
        position_offset=artifact.position_offset,
        sort_window=4096,
        pad_id=tokenizer.pad_id,
    )
    items = [Item(i, e.ids, e.type_ids) for i, e in enumerate(encoded) if e is not None]
    return artifact, batcher.add(items) + batcher.flush()


def model_alone(
    artifact_path: Path, ids: list[str], texts: list[str], passes: int, loader: Any = None
) -> PoolResult:
    """The artifact's graphs alone through a ReplicaPool, one replica a core; `loader`: the
    replicas' loader (default: the artifact's ArtifactLoader)."""
    from batchjob.artifact import ArtifactLoader

    artifact, batches = run_batches(artifact_path, ids, texts)
    shapes: dict[str, int] = {}
    for b in batches:
        key = f"{b.shape.batch_size}x{b.shape.seq_len}"
        shapes[key] = shapes.get(key, 0) + 1
    seconds, cpu = asyncio.run(_time_pool(loader or ArtifactLoader(artifact.path), batches, passes))
    return PoolResult(
        documents=sum(len(b) for b in batches),
        real_tokens=sum(b.real_tokens for b in batches),
        compiled_tokens=sum(b.shape.batch_size * b.shape.seq_len for b in batches),
        batches=len(batches),
        shapes=shapes,
        seconds=seconds,
        cpu=cpu,
    )


async def _time_pool(
    loader: Any, batches: list[Any], passes: int
) -> tuple[list[float], list[CpuUse | None]]:
    from batchjob.replica_process import plan_placements
    from batchjob.replicas import ReplicaPool

    seconds, cpu = [], []
    async with ReplicaPool(loader, plan_placements(None, 1, "cpu")) as pool:
        for _ in range(passes):
            before = cpu_snapshot(os.getpid())
            started = time.perf_counter()
            # submit() returns once a replica has a free slot: the loop keeps every replica fed.
            futures = [await pool.submit(b.arrays) for b in batches]
            outputs = await asyncio.gather(*futures)
            seconds.append(time.perf_counter() - started)
            cpu.append(cpu_use(before, cpu_snapshot(os.getpid()), seconds[-1]))
            # One output row per batch row (buckets) or per segment slot (packing).
            for out, batch in zip(outputs, batches, strict=True):
                if len(out) != len(batch.keys):
                    raise AssertionError(f"{len(out)} outputs for {len(batch.keys)} keys")
    return seconds, cpu


# -- (d) the FLOPs the ideal counts --------------------------------------------------------


def encoder_flops(config: dict[str, Any], lengths: np.ndarray) -> float:
    """FLOPs to classify documents of these token lengths: linear layers, attention, head.

    Per token, 2 × the layers' linear weights (Q, K, V, output: 4·h²; FFN: 2·h·ffn);
    per layer and document of L tokens, attention 4·L²·h (QKᵀ and AV); per document the
    pooler (2·h²) and the classifier (2·h·labels). Embeddings, norms, softmax: not counted.
    """
    h, ffn = config["hidden_size"], config["intermediate_size"]
    layers, labels = config["num_hidden_layers"], len(config.get("id2label", {0: 0, 1: 1}))
    lengths = lengths.astype(np.float64)
    per_token = 2 * layers * (4 * h * h + 2 * h * ffn)
    attention = layers * 4 * h * lengths**2
    head = 2 * h * h + 2 * h * labels
    return float(np.sum(per_token * lengths + attention + head))

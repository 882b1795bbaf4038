"""(d)'s rate: the best matmul rate this machine reaches at the model's layer shapes, in the
bench's dtype (fixtures.bench_dtype: bf16 where the CPU has it natively, else fp32).

The strictest honest ideal: every linear layer shape of the encoder ((M×h)@(h×h),
(M×h)@(h×ffn), (M×ffn)@(ffn×h)) at M = 1,024 and 2,048 rows (larger M is slower here,
not faster), each measured two ways: one process using every core's thread, and one pinned
1-thread process per core at once (their rates summed). The ideal rate is the maximum over
all of them and over the rounds sampled during the bench: other load only ever slows a
sample down, so the best one is the machine's.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any

ROWS = (1024, 2048)
THREADS, PER_CORE = "one process, every thread", "a pinned 1-thread process per core"


@dataclass(frozen=True)
class MatmulSample:
    mode: str  # THREADS or PER_CORE
    m: int
    k: int
    n: int
    flops_per_s: float  # wall clock, summed over the processes
    per_cpu_second: float  # FLOPs per CPU-second of one core (mean over the processes)

    @property
    def shape(self) -> str:
        return f"({self.m}x{self.k})@({self.k}x{self.n})"


def layer_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(K, N) of the encoder's linear layers: Q/K/V/output, FFN in, FFN out."""
    h, ffn = int(config["hidden_size"]), int(config["intermediate_size"])
    return list(dict.fromkeys([(h, h), (h, ffn), (ffn, h)]))


def _worker(
    dtype: str,
    cpu: int | None,
    threads: int,
    shapes: list[tuple[int, int, int]],
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import torch

    torch.set_num_threads(threads)
    rates = []
    for m, k, n in shapes:
        kind = torch.bfloat16 if dtype == "bf16" else torch.float32
        a = torch.randn(m, k).to(kind)
        b = torch.randn(k, n).to(kind)
        out = torch.empty(m, n, dtype=kind)
        for _ in range(3):
            torch.mm(a, b, out=out)
        flops = 2 * m * k * n
        if barrier is not None:
            barrier.wait()  # every process times the same shape at the same moment
        count, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - started) < seconds:
            torch.mm(a, b, out=out)
            count += 1
        cpu_seconds = (time.process_time() - cpu_started) / threads
        rates.append((flops * count / elapsed, flops * count / threads / max(cpu_seconds, 1e-9)))
    results.put(rates)


def _run(
    dtype: str,
    cpus: list[int | None],
    threads: int,
    shapes: list[tuple[int, int, int]],
    seconds: float,
) -> list[list[tuple[float, float]]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(cpus)) if len(cpus) > 1 else None
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(dtype, c, threads, shapes, seconds, barrier, results))
        for c in cpus
    ]
    for p in procs:
        p.start()
    timeout = 120 + len(shapes) * seconds * 2
    found = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join()
    return found


def sample(config: dict[str, Any], seconds: float, dtype: str) -> list[MatmulSample]:
    """One round: every layer shape at every M, per core and with every thread."""
    shapes = [(m, k, n) for m in ROWS for k, n in layer_shapes(config)]
    cores = sorted(os.sched_getaffinity(0))
    found = []
    per_core = _run(dtype, list(cores), 1, shapes, seconds)
    for i, (m, k, n) in enumerate(shapes):
        wall = sum(p[i][0] for p in per_core)
        cpu = sum(p[i][1] for p in per_core) / len(per_core)
        found.append(MatmulSample(PER_CORE, m, k, n, wall, cpu))
    (threaded,) = _run(dtype, [None], len(cores), shapes, seconds)
    for (m, k, n), (wall, cpu) in zip(shapes, threaded, strict=True):
        found.append(MatmulSample(THREADS, m, k, n, wall, cpu))
    return found


def best(samples: list[MatmulSample]) -> MatmulSample:
    """The ideal's rate: the fastest sample of any shape, M, mode and round."""
    return max(samples, key=lambda s: s.flops_per_s)


def best_per_cpu_second(samples: list[MatmulSample]) -> float:
    """The most FLOPs one core's CPU-second gave (what `quiet` estimates compare with)."""
    return max(s.per_cpu_second for s in samples)


def summary(samples: list[MatmulSample]) -> list[str]:
    """Per mode and shape, the best round, as table lines (GFLOP/s)."""
    lines = []
    keys = dict.fromkeys((s.mode, s.m, s.k, s.n) for s in samples)
    for mode, m, k, n in keys:
        mine = [s for s in samples if (s.mode, s.m, s.k, s.n) == (mode, m, k, n)]
        top = max(s.flops_per_s for s in mine) / 1e9
        low = min(s.flops_per_s for s in mine) / 1e9
        lines.append(
            f"  {mode:<36} ({m}x{k})@({k}x{n}): best {top:5.0f}, worst {low:5.0f} "
            f"of {len(mine)} rounds"
        )
    return lines

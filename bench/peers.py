"""The peers `batchjob run` is compared with: transformers' pipeline at its best batch size,
and Ray Data's `map_batches` over an actor pool of pipelines (end to end, start-up included)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fixtures

RAY_ROW = Path(__file__).resolve().parent / "ray_row.py"


class HfPipeline:
    """transformers' `pipeline("text-classification")` in the bench's dtype on `threads`
    threads."""

    CHUNK = 48  # documents per call at least: the time budget is checked between calls

    def __init__(self, model: Path, threads: int, max_length: int) -> None:
        import torch
        from transformers import pipeline

        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.pipe = pipeline(
            "text-classification",
            model=str(model),
            dtype=fixtures.bench_torch_dtype(),
            device="cpu",
        )
        self.load_seconds = time.perf_counter() - started
        self.options = {"truncation": True, "max_length": max_length}

    def time(self, texts: list[str], batch_size: int, budget: float) -> tuple[int, float]:
        """(documents, seconds): the first documents of `texts`, in order, classified until
        all are done or `budget` seconds have passed (a busy machine slows a multi-threaded
        eager model down many times)."""
        self.pipe(texts[: max(16, batch_size)], batch_size=batch_size, **self.options)  # warm-up
        chunk_size = max(self.CHUNK, batch_size)
        done, started = 0, time.perf_counter()
        while done < len(texts) and time.perf_counter() - started < budget:
            chunk = texts[done : done + chunk_size]
            out = self.pipe(chunk, batch_size=batch_size, **self.options)
            assert len(out) == len(chunk), (len(out), len(chunk))
            done += len(chunk)
        return done, time.perf_counter() - started


@dataclass(frozen=True)
class RayResult:
    documents: int
    batch_size: int
    actors: int
    seconds: float  # the subprocess, interpreter start to exit: what a user waits for
    ray_init_seconds: float  # interpreter start → ray.init returned
    pipeline_seconds: float  # ray.init returned → Parquet written (actor start-up included)


def ray_data(
    model: Path,
    input_dir: Path,
    output_dir: Path,
    actors: int,
    batch_size: int,
    max_length: int,
    *,
    predictor: Path | None = None,
    block: int | None = None,
) -> RayResult:
    """bench/ray_row.py in a subprocess, timed from its start to its exit: the pipeline's
    row, or with `predictor` (an artifact) batchjob's Predictor's. `block`: documents per
    map_batches call (ray_row.py's default unless given)."""
    result = output_dir.with_suffix(".json")
    chosen = ["--model", str(model)] if predictor is None else ["--predictor", str(predictor)]
    command = [sys.executable, str(RAY_ROW), *chosen, "--input", str(input_dir)]
    command += ["--output", str(output_dir), "--actors", str(actors), "--result", str(result)]
    command += ["--batch-size", str(batch_size), "--max-length", str(max_length)]
    command += ["--dtype", fixtures.bench_dtype()]
    if block is not None:
        command += ["--block", str(block)]
    started = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    data = json.loads(result.read_text())
    return RayResult(
        documents=data["documents"],
        batch_size=batch_size,
        actors=actors,
        seconds=seconds,
        ray_init_seconds=data["ray_init_seconds"],
        pipeline_seconds=data["pipeline_seconds"],
    )

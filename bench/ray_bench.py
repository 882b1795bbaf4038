"""`make bench`'s Ray Data row: `batchjob.ray.Predictor` in `map_batches` against the
transformers pipeline in a `map_batches` class (bench.py's Ray Data peer), on the same
documents, in the same run, alternately.

Both rows are bench/ray_row.py in a process of its own, timed from its start to its exit
(ray.init, the actors' start-up, reading the jsonl shards, writing Parquet: all included):
2 actors of 0.9 CPU each (one torch thread), the bench's bert-base classifier in bf16. The
pipeline runs at its batch size (`--batch-size`, 1: the best of bench.py's (a) on these
machines), 64 documents per `map_batches` call; the Predictor runs the bench's default
artifact (packing, 8×128), `--block` documents per call. `batchjob run` over the same
artifact and documents is shown for reference (wall time, start-up included; no target).

    .venv/bin/python bench/ray_bench.py [--docs 2400] [--repeats 1] [--block 300]

Target: Predictor ≥ 1.8 × the pipeline, in documents per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fixtures
import measure
import peers

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.8
SHARDS = 4
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=2400, help="documents (2400, as bench.py)")
    p.add_argument("--actors", type=int, default=2, help="actors in each row (2)")
    p.add_argument("--batch-size", type=int, default=1, help="the pipeline's batch size (1)")
    p.add_argument("--block", type=int, default=300, help="Predictor's documents a call (300)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each row, alternately (1)")
    return p.parse_args(argv)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    say(f"machine: {len(os.sched_getaffinity(0))} cores, {fixtures.cpu_family()}")
    root = fixtures.cache_root(REPO)
    model = fixtures.ensure_model(root)
    artifact, _ = fixtures.ensure_artifact(root, model, "default", [])
    corpus = fixtures.make_corpus(args.docs)
    pipeline: list[peers.RayResult] = []
    predictor: list[peers.RayResult] = []
    runs: list[measure.RunResult] = []  # for reference: the same artifact without Ray
    with tempfile.TemporaryDirectory(prefix="batchjob-ray-bench-") as tmp:
        inputs = Path(tmp) / "corpus"
        corpus.write(inputs, SHARDS)
        shape = (args.actors, args.batch_size, fixtures.MAX_LENGTH)
        for i in range(args.repeats):
            pipeline.append(peers.ray_data(model, inputs, Path(tmp) / f"peer{i}", *shape))
            say(f"pipeline: {pipeline[-1].documents} docs in {pipeline[-1].seconds:.1f}s")
            out = Path(tmp) / f"predictor{i}"
            ours = peers.ray_data(model, inputs, out, *shape, predictor=artifact, block=args.block)
            predictor.append(ours)
            say(f"Predictor: {ours.documents} docs in {ours.seconds:.1f}s")
            runs.append(measure.batchjob_run(artifact, inputs, Path(tmp) / f"run{i}"))
            say(f"batchjob run: {runs[-1].documents} docs in {runs[-1].wall_seconds:.1f}s")
    for rows in (pipeline, predictor):
        assert all(r.documents == args.docs for r in rows), [r.documents for r in rows]
    print()
    print(f"Ray Data, {args.docs} docs, {args.actors} actors; {fixtures.cpu_family()}")
    header = f"{'row':<58} {'seconds':>7} {'docs/s':>7}  start-up, then"
    print(header)
    print("-" * len(header))
    rates = []
    for label, rows in (
        (f"transformers pipeline in map_batches, batch {args.batch_size}, 64 a call", pipeline),
        (f"batchjob.ray.Predictor, packing 8x128, {args.block} a call", predictor),
    ):
        seconds = statistics.median(r.seconds for r in rows)
        rates.append(args.docs / seconds)
        init = statistics.median(r.ray_init_seconds for r in rows)
        after = statistics.median(r.pipeline_seconds for r in rows)
        print(
            f"{label:<58} {seconds:>7.1f} {rates[-1]:>7.1f}  ray.init {init:.1f}s, "
            f"then {after:.1f}s to Parquet"
        )
    wall = statistics.median(r.wall_seconds for r in runs)
    inner = statistics.median(r.pipeline_seconds for r in runs)
    label = "(reference) batchjob run, same artifact, 2 replicas"
    print(
        f"{label:<58} {wall:>7.1f} {args.docs / wall:>7.1f}  process start to exit; "
        f"pipeline_seconds {inner:.1f}"
    )
    ratio = rates[1] / rates[0]
    passed = ratio >= TARGET
    verdict = "PASS" if passed else "MISS"
    print(f"\ntarget: Predictor >= {TARGET:g} x pipeline: {ratio:.2f} x  {verdict}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The Ray Data rows, each run as its own process so that its start-up is part of its time:
`ray.init` with local resources only (no dashboard), the corpus's jsonl shards read with
`ray.data.read_json`, a pool of actors fed by `map_batches`, the labels written as Parquet.
Each actor holds either a tokenizer and the model (transformers' `pipeline` in the bench's
dtype, one torch thread: the peer), or, with `--predictor ARTIFACT`, `batchjob.ray.Predictor`
over the compiled artifact (one replica, one torch thread).

    python bench/ray_row.py --model DIR --input DIR --output DIR --actors 2 --batch-size 8
    python bench/ray_row.py --predictor ARTIFACT --input DIR --output DIR --actors 2 --block 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

STARTED = time.perf_counter()


class Classifier:
    """One actor: the pipeline loaded once, then called per batch of documents."""

    def __init__(self, model: str, batch_size: int, max_length: int, dtype: str) -> None:
        import torch
        from transformers import pipeline

        torch.set_num_threads(1)  # one actor per CPU
        kind = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.pipe = pipeline("text-classification", model=model, dtype=kind)
        self.options = {"batch_size": batch_size, "truncation": True, "max_length": max_length}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.pipe(list(batch["text"]), **self.options)
        return {
            "id": batch["id"],
            "label": [o["label"] for o in out],
            "score": [float(o["score"]) for o in out],
        }


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", help="the model directory (the pipeline's row)")
    p.add_argument("--predictor", help="a compiled artifact: batchjob.ray.Predictor's row")
    p.add_argument("--input", required=True, help="a directory of jsonl shards")
    p.add_argument("--output", required=True)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="the pipeline's batch size")
    p.add_argument("--block", type=int, default=64, help="documents per map_batches call")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the pipeline's")
    p.add_argument("--result", required=True, help="write the timings here as JSON")
    args = p.parse_args()
    if (args.model is None) == (args.predictor is None):
        p.error("give --model (the pipeline) or --predictor (batchjob's Predictor)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    import ray

    ray.init(
        num_cpus=len(os.sched_getaffinity(0)),  # this machine's cores, nothing remote
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    ready = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    paths = sorted(os.path.join(args.input, f) for f in os.listdir(args.input))
    # Each actor holds 0.9 of a CPU so that Ray's read and write tasks (0.05 each) can be
    # scheduled beside the pool: with whole CPUs they would wait for an actor to finish.
    read = ray.data.read_json(paths, ray_remote_args={"num_cpus": 0.05})
    if args.predictor is None:
        dataset = read.map_batches(
            Classifier,
            fn_constructor_args=(args.model, args.batch_size, args.max_length, args.dtype),
            batch_size=args.block,
            concurrency=args.actors,
            num_cpus=0.9,
        )
    else:
        from batchjob.ray import Predictor

        # The same actors (0.9 of a CPU each: one torch thread); Arrow batches in and out.
        dataset = read.map_batches(
            Predictor,
            fn_constructor_kwargs={"model": args.predictor},
            batch_format="pyarrow",
            batch_size=args.block,
            concurrency=args.actors,
            num_cpus=0.9,
        )
    dataset.write_parquet(args.output, ray_remote_args={"num_cpus": 0.05})
    done = time.perf_counter()
    import pyarrow.parquet as pq

    documents = sum(
        pq.read_metadata(os.path.join(d, f)).num_rows
        for d, _, files in os.walk(args.output)
        for f in files
        if f.endswith(".parquet")
    )
    ray.shutdown()
    result = {
        "documents": documents,
        "ray_init_seconds": ready - STARTED,
        "pipeline_seconds": done - ready,
        "seconds": time.perf_counter() - STARTED,
    }
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: `batchjob run` against Hugging Face's pipeline, the bare model, and the hardware.

One run on this machine, one table (BENCHMARKS.md explains every row):

  (a)  transformers `pipeline("text-classification")` in bf16 on all cores, best batch size
  ray  Ray Data `map_batches` over an actor pool of the same pipeline, start-up included
  (b)  `batchjob run` end to end (files in, Parquet out), default configuration
  (c)  the model alone: the same batches through a ReplicaPool, no I/O
  (d)  the ideal: the corpus's real-token FLOPs ÷ the best bf16 matmul rate this machine
       reaches at the model's layer shapes in this run (bench/ideal.py)
  ref  `batchjob run` with the classic single padded shape 6×128

The machine is shared and noisy, so every row is also given as a fraction of (d), the
matmul rate being sampled between the rows, and the targets compare rows of this run only.
A row's fraction of (d) is the ideal time of *its own* documents ÷ its time, so a row timed
on a subset of the corpus compares fairly. `others` is the share of the machine that other
processes used while the row ran; `quiet` estimates the row's fraction of (d) without them,
from the replicas' scheduler statistics (their time preempted removed, the matmul rate
taken per CPU-second).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import measure
import peers
from context import MAX_LENGTH, SHARDS, Bench, HfTiming, Results, say
from report import build_rows, describe_corpus, report

HF_BATCH_SIZES = (1, 8, 32, 64)
HF_BUDGET = 20.0  # seconds per batch size at most
# As `make bench` has the first three (the Makefile exports them), also when run directly.
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=2400, help="documents in the corpus (2400)")
    p.add_argument("--hf-docs", type=int, default=600, help="(a) is timed on the first N (600)")
    p.add_argument("--ref-shards", type=int, default=1, help="shards the 6x128 row reads (1)")
    p.add_argument("--repeats", type=int, default=2, help="runs of (b); the median counts (2)")
    p.add_argument("--passes", type=int, default=2, help="passes of (c); the median counts (2)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="an extra end-to-end row compiled with these flags, written with '=', e.g. "
        "--variant='--no-packing --buckets 16,32,64,128 --max-batch-tokens 2048' (repeatable)",
    )
    p.add_argument("--ray-actors", type=int, default=2, help="Ray Data's actor pool (2)")
    p.add_argument("--no-ray", action="store_true", help="leave out the Ray Data row")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo = f.read().splitlines()

    def field(name: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith(name)), "?")

    model = field("model name")
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo if ln.startswith("flags")), [])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        # Zen 4 is family 25, Zen 5 family 26: their bf16 matmul rates differ 2x.
        "cpu_family": field("cpu family"),
        "cpu_model": field("model\t"),
        "avx512_bf16": "avx512_bf16" in flags,
        "python": platform.python_version(),
        "versions": {
            p: metadata.version(p) for p in ("torch", "transformers", "tokenizers", "batchjob")
        },
        "loadavg_start": os.getloadavg()[0],
    }


def measure_all(bench: Bench, tmpdir: Path) -> Results:
    args, corpus, out = bench.args, bench.corpus, Results()
    corpus_dir, ref_dir = tmpdir / "corpus", tmpdir / "corpus-ref"
    corpus.write(corpus_dir, SHARDS)
    ref_dir.mkdir()
    for i in range(min(args.ref_shards, SHARDS)):
        os.symlink(corpus_dir / f"part-{i}.jsonl", ref_dir / f"part-{i}.jsonl")
    bench.matmul(rounds=1)

    texts = corpus.texts[: args.hf_docs]
    hf = peers.HfPipeline(bench.model, bench.cores, MAX_LENGTH)
    out.hf_load_seconds = hf.load_seconds

    def time_hf(batch_size: int) -> None:
        with measure.OtherLoad() as others:
            documents, seconds = hf.time(texts, batch_size, HF_BUDGET)
        out.hf.append(HfTiming(batch_size, documents, seconds, others.share))
        say(
            f"(a) batch {batch_size}: {documents} docs in {seconds:.1f}s, others {others.share:.0%}"
        )

    for batch_size in HF_BATCH_SIZES:
        time_hf(batch_size)
    bench.matmul(rounds=1)

    # (b) before and after (c), so that drifting load hits both alike.
    out.runs.append(bench.run("default", corpus_dir, tmpdir / "b0"))
    with measure.OtherLoad() as others:
        out.pool = measure.model_alone(
            bench.artifacts["default"], corpus.ids, corpus.texts, args.passes
        )
    out.pool_others = others.share
    say(f"(c) {', '.join(f'{s:.1f}s' for s in out.pool.seconds)}, others {others.share:.0%}")
    out.runs += [bench.run("default", corpus_dir, tmpdir / f"b{i}") for i in range(1, args.repeats)]
    bench.matmul(rounds=1)
    out.ref = bench.run("classic", ref_dir, tmpdir / "ref")
    for name in bench.flags:
        if name.startswith("variant"):
            out.variants[name] = bench.run(name, corpus_dir, tmpdir / name)
    # The baseline's best batch size once more: the best timing counts, so that a burst of
    # other load during one timing doesn't make the baseline look slow.
    best = max(out.hf, key=lambda t: t.rate).batch_size
    time_hf(best)
    if not args.no_ray:
        # No `others` here: Ray's own daemons are not this process's waited-for children.
        ray = peers.ray_data(
            bench.model, corpus_dir, tmpdir / "ray", args.ray_actors, best, MAX_LENGTH
        )
        out.ray = ray
        say(
            f"ray: {ray.documents} docs in {ray.seconds:.1f}s (ray.init {ray.ray_init_seconds:.1f}"
            f"s, then {ray.pipeline_seconds:.1f}s)"
        )
    bench.matmul(rounds=1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_ray and importlib.util.find_spec("ray") is None:
        print(
            "bench.py: the Ray Data row needs ray: pip install -c constraints.txt -e '.[bench]' "
            "(or pass --no-ray)",
            file=sys.stderr,
        )
        return 2
    for name, value in ENVIRONMENT.items():  # before transformers is imported
        os.environ.setdefault(name, value)
    started = time.perf_counter()
    info = machine()
    say(
        f"machine: {info['nproc']} cores, {info['cpu']} (cpu family {info['cpu_family']}, model "
        f"{info['cpu_model']}), torch {info['versions']['torch']}"
    )
    bench = Bench(args, info["nproc"])
    stats = describe_corpus(bench.corpus, bench.real)
    say(
        f"corpus: {stats['documents']} docs; tokens per doc (real tokenizer, specials "
        f"included): p50 {stats['p50']:.0f}, p90 {stats['p90']:.0f}, p99 {stats['p99']:.0f}, "
        f"mean {stats['mean']:.1f}, over {MAX_LENGTH}: {stats['over_max_length']:.1%}; "
        f"{stats['real_tokens']} real tokens after truncation to {MAX_LENGTH}"
    )
    with tempfile.TemporaryDirectory(prefix="batchjob-bench-") as tmp:
        results = measure_all(bench, Path(tmp))
    rows = build_rows(bench, results)
    data = report(bench, results, rows, info)
    print(
        f"load average (1 min): {info['loadavg_start']:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end; the bench took {time.perf_counter() - started:.0f}s"
    )
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every row of the bench shares: the fixtures, the compiled artifacts (resolved once,
so that every row runs the same ones), the matmul rate (the bench's dtype) sampled between
the rows, and the results as they come in."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import fixtures
import ideal
import measure
import peers

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = fixtures.MAX_LENGTH  # the model's length: the default shape's, and (a)'s truncation
SHARDS = 4
CLASSIC = ["--batch-size", "6", "--sequence-length", "128", "--no-packing"]
MATMUL_SECONDS = 0.75  # per layer shape, M and mode: 12 samples a round


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def describe_artifact(path: Path) -> str:
    data = json.loads((path / "batchjob.json").read_text())
    shapes = ", ".join(f"{s['batch_size']}x{s['seq_len']}" for s in data["shapes"])
    strategy = data.get("strategy", "buckets")
    if strategy == "packing":
        return f"packing, {shapes} (BxS), up to {data.get('max_segments')} docs a row"
    return f"{strategy}, {shapes} (BxS)"


@dataclass(frozen=True)
class HfTiming:
    batch_size: int
    documents: int
    seconds: float
    others: float

    @property
    def rate(self) -> float:
        return self.documents / self.seconds


@dataclass
class Results:
    hf: list[HfTiming] = field(default_factory=list)
    hf_load_seconds: float = 0.0
    runs: list[tuple[measure.RunResult, float]] = field(default_factory=list)  # (b), others
    pool: measure.PoolResult | None = None
    pool_others: float = 0.0
    ref: tuple[measure.RunResult, float] | None = None
    ray: peers.RayResult | None = None  # the Ray Data peer
    variants: dict[str, tuple[measure.RunResult, float]] = field(default_factory=dict)


class Bench:
    """The fixtures, the artifacts, and the matmul rate sampled between the rows."""

    def __init__(self, args: argparse.Namespace, cores: int) -> None:
        self.args, self.cores = args, cores
        self.root = fixtures.cache_root(REPO)
        self.model = fixtures.ensure_model(self.root)
        self.config = json.loads((self.model / "config.json").read_text())
        self.corpus = fixtures.make_corpus(args.docs)
        self.real = self.corpus.real_tokens(MAX_LENGTH)  # tokens each document runs with
        self.flags = {"default": [], "classic": CLASSIC}
        self.flags |= {f"variant{i}": shlex.split(v) for i, v in enumerate(args.variant, 1)}
        self.artifacts: dict[str, Path] = {}
        for name, flags in self.flags.items():
            started = time.perf_counter()
            path, fresh = fixtures.ensure_artifact(self.root, self.model, name, flags)
            took = f"compiled in {time.perf_counter() - started:.0f}s" if fresh else "cached"
            shown = " ".join(flags) or "no flags"
            say(f"artifact {name} ({shown}): {describe_artifact(path)}; {took}: {path}")
            self.artifacts[name] = path
        self.samples: list[ideal.MatmulSample] = []  # matmul rates, every round

    def matmul(self, rounds: int) -> None:
        for _ in range(rounds):
            found = ideal.sample(self.config, MATMUL_SECONDS, fixtures.bench_dtype())
            self.samples += found
            top = ideal.best(found)
            say(
                f"(d) {fixtures.bench_dtype()} matmul: best {top.flops_per_s / 1e9:.0f} "
                f"GFLOP/s, {top.shape}, {top.mode}; best so far {self.rate / 1e9:.0f}"
            )

    @property
    def rate(self) -> float:
        """(d)'s rate: the best matmul sample of the run."""
        return ideal.best(self.samples).flops_per_s

    @property
    def cpu_rate(self) -> float:
        return ideal.best_per_cpu_second(self.samples)

    def flops(self, documents: int) -> float:
        return measure.encoder_flops(self.config, self.real[:documents])

    def ideal_seconds(self, documents: int) -> float:
        """(d)'s time for the first `documents` documents."""
        return self.flops(documents) / self.rate

    def quiet(self, documents: int, seconds: float, use: measure.CpuUse | None) -> float | None:
        """Fraction of (d) had no other process run: the replicas' time spent preempted is
        taken off, and the ideal uses the matmul's best rate per CPU-second."""
        if use is None:
            return None
        alone = seconds - sum(use.preempted) / len(use.preempted)
        best = self.flops(documents) / (self.cores * self.cpu_rate)
        return best / max(alone, 1e-9)

    def run(self, name: str, input_dir: Path, output_dir: Path) -> tuple[measure.RunResult, float]:
        with measure.OtherLoad() as others:
            result = measure.batchjob_run(self.artifacts[name], input_dir, output_dir)
        say(
            f"{name}: pipeline {result.pipeline_seconds:.1f}s, wall {result.wall_seconds:.1f}s, "
            f"others {others.share:.0%}"
        )
        return result, others.share

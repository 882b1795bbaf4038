"""What every row of the bench shares: the fixtures, the compiled artifacts (resolved once,
so that every row runs the same ones), the bf16 matmul rate sampled between the rows, and
the results as they come in."""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import fixtures
import measure

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 128  # the largest default length, and (a)'s truncation
SHARDS = 4
CLASSIC = ["--batch-size", "6", "--sequence-length", "128", "--no-packing"]
MATMUL_SECONDS = 2.0


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
    runs: list[tuple[measure.RunResult, float]] = field(default_factory=list)  # (b), others
    pool: measure.PoolResult | None = None
    pool_others: float = 0.0
    ref: tuple[measure.RunResult, float] | None = None
    variants: dict[str, tuple[measure.RunResult, float]] = field(default_factory=dict)


class Bench:
    """The fixtures, the artifacts, and the bf16 matmul rate sampled between the rows."""

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
        self.rates: list[float] = []  # bf16 matmul FLOP/s summed over the cores, per round
        self.cpu_rates: list[float] = []  # the same per CPU-second of one core, per round

    def matmul(self, rounds: int) -> None:
        rates = measure.matmul_rates(rounds, MATMUL_SECONDS)
        self.rates += [wall for wall, _ in rates]
        self.cpu_rates += [cpu for _, cpu in rates]
        shown = ", ".join(f"{w / 1e9:.0f} ({c / 1e9:.0f} per CPU-second)" for w, c in rates)
        say(f"(d) bf16 matmul: {shown} GFLOP/s")

    def flops(self, documents: int) -> float:
        return measure.encoder_flops(self.config, self.real[:documents])

    def ideal_seconds(self, documents: int) -> float:
        """(d)'s time for the first `documents` documents."""
        return self.flops(documents) / statistics.median(self.rates)

    def quiet(self, documents: int, seconds: float, use: measure.CpuUse | None) -> float | None:
        """Fraction of (d) had no other process run: the replicas' time spent preempted is
        taken off, and the ideal uses the matmul's rate per CPU-second."""
        if use is None:
            return None
        alone = seconds - sum(use.preempted) / len(use.preempted)
        ideal = self.flops(documents) / (self.cores * statistics.median(self.cpu_rates))
        return ideal / max(alone, 1e-9)

    def run(self, name: str, input_dir: Path, output_dir: Path) -> tuple[measure.RunResult, float]:
        with measure.OtherLoad() as others:
            result = measure.batchjob_run(self.artifacts[name], input_dir, output_dir)
        say(
            f"{name}: pipeline {result.pipeline_seconds:.1f}s, wall {result.wall_seconds:.1f}s, "
            f"others {others.share:.0%}"
        )
        return result, others.share

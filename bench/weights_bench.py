"""One copy of the weights: an artifact's size on disk, its replicas' memory, and its speed,
shared weights (format 3) against weights frozen into each graph as constants (format 2).

bert-base (BertConfig() defaults, seeded random weights: bench/fixtures.py), as two
artifacts: the default (packing, one graph) and `--no-packing` (7 bucket graphs).

- disk: each artifact's size, against the weights file (weights.pt);
- memory: PSS (/proc/PID/smaps_rollup: a page shared by k processes counts 1/k in each) of
  the replicas and their fork server, with 1 and 2 replicas, each configuration in a fresh
  process (`--probe`) whose replicas have run batches of the largest shape. "constants":
  the same artifact loaded the old way, each graph with a private copy of its weights;
- speed: docs/s through a ReplicaPool, one replica a core, as bench.py's row (c), shared
  and constants alternately (ABBA), the median of every pass of each.

Targets (TARGETS; exit status 1 if one is missed): a 7-bucket artifact on disk ≤ 1.1 × its
weights file; in memory, the file's pages ≤ 1.1 × its size in all replicas together, none
copied; 2 replicas ≤ 1.35 × 1; a 7-bucket replica ≤ a 1-graph replica + 0.1 × the weights
(what a replica holds beyond them is its working set: a first batch adds ~85 MB, one graph
or seven); shared weights ≥ 0.98 × the docs/s of constants.

    .venv/bin/python bench/weights_bench.py [--docs 800] [--rounds 2] [--passes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fixtures
import numpy as np

TARGETS = {"disk": 1.1, "weights_once": 1.1, "two_replicas": 1.35, "buckets": 0.1}
TARGETS["speed"] = 0.98  # shared ÷ constants, docs/s
MB = 1 << 20
MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")


def smaps(pid: int, path: str | None = None) -> dict[str, int]:
    """Bytes of Rss, Pss and Private_Dirty of a process, or of its mappings of `path`."""
    sums, inside = {"Rss": 0, "Pss": 0, "Private_Dirty": 0}, path is None
    target = " " + os.path.realpath(path) if path else ""
    with open(f"/proc/{pid}/{'smaps' if path else 'smaps_rollup'}", encoding="utf-8") as f:
        for line in f:
            if path and MAPPING.match(line):  # a mapping's header: range perms ... path
                inside = line.rstrip("\n").endswith(target)
            elif inside and (name := line.partition(":")[0]) in sums:
                sums[name] += int(line.split()[1]) * 1024
    return sums


# -- a probe: one configuration, in a fresh process -------------------------------------------


@dataclass(frozen=True)
class NoModel:
    """A replica that loads no model: what every replica costs before the artifact."""

    def __call__(self) -> Any:
        import torch

        torch.ones(64, 64) @ torch.ones(64, 64)  # the kernels' first-use state
        return lambda arrays: np.zeros((1, 1), np.float32)


@dataclass(frozen=True)
class ConstantsLoader:
    """The artifact's loader, its graphs loaded as format 2 held them: each with a private
    copy of its weights, frozen in as constants."""

    inner: Any  # the ArtifactLoader, verified in the parent

    def __call__(self) -> Any:
        import batchjob.backends.cpu as cpu

        class Constants(cpu.CpuBackend):
            def load(self, path: str, weights: Any) -> Any:
                return cpu.with_private_weights(super().load(path, weights))

        cpu.BACKEND = Constants()  # this replica only
        return self.inner()


def random_batch(artifact: Any, shape: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ones = np.ones((shape.batch_size, shape.seq_len), np.int64)
    arrays = {"input_ids": rng.integers(5, 30000, size=ones.shape), "token_type_ids": 0 * ones}
    if artifact.strategy == "packing":
        arrays["position_ids"] = np.arange(shape.seq_len) + artifact.position_offset + 0 * ones
        arrays["segment_ids"] = ones
        arrays["segment_index"] = np.zeros((shape.batch_size, artifact.max_segments), np.int64)
    else:
        arrays["attention_mask"] = ones
    return arrays


async def _probe(how: str, artifact_path: str, replicas: int) -> dict[str, Any]:
    from multiprocessing import forkserver

    from batchjob.artifact import ArtifactLoader, load_artifact
    from batchjob.replica_process import Placement
    from batchjob.replicas import ReplicaPool

    cpus = sorted(os.sched_getaffinity(0))
    placements = [Placement(i, (cpus[i % len(cpus)],)) for i in range(replicas)]
    loader: Any = NoModel()
    if how != "none":
        loader = ArtifactLoader(artifact_path)
        loader = ConstantsLoader(loader) if how == "constants" else loader
    async with ReplicaPool(loader, placements) as pool:
        if how != "none":
            rng = np.random.default_rng(0)
            artifact = load_artifact(artifact_path)
            batches = [
                random_batch(artifact, artifact.shapes[-1], rng) for _ in range(2 * replicas)
            ]
            await asyncio.gather(*(pool.run(b) for b in batches))
        pids = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
        server = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
        weights = os.path.join(artifact_path, "weights.pt")
        return {
            "driver": smaps(os.getpid()),
            "server": smaps(server),
            "replicas": [smaps(pid) for pid in pids],
            "weights_file": [smaps(pid, weights) for pid in pids] if how != "none" else [],
        }


def probe(how: str, artifact: Path | str, replicas: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--probe", how, str(artifact), str(replicas)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def group_pss(memory: dict[str, Any]) -> float:
    """PSS of the replicas and their fork server, bytes."""
    return float(memory["server"]["Pss"] + sum(r["Pss"] for r in memory["replicas"]))


def call_times(path: Path, calls: int) -> dict[str, dict[str, float]]:
    """Per compiled shape, the median seconds of a call of its graph, shared and constants:
    both loaded in this process and called in turn on one batch (ABBA), after two calls each
    (the executor profiles, then optimises), so that other load hits both alike."""
    import time

    import torch

    from batchjob.artifact import BUCKET_INPUTS, PACKED_INPUTS, load_artifact, map_weights
    from batchjob.backends.cpu import BACKEND, with_private_weights

    artifact = load_artifact(str(path))
    weights = map_weights(str(path / "weights.pt"))
    names = PACKED_INPUTS if artifact.strategy == "packing" else BUCKET_INPUTS
    medians = {}
    for shape in artifact.shapes:
        graph = artifact.graph_path(shape)
        graphs = {
            "shared": BACKEND.load(graph, weights),
            "constants": with_private_weights(BACKEND.load(graph, weights)),
        }
        arrays = random_batch(artifact, shape, np.random.default_rng(0))
        inputs = [torch.from_numpy(arrays[name]) for name in names]
        seconds: dict[str, list[float]] = {"shared": [], "constants": []}
        with torch.inference_mode():
            for i in range(2 + calls):
                for how in ("shared", "constants")[:: 1 if i % 2 else -1]:
                    started = time.perf_counter()
                    graphs[how](*inputs)
                    if i >= 2:
                        seconds[how].append(time.perf_counter() - started)
        medians[f"{shape.batch_size}x{shape.seq_len}"] = {
            how: statistics.median(s) for how, s in seconds.items()
        }
    return medians


# -- the bench --------------------------------------------------------------------------------


def verdict(name: str, ratio: float, *, at_least: bool = False) -> tuple[str, bool]:
    met = ratio >= TARGETS[name] if at_least else ratio <= TARGETS[name]
    sign = ">=" if at_least else "<="
    return f"{ratio:.2f} ({sign} {TARGETS[name]}: {'PASS' if met else 'MISS'})", met


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=800, help="documents of a speed pass (800)")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds of the speed A/B (2)")
    p.add_argument("--passes", type=int, default=2, help="passes per pool (2)")
    p.add_argument("--calls", type=int, default=10, help="timed calls per graph and way (10)")
    p.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.probe:
        how, path, replicas = args.probe
        print(json.dumps(asyncio.run(_probe(how, path, int(replicas)))))
        return 0

    import measure
    from context import REPO, say

    from batchjob.artifact import ArtifactLoader

    say(f"{fixtures.cpu_family()}, {len(os.sched_getaffinity(0))} CPUs")
    root = fixtures.cache_root(REPO)
    model = fixtures.ensure_model(root)
    packed = fixtures.ensure_artifact(root, model, "default", [])[0]
    buckets = fixtures.ensure_artifact(root, model, "buckets", ["--no-packing"])[0]
    dtype = json.loads((packed / "batchjob.json").read_text())["dtype"]
    weights = (buckets / "weights.pt").stat().st_size
    say(f"bert-base, {dtype}: weights file {weights / MB:.1f} MB")
    met_all = True

    for name, path in (("packed", packed), ("buckets", buckets)):
        files = [f for f in path.rglob("*") if f.is_file()]
        total = sum(f.stat().st_size for f in files)
        graphs = [f for f in files if f.name.startswith("graph_")]
        shown, met = verdict("disk", total / weights)
        met_all &= met or name == "packed"
        shown = shown if name == "buckets" else f"{total / weights:.2f}"
        say(
            f"disk, {name}: {total / MB:.1f} MB = {shown} x the weights file; "
            f"{len(graphs)} graphs, {sum(f.stat().st_size for f in graphs) / MB:.2f} MB in all"
        )

    memory = {}
    for how, path, replicas in [("none", packed, 1)] + [
        (how, path, n)
        for how in ("shared", "constants")
        for path, n in ((packed, 1), (packed, 2), (buckets, 1))
    ]:
        key = f"{'buckets' if path == buckets else 'packed'} {how} x{replicas}"
        result = memory[key] = probe(how, path, replicas)
        each = ", ".join(f"{r['Pss'] / MB:.0f}" for r in result["replicas"])
        resident = sum(m["Pss"] for m in result["weights_file"])
        copied = sum(m["Private_Dirty"] for m in result["weights_file"])
        shown, met = verdict("weights_once", resident / weights)
        met_all &= how != "shared" or (met and copied == 0)
        say(
            f"memory, {key}: replicas + fork server PSS {group_pss(result) / MB:.0f} MB "
            f"(replicas {each}; fork server {result['server']['Pss'] / MB:.0f}; driver "
            f"{result['driver']['Pss'] / MB:.0f})"
            + (f"; weights file: PSS {shown} x, copied {copied / MB:.0f} MB" if resident else "")
        )
    for how in ("shared", "constants"):
        two = group_pss(memory[f"packed {how} x2"]) / group_pss(memory[f"packed {how} x1"])
        shown, met = verdict("two_replicas", two)
        met_all &= met or how == "constants"
        say(f"{how}: 2 replicas ÷ 1 replica, PSS with the fork server: {shown}")
    for how in ("shared", "constants"):
        replica = {k: memory[f"{k} {how} x1"]["replicas"][0]["Pss"] for k in ("packed", "buckets")}
        shown, met = verdict("buckets", (replica["buckets"] - replica["packed"]) / weights)
        met_all &= met or how == "constants"
        over = (replica["buckets"] - memory["packed none x1"]["replicas"][0]["Pss"]) / MB
        say(
            f"{how}: a 7-bucket replica's PSS - a 1-graph replica's = {shown} x the weights "
            f"file; over a replica without a model: {over:.0f} MB (weights + working set)"
        )

    corpus = fixtures.make_corpus(args.docs)
    for name, path in (("packed", packed), ("buckets", buckets)):
        seconds: dict[str, list[float]] = {"shared": [], "constants": []}
        documents = 0
        for i in range(2 * args.rounds):
            how = ("shared", "constants")[(i + i // 2) % 2]  # ABBA
            loader = ArtifactLoader(str(path))
            result = measure.model_alone(
                path,
                corpus.ids,
                corpus.texts,
                args.passes,
                loader=ConstantsLoader(loader) if how == "constants" else loader,
            )
            seconds[how] += result.seconds
            documents = result.documents
        rate = {how: documents / statistics.median(s) for how, s in seconds.items()}
        shown, met = verdict("speed", rate["shared"] / rate["constants"], at_least=True)
        met_all &= met
        say(
            f"speed, {name}: shared {rate['shared']:.1f} docs/s, constants "
            f"{rate['constants']:.1f} docs/s; shared ÷ constants {shown} "
            f"(passes: {json.dumps({k: [round(x, 2) for x in v] for k, v in seconds.items()})})"
        )
    for name, path in (("packed", packed), ("buckets", buckets)):
        for shape, median in call_times(path, args.calls).items():
            ratio = median["constants"] / median["shared"]
            shown, met = verdict("speed", ratio, at_least=True)
            met_all &= met
            say(
                f"a call, {name} {shape}: shared {median['shared'] * 1e3:.0f} ms, constants "
                f"{median['constants'] * 1e3:.0f} ms; shared's speed ÷ constants' {shown}"
            )
    return 0 if met_all else 1


if __name__ == "__main__":
    sys.exit(main())

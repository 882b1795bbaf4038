"""One copy of the weights: an artifact's size on disk and its replicas' memory, against the
weights of the model, and the model's speed through a ReplicaPool.

bert-base (BertConfig() defaults, seeded random weights: bench/fixtures.py) in the default
dtype, as two artifacts: the default (packing, one graph) and `--no-packing` (7 buckets).

- disk: each artifact's size, against the weights (parameters × bytes of the dtype);
- memory: PSS (/proc/PID/smaps_rollup: a page shared by k processes counts 1/k in each) of
  a process driving a ReplicaPool of 1 and of 2 replicas, each loaded, warmed up and given
  batches of random tokens; the tree is the driver plus its replicas. A replica that loads
  nothing (torch imported, one small matmul) is the baseline a loaded artifact adds to;
- speed: the packed artifact's graphs on a generated corpus through a ReplicaPool with one
  replica per core, as bench.py's row (c).

Targets: the weights once on disk and in memory: a 7-bucket artifact's size ≤ 1.1 × the
weights, and the pages of its weights file resident in all replicas together (their PSS)
≤ 1.1 × the weights, none copied (Private_Dirty 0); the exit status is 1 if one is missed.
Also shown, against the targets first set for this work: PSS of the tree with 2 replicas
÷ the replica's PSS with 1 (≤ 1.35), and a 7-bucket replica's PSS over the baseline ÷ the
weights (≤ 1.1): what a replica holds of its own (torch, activations) counts there too.

    .venv/bin/python bench/weights_bench.py [--docs 600] [--passes 2] [--json FILE]
    .venv/bin/python bench/weights_bench.py --packed DIR --buckets DIR   # given artifacts

(From the repository root, as `make bench` does.) The memory of each configuration is taken
in a fresh process (`--probe`), so that nothing of one configuration stays in the next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TREE_TARGET = 1.35  # tree PSS with 2 replicas ÷ the replica's PSS with 1
SIZE_TARGET = 1.1  # a 7-bucket artifact's disk size and loaded memory ÷ the weights
MB = 1 << 20


def cpu_family() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        info = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in f) if v.strip()
        )
    return f"cpu family {info.get('cpu family', '?')}, {info.get('model name', '?')}"


def mapped(pid: int, path: str) -> dict[str, int]:
    """Bytes of Rss, Pss and Private_Dirty of `pid`'s mappings of the file at `path`."""
    target, sums = os.path.realpath(path), {"Rss": 0, "Pss": 0, "Private_Dirty": 0}
    inside = False
    with open(f"/proc/{pid}/smaps", encoding="utf-8") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping: range perms ... path
                inside = line.rstrip("\n").endswith(" " + target)
            elif inside and (name := line.split(":")[0]) in sums:
                sums[name] += int(line.split()[1]) * 1024
    return sums


def rollup(pid: int) -> dict[str, int]:
    """Bytes of Rss, Pss, Pss_Anon and Pss_File of a process (smaps_rollup)."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
                found[name] = int(rest.split()[0]) * 1024
    return found


# -- a probe: one configuration, in a fresh process -------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """A replica that loads no model: what every replica costs before the artifact."""

    def __call__(self) -> Any:
        import torch

        import batchjob.backends  # noqa: F401  (as a loaded replica has it)

        torch.ones(64, 64) @ torch.ones(64, 64)  # the kernels' first-use state

        def predict(arrays: dict[str, np.ndarray]) -> np.ndarray:
            return np.zeros((1, 1), np.float32)

        return predict


def random_batch(artifact: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of the artifact's largest shape: random tokens, one document a row."""
    shape = artifact.shapes[-1]
    b, s = shape.batch_size, shape.seq_len
    vocab = json.loads((Path(artifact.path) / "config.json").read_text())["vocab_size"]
    ones = np.ones((b, s), np.int64)
    arrays = {"input_ids": rng.integers(5, vocab, size=(b, s)), "token_type_ids": 0 * ones}
    if artifact.strategy == "packing":
        positions = np.arange(s, dtype=np.int64)[None, :] + artifact.position_offset
        arrays |= {"position_ids": positions + 0 * ones, "segment_ids": ones}
        arrays["segment_index"] = np.zeros((b, artifact.max_segments), np.int64)
    else:
        arrays["attention_mask"] = ones
    return arrays


async def _probe(artifact_path: str, replicas: int) -> dict[str, Any]:
    from batchjob.artifact import ArtifactLoader, load_artifact
    from batchjob.replica_process import Placement
    from batchjob.replicas import ReplicaPool

    cpus = sorted(os.sched_getaffinity(0))
    placements = [Placement(i, (cpus[i % len(cpus)],)) for i in range(replicas)]
    baseline = artifact_path == "baseline"
    loader: Any = Baseline() if baseline else ArtifactLoader(artifact_path)
    async with ReplicaPool(loader, placements) as pool:
        if not baseline:
            artifact = load_artifact(artifact_path)
            rng = np.random.default_rng(0)
            batches = [random_batch(artifact, rng) for _ in range(2 * replicas)]
            await asyncio.gather(*(pool.run(b) for b in batches))
        pids = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
        # (An artifact of a batchjob before format 3 has no weights file: its graphs hold them.)
        weights = None if baseline else getattr(load_artifact(artifact_path), "weights_path", None)
        return {
            "driver": rollup(os.getpid()),
            "replicas": [rollup(pid) for pid in pids],
            "weights_file": [mapped(pid, weights) for pid in pids] if weights else None,
            "torch_in_driver": "torch" in sys.modules,
        }


def probe(artifact: str, replicas: int) -> dict[str, Any]:
    """The memory of a pool of `replicas` replicas of `artifact` ("baseline": no model)."""
    command = [sys.executable, __file__, "--probe", artifact, str(replicas)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the bench --------------------------------------------------------------------------------


def weights_bytes(model: Path, dtype: str) -> int:
    """The model's parameters × the bytes of the artifact's dtype."""
    from safetensors import safe_open

    count = 0
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            count += int(np.prod(f.get_slice(name).get_shape()))
    return count * (2 if dtype == "bf16" else 4)


def disk(path: Path) -> dict[str, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return {
        "total": sum(p.stat().st_size for p in files),
        "graphs": sum(p.stat().st_size for p in files if p.name.startswith("graph_")),
        "weights": sum(p.stat().st_size for p in files if p.name == "weights.pt"),
        "graph_files": sum(p.name.startswith("graph_") for p in files),
    }


def pss_mb(memory: dict[str, Any]) -> tuple[float, list[float]]:
    """(PSS of the tree, PSS of each replica) in MB."""
    replicas = [r["Pss"] / MB for r in memory["replicas"]]
    return memory["driver"]["Pss"] / MB + sum(replicas), replicas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=600, help="documents of the speed pass (600)")
    p.add_argument("--passes", type=int, default=2, help="speed passes; the median counts (2)")
    p.add_argument("--packed", type=Path, help="measure this packed artifact (else compile)")
    p.add_argument("--buckets", type=Path, help="measure this bucket artifact (else compile)")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    p.add_argument("--probe", nargs=2, metavar=("ARTIFACT", "REPLICAS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    if args.probe:
        print(json.dumps(asyncio.run(_probe(args.probe[0], int(args.probe[1])))))
        return 0

    import fixtures
    import measure
    from context import REPO

    print(f"{cpu_family()}, {len(os.sched_getaffinity(0))} CPUs", flush=True)
    root = fixtures.cache_root(REPO)
    model = fixtures.ensure_model(root)
    packed = args.packed or fixtures.ensure_artifact(root, model, "default", [])[0]
    buckets = args.buckets or fixtures.ensure_artifact(root, model, "buckets", ["--no-packing"])[0]
    dtype = json.loads((packed / "batchjob.json").read_text())["dtype"]
    weights = weights_bytes(model, dtype)
    print(f"bert-base, {dtype}: weights {weights / MB:.0f} MB", flush=True)
    data: dict[str, Any] = {"cpu": cpu_family(), "dtype": dtype, "weights": weights}

    failed = False
    for name, path in (("packed", packed), ("buckets", buckets)):
        size = data[f"disk_{name}"] = disk(path)
        ratio = size["total"] / weights
        verdict = "" if name == "packed" else (" PASS" if ratio <= SIZE_TARGET else " MISS")
        failed |= name == "buckets" and ratio > SIZE_TARGET
        print(
            f"disk, {name} ({size['graph_files']} graphs): {size['total'] / MB:.0f} MB "
            f"= {ratio:.2f} x the weights{verdict}; graphs {size['graphs'] / MB:.1f} MB, "
            f"weights file {size['weights'] / MB:.0f} MB",
            flush=True,
        )

    memory = data["memory"] = {
        "baseline": probe("baseline", 1),
        "packed x1": probe(str(packed), 1),
        "packed x2": probe(str(packed), 2),
        "buckets x1": probe(str(buckets), 1),
    }
    base = pss_mb(memory["baseline"])[1][0]
    for name, result in memory.items():
        tree, replicas = pss_mb(result)
        rss = ", ".join(f"{r['Rss'] / MB:.0f}" for r in result["replicas"])
        print(
            f"memory, {name}: tree PSS {tree:.0f} MB (driver {result['driver']['Pss'] / MB:.0f}"
            f"); replicas PSS {', '.join(f'{r:.0f}' for r in replicas)} MB, RSS {rss} MB",
            flush=True,
        )
        if result.get("weights_file"):
            files = result["weights_file"]
            resident = sum(m["Pss"] for m in files)
            copied = sum(m["Private_Dirty"] for m in files)
            met = resident <= SIZE_TARGET * weights and copied == 0
            failed |= not met
            each = ", ".join(f"{m['Rss'] / MB:.0f}" for m in files)
            print(
                f"  its weights file: RSS {each} MB "
                f"in the replicas, PSS {resident / MB:.0f} MB in all = "
                f"{resident / weights:.2f} x the weights, {copied / MB:.0f} MB copied"
                f"{' PASS' if met else ' MISS'}",
                flush=True,
            )
    one = pss_mb(memory["packed x1"])[1][0]
    tree_two = pss_mb(memory["packed x2"])[0]
    print(
        f"packed, 2 replicas: tree PSS {tree_two:.0f} MB = {tree_two / one:.2f} x one replica's "
        f"PSS ({one:.0f} MB){' PASS' if tree_two <= TREE_TARGET * one else ' MISS'} "
        f"(first target <= {TREE_TARGET}); a replica without a model: {base:.0f} MB"
    )
    loaded = pss_mb(memory["buckets x1"])[1][0] - base
    print(
        f"buckets, 1 replica: {loaded:.0f} MB over a replica without a model = "
        f"{loaded * MB / weights:.2f} x the weights"
        f"{' PASS' if loaded * MB <= SIZE_TARGET * weights else ' MISS'} "
        f"(first target <= {SIZE_TARGET})"
    )

    corpus = fixtures.make_corpus(args.docs)
    started = time.perf_counter()
    result = measure.model_alone(packed, corpus.ids, corpus.texts, args.passes)
    seconds = sorted(result.seconds)[len(result.seconds) // 2]
    data["speed"] = {"documents": result.documents, "real_tokens": result.real_tokens}
    data["speed"] |= {"seconds": result.seconds, "batches": result.batches}
    print(
        f"speed, packed through a ReplicaPool ({len(os.sched_getaffinity(0))} replicas): "
        f"{result.documents / seconds:.1f} docs/s, {result.real_tokens / seconds:.0f} real "
        f"tokens/s (passes {', '.join(f'{s:.1f}' for s in result.seconds)} s; "
        f"{time.perf_counter() - started:.0f}s with loading)"
    )
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

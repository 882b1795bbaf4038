"""Where a compiled graph's time goes: torch.profiler over the bench's batches, one thread.

    python bench/profile_graph.py [--flags='--packing ...' | --artifact PATH] [--batches 6]
                                  [--fuser onednn]

One process pinned to one CPU with one torch thread (a replica's setting), the bench's
corpus batched as `run` batches it, a few batches to warm up, then N batches profiled. Every
operator's self time goes to one category (linear layers, attention, GELU, LayerNorm,
residual adds, copies and reshapes, embedding, mask/pooling/head); the linear layers' and
attention's rates are their FLOPs (padding included) per second of their time, next to the
bf16 matmul's rate at the same layer shapes measured here, per CPU-second.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import fixtures
import measure
from context import REPO

CATEGORIES = {
    # bf16 graphs' linears are oneDNN's, with the bias and a following GELU fused in.
    "linear layers": (
        "aten::addmm",
        "aten::linear",
        "aten::mm",
        "aten::t",
        "aten::matmul",
        "mkldnn::_linear_pointwise",
    ),
    "attention (QKᵀ, softmax, AV)": (
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_softmax",
        "aten::softmax",
        "aten::bmm",
        "aten::baddbmm",
    ),
    "GELU": ("aten::gelu",),
    "LayerNorm": ("aten::layer_norm", "aten::native_layer_norm"),
    "residual adds": ("aten::add", "aten::add_"),
    "embedding": ("aten::embedding", "aten::index_select"),
    "copies and reshapes": (
        "aten::copy_",
        "aten::contiguous",
        "aten::clone",
        "aten::view",
        "aten::reshape",
        "aten::_reshape_alias",
        "aten::transpose",
        "aten::permute",
        "aten::expand",
        "aten::as_strided",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::slice",
        "aten::select",
        "aten::unsqueeze",
        "aten::flatten",
        "aten::to",
        "aten::_to_copy",
        "aten::resolve_conj",
    ),
}
OTHER = "mask, pooling, head, fused groups"


def category(name: str) -> str:
    return next((c for c, names in CATEGORIES.items() if name in names), OTHER)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--flags", default="", help="compile flags of the artifact ('' = default)")
    p.add_argument("--artifact", type=Path, help="profile this artifact instead (--flags unused)")
    p.add_argument("--docs", type=int, default=2400)
    p.add_argument("--batches", type=int, default=6, help="batches profiled (6)")
    p.add_argument("--fuser", choices=("default", "onednn", "nnc"), default="default")
    p.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)))
    p.add_argument("--json", type=Path)
    return p.parse_args()


def matmul_per_cpu_second(config: dict[str, Any]) -> dict[str, float]:
    """The matmul's FLOPs per CPU-second (the bench's dtype) at the layer shapes (M = 1,024),
    this thread."""
    import ideal
    import torch

    rates = {}
    for k, n in ideal.layer_shapes(config):
        kind = fixtures.bench_torch_dtype()
        a, b = torch.randn(1024, k).to(kind), torch.randn(k, n).to(kind)
        for _ in range(3):
            torch.mm(a, b)
        count, started = 0, time.thread_time()
        while time.thread_time() - started < 1.0:
            torch.mm(a, b)
            count += 1
        rates[f"(1024x{k})@({k}x{n})"] = 2 * 1024 * k * n * count / (time.thread_time() - started)
    return rates


def main() -> int:
    args = parse_args()
    os.sched_setaffinity(0, {args.cpu})
    import torch

    torch.set_num_threads(1)
    if args.fuser == "onednn":
        torch.jit.enable_onednn_fusion(True)
    elif args.fuser == "nnc":
        torch._C._jit_override_can_fuse_on_cpu(True)
        torch._C._jit_set_texpr_fuser_enabled(True)
    from torch.profiler import ProfilerActivity, profile

    from batchjob.artifact import PACKED_INPUTS, map_weights
    from batchjob.backends import get_backend

    root = fixtures.cache_root(REPO)
    model = fixtures.ensure_model(root)
    config = json.loads((model / "config.json").read_text())
    flags = shlex.split(args.flags)
    if args.artifact:
        path = args.artifact
    else:
        path, _ = fixtures.ensure_artifact(root, model, "profile" if flags else "default", flags)
    corpus = fixtures.make_corpus(args.docs)
    artifact, batches = measure.run_batches(path, corpus.ids, corpus.texts)
    if artifact.strategy != "packing":
        raise SystemExit("profile_graph.py profiles packed artifacts (one graph)")
    inputs = [tuple(torch.from_numpy(b.arrays[n]) for n in PACKED_INPUTS) for b in batches]
    weights = map_weights(artifact.weights_path) if artifact.weights_path else {}
    graph = get_backend(artifact.backend).load(artifact.graph_path(artifact.shapes[0]), weights)
    warm, n = 3, args.batches
    if len(inputs) < warm + 2 * n:
        raise SystemExit(f"{len(inputs)} batches: too few for --batches {n}")
    with torch.inference_mode():
        for x in inputs[:warm]:
            graph(*x)
        started = time.thread_time()
        for x in inputs[warm : warm + n]:
            graph(*x)
        per_batch = (time.thread_time() - started) / n
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in inputs[warm + n : warm + 2 * n]:
                graph(*x)
    rates = matmul_per_cpu_second(config)

    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        shares[category(event.key)] += event.self_cpu_time_total / 1e6 / n
    total = sum(shares.values())
    shape = artifact.shapes[0]
    tokens = shape.batch_size * shape.seq_len
    h, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    flops = {
        "linear layers": 2 * tokens * layers * (4 * h * h + 2 * h * ffn),
        "attention (QKᵀ, softmax, AV)": 4 * shape.batch_size * shape.seq_len**2 * h * layers,
    }
    family = fixtures.cpu_info().get("cpu family", "?")
    print(
        f"{artifact.strategy} {shape.batch_size}x{shape.seq_len}, up to {artifact.max_segments} "
        f"docs a row, fuser {args.fuser}; cpu family {family}; {n} batches profiled; "
        f"{per_batch:.3f} CPU-s a batch unprofiled, {total:.3f} profiled"
    )
    print(f"{fixtures.bench_dtype()} matmul here, per CPU-second: " + ", ".join(
        f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()
    ))  # fmt: skip
    print()
    print("| where | share of the graph's time | ms a batch | GFLOP/s (padding included) |")
    print("| --- | ---: | ---: | ---: |")
    for name in [*CATEGORIES, OTHER]:
        seconds = shares.get(name, 0.0)
        rate = f"{flops[name] / seconds / 1e9:.0f}" if name in flops and seconds else ""
        print(f"| {name} | {seconds / total:.1%} | {seconds * 1e3:.1f} | {rate} |")
    if args.json:
        result = {"per_batch": per_batch, "shares": dict(shares), "matmul": rates}
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bench's table, its target checks, and where the replicas' time went."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import fixtures
import numpy as np
from context import MAX_LENGTH, SHARDS, Bench, Results, describe_artifact
from fixtures import bench_dtype
from ideal import best as best_matmul
from ideal import summary as matmul_summary

# row ≥ minimum × other row; "peer": the faster of (a) and ray. End to end (b_wall: start-up
# included) against the ideal and the peers; (b) against (c): the pipeline adds nothing.
TARGETS = (("b_wall", "d", 0.75), ("b_wall", "peer", 2.5), ("b", "c", 0.9))


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    documents: int
    real_tokens: int
    seconds: float
    ideal_seconds: float  # (d)'s time for this row's documents
    others: float | None = None  # share of the machine other processes used meanwhile
    quiet: float | None = None  # estimated fraction of (d) without the other processes
    note: str = ""

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def vs_ideal(self) -> float:
        return self.ideal_seconds / self.seconds


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def seconds_note(seconds: list[float], what: str) -> str:
    each = ", ".join(f"{s:.1f}" for s in seconds)
    return f"median of {len(seconds)} {what}: {each}" if len(seconds) > 1 else ""


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def describe_corpus(corpus: fixtures.Corpus, real: np.ndarray) -> dict[str, Any]:
    tokens = corpus.tokens
    return {
        "documents": len(tokens),
        "p50": float(np.percentile(tokens, 50)),
        "p90": float(np.percentile(tokens, 90)),
        "p99": float(np.percentile(tokens, 99)),
        "over_max_length": float(np.mean(tokens > MAX_LENGTH)),
        "mean": float(tokens.mean()),
        "max": int(tokens.max()),
        "real_tokens": int(real.sum()),
    }


def build_rows(bench: Bench, res: Results) -> list[Row]:
    assert res.pool is not None
    assert res.ref is not None
    n, real = len(bench.corpus.texts), bench.real
    for r, _ in (*res.runs, *res.variants.values()):
        assert r.documents == n, f"a run wrote {r.documents} of {n} documents"
    assert res.pool.documents == n, f"(c) ran {res.pool.documents} of {n} documents"
    ideal, quiet = bench.ideal_seconds, bench.quiet

    hf = max(res.hf, key=lambda t: t.rate)
    hf_rates = ", ".join(f"{t.rate:.1f} at batch {t.batch_size}" for t in res.hf)
    runs, pool, (ref, ref_others) = [r for r, _ in res.runs], res.pool, res.ref
    # (b) and (c): each column the median over the runs (passes), so with two, the mean.
    b_seconds = statistics.median(r.pipeline_seconds for r in runs)
    b_wall = statistics.median(r.wall_seconds for r in runs)
    b_others = statistics.median(o for _, o in res.runs)
    b_quiet = median([quiet(n, r.pipeline_seconds, r.cpu) for r in runs])
    c_quiet = median([quiet(n, s, u) for s, u in zip(pool.seconds, pool.cpu, strict=True)])
    top = best_matmul(bench.samples)
    rows = [
        Row("a", f"(a) HF pipeline {bench_dtype()}, batch {hf.batch_size}, {bench.cores} threads",
            hf.documents, int(real[: hf.documents].sum()), hf.seconds, ideal(hf.documents),
            hf.others, None, f"first {hf.documents} docs, load ({res.hf_load_seconds:.1f}s) not "
            f"counted; docs/s {hf_rates}"),
        Row("b", "(b) batchjob run, default: pipeline_seconds", n, runs[0].real_tokens,
            b_seconds, ideal(n), b_others, b_quiet,
            seconds_note([r.pipeline_seconds for r in runs], "runs")),
        Row("b_wall", "    the same runs: wall time, start-up included", n, runs[0].real_tokens,
            b_wall, ideal(n), b_others, None, "process start to exit"),
        Row("c", "(c) model alone: same batches, ReplicaPool", n, pool.real_tokens,
            statistics.median(pool.seconds), ideal(n), res.pool_others, c_quiet,
            seconds_note(pool.seconds, "passes")),
        Row("d", f"(d) ideal: real-token FLOPs / {bench_dtype()} matmul rate", n, int(real.sum()),
            ideal(n), ideal(n), None, 1.0,
            f"{bench.flops(n) / 1e12:.1f} TFLOP at {top.flops_per_s / 1e9:.0f} GFLOP/s: "
            f"{top.shape}, {top.mode}; best of {len(bench.samples)} samples"),
        Row("ref", "ref batchjob run, classic 6x128: pipeline_seconds", ref.documents,
            ref.real_tokens, ref.pipeline_seconds, ideal(ref.documents), ref_others,
            quiet(ref.documents, ref.pipeline_seconds, ref.cpu),
            f"first {ref.documents} docs"),
        Row("ref_wall", "    the same run: wall time, start-up included", ref.documents,
            ref.real_tokens, ref.wall_seconds, ideal(ref.documents), ref_others),
    ]  # fmt: skip
    if res.ray is not None:
        ray = res.ray
        rows.insert(1, Row("ray", f"ray Data map_batches, {ray.actors} actors, batch "
            f"{ray.batch_size}: wall", ray.documents, int(real[: ray.documents].sum()),
            ray.seconds, ideal(ray.documents), None, None,
            f"start-up included: ray.init {ray.ray_init_seconds:.1f}s, "
            f"then {ray.pipeline_seconds:.1f}s to Parquet"))  # fmt: skip
    for name, (v, others) in res.variants.items():
        rows.append(
            Row(name, f"{name}: {' '.join(bench.flags[name])}", n, v.real_tokens,
                v.pipeline_seconds, ideal(n), others, quiet(n, v.pipeline_seconds, v.cpu),
                f"pipeline_seconds; padding {v.real_tokens / v.compiled_tokens:.0%}")
        )  # fmt: skip
    return rows


def report(bench: Bench, res: Results, rows: list[Row], info: dict[str, Any]) -> dict[str, Any]:
    """Print the table and the findings; return them for --json."""
    assert res.pool is not None
    assert res.ref is not None
    n, stats = len(bench.corpus.texts), describe_corpus(bench.corpus, bench.real)
    versions = info["versions"]
    print()
    print(
        f"batchjob bench, {info['date']}: {bench.cores} cores, {info['cpu']}"
        f"{' (AVX-512 BF16)' if info['avx512_bf16'] else ''}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}"
    )
    print(
        f"bert-base classifier (random weights, {bench_dtype()}); {n} docs in {SHARDS} jsonl "
        f"shards, "
        f"tokens per doc p50 {stats['p50']:.0f} / p90 {stats['p90']:.0f} / p99 "
        f"{stats['p99']:.0f}, {stats['over_max_length']:.1%} over {MAX_LENGTH} (truncated)"
    )
    print()
    header = (
        f"{'row':<50} {'docs':>5} {'seconds':>7} {'docs/s':>7} {'tokens/s':>8} "
        f"{'vs (d)':>6} {'others':>6} {'quiet':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.label:<50} {r.documents:>5} {r.seconds:>7.1f} {r.docs_per_s:>7.1f} "
            f"{r.tokens_per_s:>8.0f} {r.vs_ideal:>6.0%} {percent(r.others):>6} "
            f"{percent(r.quiet):>6}  {r.note}"
        )
    print()
    by_key, checks = {r.key: r for r in rows}, []
    print("targets (speed = ideal time of the row's docs / its time; quiet: estimated without")
    print("the other processes' load, where both rows have the estimate):")
    peers = [by_key[k] for k in ("a", "ray") if k in by_key]
    by_key["peer"] = max(peers, key=lambda r: r.vs_ideal)
    for key, other, minimum in TARGETS:
        a, b = by_key[key], by_key[other]
        other = other if other != "peer" else f"{b.key}, the best peer"
        ratio = a.vs_ideal / b.vs_ideal
        quiet = a.quiet / b.quiet if a.quiet is not None and b.quiet is not None else None
        checks.append({"row": key, "other": other, "minimum": minimum, "ratio": ratio})
        line = f"  ({key}) >= {minimum:g} x ({other}): {ratio:.2f} x  "
        line += "PASS" if ratio >= minimum else "MISS"
        if quiet is not None:
            checks[-1]["quiet_ratio"] = quiet
            line += f"   quiet: {quiet:.2f} x  {'PASS' if quiet >= minimum else 'MISS'}"
        print(line)
    print()

    runs, ref = [r for r, _ in res.runs], res.ref[0]
    padding = {
        "default": runs[0].real_tokens / runs[0].compiled_tokens,
        "classic": ref.real_tokens / ref.compiled_tokens,
    }
    print(
        f"padding efficiency (real / compiled tokens, from the manifests): default "
        f"{padding['default']:.1%} in {runs[0].batches} batches, classic 6x128 "
        f"{padding['classic']:.1%} in {ref.batches} batches"
    )
    shapes = ", ".join(f"{k}: {v}" for k, v in sorted(res.pool.shapes.items()))
    print(f"default artifact: {describe_artifact(bench.artifacts['default'])}; batches: {shapes}")
    print(f"{bench_dtype()} matmul rates (GFLOP/s) sampled in this run; (d) takes the best:")
    print("\n".join(matmul_summary(bench.samples)))
    cpu_rate = bench.cpu_rate
    print(
        "replicas' time (run: on a CPU; preempted: runnable, another process on the CPU; idle: "
        "waiting for work) and\ncompute efficiency (real-token FLOPs / (replica CPU-seconds x "
        f"the matmul's {cpu_rate / 1e9:.0f} GFLOP per CPU-second)):"
    )
    uses = [(f"(b) run {i + 1}", r.cpu, n) for i, r in enumerate(runs)]
    uses += [(f"(c) pass {i + 1}", u, n) for i, u in enumerate(res.pool.cpu)]
    uses += [("ref", ref.cpu, ref.documents)]
    for label, use, documents in uses:
        if use is not None:
            efficiency = bench.flops(documents) / (cpu_rate * sum(use.replicas))
            print(
                f"  {label:<10} run {use.replica_busy:4.0%}, preempted {use.replica_preempted:4.0%}"
                f", idle {use.replica_idle:4.0%} of {use.seconds:5.1f}s; compute efficiency "
                f"{efficiency:4.0%}; dispatching process {use.main_busy:4.0%} of a core"
            )
    return {
        "machine": info,
        "corpus": stats,
        "matmul": [asdict(m) for m in bench.samples],
        "ideal_gflops": bench.rate / 1e9,
        "rows": [asdict(r) | {"docs_per_s": r.docs_per_s, "vs_ideal": r.vs_ideal} for r in rows],
        "checks": checks,
        "padding": padding,
        "results": asdict(res),
    }

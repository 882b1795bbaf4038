"""`make bench`'s rows for the pair tasks: `batchjob run --task zero-shot-classification`
against transformers' `pipeline("zero-shot-classification")`, and `batchjob run --task
text-ranking` against sentence-transformers' `CrossEncoder.predict`, on the same documents
in the same run, each peer in the bench's dtype (bf16 where native, else fp32) on every
core at its best batch size of those tried.

The models are bert-base shaped (BertConfig() defaults), seeded random weights, MiniLM's
tokenizer, as the bench's classifier: an NLI head (contradiction, neutral, entailment) and a
one-logit cross-encoder. The documents are the bench's short corpus (bench/fixtures.py); a
zero-shot document runs one (premise, hypothesis) pair per candidate label; a ranking record
is (query, passage), the query a document of the corpus, the passage another.

Throughput: documents (zero-shot) or pairs (ranking) per second, batchjob's from its
manifest (replicas ready → last shard written), the peers' over the documents they got
through in `--budget` seconds (after a warm-up).

    .venv/bin/python bench/pairs_bench.py [--docs 600] [--labels 4] [--pairs 1600] [--budget 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fixtures
import measure

REPO = Path(__file__).resolve().parent.parent
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}
LABELS = ["sports", "politics", "science", "music", "business", "health", "travel", "food"]
PEER_BATCH_SIZES = (16, 64)
NLI = {"num_labels": 3, "id2label": {0: "contradiction", 1: "neutral", 2: "entailment"}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=600, help="zero-shot documents (600)")
    p.add_argument("--labels", type=int, default=4, help="candidate labels each (4)")
    p.add_argument("--pairs", type=int, default=1600, help="ranking pairs (1600)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds per peer timing (30)")
    return p.parse_args(argv)


def ensure_pair_model(root: Path, name: str, config: dict[str, object]) -> Path:
    """A bert-base sequence classifier with `config`, seeded random weights, cached."""

    def classifier() -> Any:
        from transformers import BertConfig, BertForSequenceClassification

        options = dict(config)
        if "id2label" in options:
            labels = options["id2label"]
            assert isinstance(labels, dict)
            options["label2id"] = {v: k for k, v in labels.items()}
        return BertForSequenceClassification(BertConfig(**options))

    return fixtures.ensure_seeded_model(root / name, classifier)


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def timed(call: Callable[[int, int], int], total: int, chunk: int, budget: float) -> float:
    """Items per second of `call(start, stop)` over chunks, until all or `budget` seconds."""
    call(0, min(chunk, total))  # warm-up
    done, started = 0, time.perf_counter()
    while done < total and time.perf_counter() - started < budget:
        done += call(done, min(done + chunk, total))
    return done / (time.perf_counter() - started)


def best_peer(name: str, rate_of: Callable[[int], float]) -> float:
    best = 0.0
    for batch_size in PEER_BATCH_SIZES:
        with measure.OtherLoad() as others:
            rate = rate_of(batch_size)
        print(f"  {name} batch {batch_size}: {rate:.1f}/s, others {others.share:.0%}", flush=True)
        best = max(best, rate)
    return best


def zero_shot_row(root: Path, work: Path, args: argparse.Namespace, cores: int) -> float:
    import torch
    from transformers import pipeline

    model = ensure_pair_model(root, "bert-base-nli", NLI)
    artifact, _ = fixtures.ensure_artifact(root, model, "nli-default", [])
    texts = fixtures.make_corpus(args.docs).texts
    labels = LABELS[: args.labels]
    write_jsonl(
        work / "zs" / "part-0.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    )
    flags = ["--task", "zero-shot-classification", "--candidate-labels", ",".join(labels)]
    with measure.OtherLoad() as others:
        result = measure.batchjob_run(artifact, work / "zs", work / "zs-out", flags)
    ours = result.documents / result.pipeline_seconds
    print(
        f"  batchjob: {result.documents} docs × {len(labels)} labels in {result.batches} "
        f"batches, {result.pipeline_seconds:.1f}s: {ours:.1f} docs/s, others {others.share:.0%}",
        flush=True,
    )
    torch.set_num_threads(cores)
    classify = pipeline(
        "zero-shot-classification", model=str(model), dtype=fixtures.bench_torch_dtype()
    )

    def rate(batch_size: int) -> float:
        def call(a: int, b: int) -> int:
            out = classify(texts[a:b], candidate_labels=labels, batch_size=batch_size)
            return len(out)

        return timed(call, len(texts), max(48, batch_size), args.budget)

    peer = best_peer("pipeline", rate)
    return ours / peer


def ranking_row(root: Path, work: Path, args: argparse.Namespace, cores: int) -> float:
    import torch
    from sentence_transformers import CrossEncoder

    model = ensure_pair_model(root, "bert-base-cross-encoder", {"num_labels": 1})
    artifact, _ = fixtures.ensure_artifact(root, model, "cross-encoder-default", [])
    texts = fixtures.make_corpus(args.pairs + 1).texts
    pairs = [(texts[i], texts[i + 1]) for i in range(args.pairs)]
    rows = [
        {"id": str(i), "query": q, "passage": p, "qid": i // 20} for i, (q, p) in enumerate(pairs)
    ]
    write_jsonl(work / "rank" / "part-0.jsonl", rows)
    flags = ["--task", "text-ranking", "--text-field", "query", "--text-pair-field", "passage"]
    flags += ["--group-field", "qid"]
    with measure.OtherLoad() as others:
        result = measure.batchjob_run(artifact, work / "rank", work / "rank-out", flags)
    ours = result.documents / result.pipeline_seconds
    print(
        f"  batchjob: {result.documents} pairs in {result.batches} batches, "
        f"{result.pipeline_seconds:.1f}s: {ours:.1f} pairs/s, others {others.share:.0%}",
        flush=True,
    )
    torch.set_num_threads(cores)
    encoder = CrossEncoder(str(model), model_kwargs={"dtype": fixtures.bench_torch_dtype()})

    def rate(batch_size: int) -> float:
        def call(a: int, b: int) -> int:
            return len(encoder.predict(pairs[a:b], batch_size=batch_size))

        return timed(call, len(pairs), max(48, batch_size), args.budget)

    peer = best_peer("CrossEncoder", rate)
    return ours / peer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(ENVIRONMENT)
    root = fixtures.cache_root(REPO)
    cores = os.cpu_count() or 1
    print(f"pair tasks bench: {fixtures.cpu_family()}, {cores} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="batchjob-pairs-bench-") as tmp:
        work = Path(tmp)
        print(f"zero-shot-classification: {args.docs} docs, {args.labels} labels", flush=True)
        zero_shot = zero_shot_row(root, work, args, cores)
        print(f"text-ranking: {args.pairs} (query, passage) pairs", flush=True)
        ranking = ranking_row(root, work, args, cores)
    print(f"zero-shot-classification: batchjob / pipeline = {zero_shot:.2f}x")
    print(f"text-ranking: batchjob / CrossEncoder.predict = {ranking:.2f}x")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

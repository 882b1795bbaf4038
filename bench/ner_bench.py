"""`make bench`'s row for token classification (NER): `batchjob run` against transformers'
`pipeline("token-classification", aggregation_strategy="simple")` at its best batch size, on
the same documents (the bench's short corpus, bench/fixtures.py), in the same run.

The model is bert-base shaped (BertConfig() defaults) with CoNLL's nine labels, seeded
random weights and MiniLM's tokenizer (128 tokens), as the other rows' classifier: random
labels change from token to token, so entities are many, the host's aggregation work the
most it gets. Both sides run the bench's dtype (bf16 where native, else fp32) on every
core: the pipeline on `nproc` threads (warmed up, timed until done or its budget is spent),
`batchjob run` with its defaults (packing, a
replica per core), timed from replicas ready to the last shard written (the manifest's
pipeline_seconds) and also end to end (wall, start-up included).

    .venv/bin/python bench/ner_bench.py [--docs 1200] [--budget 30]

Target: batchjob ≥ 2× the pipeline's best, in documents per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fixtures
import measure
import peers

REPO = Path(__file__).resolve().parent.parent
TARGET = 2.0
BATCH_SIZES = (1, 8, 32, 64)
LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=1200, help="documents (1200)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds per pipeline batch size")
    return p.parse_args(argv)


def ensure_ner_model(root: Path) -> Path:
    """bert-base, CoNLL's labels, seeded random weights, MiniLM's tokenizer (128 tokens)."""

    def tagger() -> Any:
        from transformers import BertConfig, BertForTokenClassification

        config = BertConfig(
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)},
        )
        return BertForTokenClassification(config)

    return fixtures.ensure_seeded_model(root / "bert-base-ner", tagger)


class NerPipeline(peers.HfPipeline):
    """transformers' token-classification pipeline, aggregation simple, the bench's dtype, on
    `threads` threads (it truncates to the tokenizer's 128 tokens itself)."""

    def __init__(self, model: Path, threads: int) -> None:
        import torch
        from transformers import pipeline

        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.pipe = pipeline(
            "token-classification",
            model=str(model),
            dtype=fixtures.bench_torch_dtype(),
            device="cpu",
            aggregation_strategy="simple",
        )
        self.load_seconds = time.perf_counter() - started
        self.options = {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(ENVIRONMENT)
    root = fixtures.cache_root(REPO)
    root.mkdir(parents=True, exist_ok=True)
    model = ensure_ner_model(root)
    artifact, _ = fixtures.ensure_artifact(root, model, "ner", [])
    cores = os.cpu_count() or 1
    print(f"token-classification bench: {fixtures.cpu_family()}, {cores} cores", flush=True)
    print(f"artifact: {artifact}")
    corpus = fixtures.make_corpus(args.docs)
    print(f"corpus: {len(corpus.texts)} docs, {int(corpus.real_tokens(128).sum())} real tokens")
    hf = NerPipeline(model, cores)
    rates: dict[int, float] = {}
    for batch_size in BATCH_SIZES:
        with measure.OtherLoad() as others:
            documents, seconds = hf.time(corpus.texts, batch_size, args.budget)
        rates[batch_size] = documents / seconds
        print(
            f"pipeline batch {batch_size}: {documents} docs in {seconds:.1f}s, "
            f"{rates[batch_size]:.1f} docs/s, others {others.share:.0%}",
            flush=True,
        )
    best = max(rates, key=lambda b: rates[b])
    with tempfile.TemporaryDirectory(prefix="batchjob-ner-bench-") as tmp:
        corpus.write(Path(tmp) / "in", shards=2)
        with measure.OtherLoad() as others:
            result = measure.batchjob_run(artifact, Path(tmp) / "in", Path(tmp) / "out")
    rate = result.documents / result.pipeline_seconds
    # Where batchjob's time went: the replicas' share busy (the model), and the main
    # process's (reading, tokenizing, aggregating entities, writing) on its one core.
    use = result.cpu
    where = (
        f"; replicas busy {use.replica_busy:.0%}, preempted {use.replica_preempted:.0%}, "
        f"main process {use.main_busy:.0%} of a core"
        if use is not None
        else ""
    )
    print(
        f"batchjob run: {result.documents} docs in {result.pipeline_seconds:.1f}s "
        f"({result.wall_seconds:.1f}s wall, start-up included), {rate:.1f} docs/s, "
        f"others {others.share:.0%}{where}",
        flush=True,
    )
    # The pipeline's best once more: the best timing counts (a burst of other load during
    # one timing must not make it look slow).
    with measure.OtherLoad() as others:
        documents, seconds = hf.time(corpus.texts, best, args.budget)
    rates[best] = max(rates[best], documents / seconds)
    ratio = rate / rates[best]
    wall = result.documents / result.wall_seconds / rates[best]
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(
        f"batchjob / pipeline (batch {best}), documents per second: {rate:.1f} / "
        f"{rates[best]:.1f} = {ratio:.2f}x ({wall:.2f}x with batchjob's start-up) "
        f"(target ≥ {TARGET}x): {verdict}"
    )
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

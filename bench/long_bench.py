"""`make bench`'s row for long documents: `batchjob run --long-documents chunk` over documents
of a few thousand tokens each, against `batchjob run` over the bench's short documents
(bench/fixtures.py), on the same artifact (the bench's bert-base, default configuration), in
the same run, alternately.

A long document runs as windows of the compiled length (128 by default) that overlap by
`--chunk-overlap` tokens; the rate compared is the model's: real tokens run per second of
the pipeline (the manifests' `real_tokens` and `pipeline_seconds`; a window's tokens are
its slice's, special tokens included, overlap counted each time it runs). The documents'
own tokens per second, overlap counted once, are shown beside it.

    .venv/bin/python bench/long_bench.py [--long-docs 40] [--long-tokens 3000] [--repeats 1]

Target: long ≥ 0.9 × short, in real tokens per second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import fixtures
import measure
import numpy as np

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.9
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=1200, help="short documents (1200)")
    p.add_argument("--long-docs", type=int, default=40, help="long documents (40)")
    p.add_argument("--long-tokens", type=int, default=3000, help="tokens per long doc (3000)")
    p.add_argument("--overlap", type=int, default=32, help="--chunk-overlap (32)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, alternately (1)")
    p.add_argument("--artifact", type=Path, help="a compiled artifact instead of the bench's")
    return p.parse_args(argv)


def long_corpus(n: int, tokens: int, seed: int = fixtures.SEED) -> list[str]:
    """`n` documents of about `tokens` tokens: random whole words of MiniLM's vocabulary (one
    token each), with punctuation, so that words and sentences are as in prose."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixtures.tokenizer_source())
    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and w.islower())
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        picked = [words[j] for j in rng.integers(0, len(words), size=tokens)]
        for k in range(11, len(picked), 12):  # a sentence every 12 words ("." is a token)
            picked[k] += "."
        texts.append(" ".join(picked[: math.ceil(tokens * 12 / 13)]))
    return texts


def write(directory: Path, texts: list[str], shards: int = 2) -> None:
    directory.mkdir(parents=True)
    bounds = np.linspace(0, len(texts), shards + 1).astype(int)
    for k in range(shards):
        with open(directory / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            for i in range(bounds[k], bounds[k + 1]):
                f.write(json.dumps({"id": f"doc-{i}", "text": texts[i]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(ENVIRONMENT)
    root = fixtures.cache_root(REPO)
    if args.artifact is not None:
        artifact = args.artifact
    else:
        model = fixtures.ensure_model(root)
        artifact, _ = fixtures.ensure_artifact(root, model, "default", [])
    cpu = fixtures.cpu_info()
    print(f"long documents bench: {cpu.get('model name', '?')}, cpu family {cpu.get('cpu family')}")
    print(f"artifact: {artifact}")
    short = fixtures.make_corpus(args.docs)
    texts = long_corpus(args.long_docs, args.long_tokens)
    flags = ["--long-documents", "chunk", "--chunk-overlap", str(args.overlap)]
    rates: dict[str, list[float]] = {"short": [], "long": []}
    doc_rates: list[float] = []
    windows = 0
    with tempfile.TemporaryDirectory(prefix="batchjob-long-bench-") as tmp:
        work = Path(tmp)
        write(work / "short", short.texts)
        write(work / "long", texts)
        for k in range(args.repeats):
            for name in ("short", "long"):
                out = work / f"out-{name}-{k}"
                with measure.OtherLoad() as others:
                    result = measure.batchjob_run(
                        artifact, work / name, out, flags if name == "long" else []
                    )
                rate = result.real_tokens / result.pipeline_seconds
                rates[name].append(rate)
                line = (
                    f"{name}: {result.documents} docs, {result.real_tokens} real tokens in "
                    f"{result.batches} batches, {result.pipeline_seconds:.1f}s: "
                    f"{rate:.0f} tokens/s, others {others.share:.0%}"
                )
                if name == "long":
                    counts = json.loads((out / "_manifest.json").read_text())["counts"]
                    windows = counts["windows"]
                    own = args.long_docs * args.long_tokens  # about: see long_corpus
                    doc_rates.append(own / result.pipeline_seconds)
                    line += f" ({windows} windows; the documents' own ~{doc_rates[-1]:.0f}/s)"
                print(line, flush=True)
    short_rate, long_rate = statistics.median(rates["short"]), statistics.median(rates["long"])
    ratio = long_rate / short_rate
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(
        f"long / short, real tokens per second: {long_rate:.0f} / {short_rate:.0f} = "
        f"{ratio:.2f}x (target ≥ {TARGET}x): {verdict}"
    )
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

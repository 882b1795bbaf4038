"""Sequence packing: several documents per row give the same outputs as each alone.

For every supported family, a tiny random model is compiled with packing (fp32) and each
document's packed output is compared with the eager Hugging Face model run on it alone.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchjob.artifact import Artifact
from batchjob.batching import Item, PackingBatcher, Shape
from batchjob.compile import compile_artifact
from batchjob.config import CompileSpec
from batchjob.records import Record
from batchjob.tokens import RecordTokenizer
from tests.conftest import make_texts, minilm_path, outputs_by_key

TINY = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 30522}


def family_config(kind: str, labels: int) -> Any:
    from transformers import AutoConfig

    extra: dict[str, Any] = {"num_labels": labels}
    if kind == "distilbert":
        extra |= {"dim": 32, "n_heads": 4, "hidden_dim": 64, "n_layers": 2, "vocab_size": 30522}
    elif kind == "modernbert":
        # A window of 16 tokens (8 each side): documents are longer, so it matters.
        extra |= TINY | {"num_hidden_layers": 3, "local_attention": 16, "pad_token_id": 0}
        extra |= {"global_attn_every_n_layers": 3}
    else:
        extra |= TINY | {"num_hidden_layers": 2}
        if kind in ("roberta", "xlm-roberta"):
            extra["pad_token_id"] = 0  # the tokenizer's; positions then start at 1
        if kind == "electra":
            extra["embedding_size"] = 32
    return AutoConfig.for_model(kind, **extra)


def build(kind: str, task: str, root: Path) -> Path:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = auto.from_config(family_config(kind, 3)).eval()
    path = root / f"{kind}-{task}"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def packed_outputs(artifact: Artifact, texts: list[str]) -> tuple[np.ndarray, float]:
    """Outputs per text, in order, through the real tokenizer, packing batcher and graph."""
    tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
    encoded = tokenizer.encode([Record(str(i), t) for i, t in enumerate(texts)])
    batcher = PackingBatcher(
        artifact.shapes[0],
        max_segments=artifact.max_segments,
        position_offset=artifact.position_offset,
        sort_window=64,
        pad_id=tokenizer.pad_id,
    )
    items = [Item(i, e.ids, e.type_ids) for i, e in enumerate(encoded) if e is not None]
    batches = batcher.add(items) + batcher.flush()
    found = outputs_by_key(artifact, batches)
    fill = sum(b.real_tokens for b in batches) / sum(
        b.shape.batch_size * b.shape.seq_len for b in batches
    )
    return np.stack([found[i] for i in range(len(texts))]), fill


def eager_outputs(model_dir: Path, task: str, texts: list[str], max_length: int) -> np.ndarray:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = auto.from_pretrained(model_dir, attn_implementation="eager").eval()
    accepted = {"input_ids"} | (
        {"token_type_ids"} & set(inspect.signature(model.forward).parameters)
    )
    rows = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            out = model(**{k: v for k, v in enc.items() if k in accepted})
            if task == "text-classification":
                rows.append(out.logits[0].numpy())
            else:
                pooled = out.last_hidden_state[0].mean(0)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
@pytest.mark.parametrize(
    "kind", ["bert", "distilbert", "roberta", "xlm-roberta", "electra", "modernbert"]
)
def test_packed_equals_each_document_alone(kind: str, task: str, tmp_path: Path) -> None:
    model_dir = build(kind, task, tmp_path)
    artifact = compile_artifact(
        CompileSpec(
            model=str(model_dir), task=task, dtype="fp32", shapes=(Shape(64, 3),), packing=True
        ),
        str(tmp_path / "artifact"),
    )
    assert artifact.strategy == "packing"
    assert artifact.max_segments == 8
    texts = make_texts(40, seed=7, max_words=30)  # fixed: hash(kind) varies per process
    got, fill = packed_outputs(artifact, texts)
    want = eager_outputs(model_dir, task, texts, artifact.max_length)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert fill > 0.8  # documents of 3 to 32 tokens in rows of 64


def test_unsupported_family_falls_back_to_buckets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config

    config = DebertaV2Config(num_hidden_layers=2, **TINY, num_labels=2)
    model_dir = tmp_path / "deberta"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    caplog.set_level(logging.INFO, logger="batchjob.compile")
    artifact = compile_artifact(
        CompileSpec(model=str(model_dir), dtype="fp32", shapes=(Shape(32, 2),)),
        str(tmp_path / "artifact"),
    )
    assert artifact.strategy == "buckets"
    fallback = [r.getMessage() for r in caplog.records if "can't be packed" in r.getMessage()]
    assert len(fallback) == 1
    assert "deberta-v2" in fallback[0]


def test_packing_is_the_default_and_calibrate_picks_the_shape(
    classifier_dir: Path, tmp_path: Path
) -> None:
    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(make_texts(300, seed=1, max_words=20)) + "\n")
    artifact = compile_artifact(
        CompileSpec(model=str(classifier_dir), dtype="fp32", calibrate=str(sample)),
        str(tmp_path / "artifact"),
    )
    assert artifact.strategy == "packing"
    (shape,) = artifact.shapes
    assert shape.seq_len == 32  # 99% of the sample fits in 32 tokens
    assert shape.batch_size == 1024 // 32
    assert 2 <= artifact.max_segments <= 16


def test_packing_batcher_keeps_every_item_once_and_fills_rows() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, size=500)
    batcher = PackingBatcher(Shape(64, 4), max_segments=6, position_offset=2, sort_window=100)
    items = [Item(i, [7] * int(n)) for i, n in enumerate(lengths)]
    batches = batcher.add(items[:250]) + batcher.add(items[250:]) + batcher.flush()
    keys = [k for b in batches for k in b.keys if k is not None]
    assert sorted(keys) == list(range(500))  # type: ignore[type-var]
    for batch in batches:
        seg, pos = batch.arrays["segment_ids"], batch.arrays["position_ids"]
        assert batch.arrays["input_ids"].shape == (4, 64)
        assert batch.arrays["segment_index"].shape == (4, 6)
        assert len(batch.keys) == 4 * 6
        for r in range(4):
            for slot in range(6):
                key = batch.keys[r * 6 + slot]
                cols = np.flatnonzero(seg[r] == slot + 1)
                if key is None:
                    assert cols.size == 0
                    continue
                assert cols.size == lengths[key]  # type: ignore[index]
                assert cols[0] == batch.arrays["segment_index"][r, slot]
                assert list(pos[r, cols]) == list(range(2, 2 + cols.size))
    real = sum(b.real_tokens for b in batches)
    assert real == lengths.sum()
    assert real / sum(4 * 64 for _ in batches) > 0.85

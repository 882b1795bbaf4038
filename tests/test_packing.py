"""Sequence packing: several documents per row give the same outputs as each alone.

For every supported family, a tiny random model is compiled with packing (fp32) and each
document's packed output is compared with the eager Hugging Face model run on it alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from batchjob.batching import Item, PackingBatcher, Shape
from batchjob.compile import compile_artifact
from batchjob.config import CompileSpec
from tests.conftest import make_texts, minilm_path
from tests.family_models import TINY, build, eager_outputs, packed_outputs


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
@pytest.mark.parametrize(
    "kind", ["bert", "distilbert", "roberta", "xlm-roberta", "electra", "modernbert", "mpnet"]
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


def test_mpnet_is_packed_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """all-mpnet-base-v2's family: packing with no flag, positions from MPNet's fixed
    padding_idx (1) + 1 whatever its config's pad_token_id (here the tokenizer's, 30523)."""
    model_dir = build("mpnet", "text-classification", tmp_path)
    caplog.set_level(logging.INFO, logger="batchjob.compile")
    artifact = compile_artifact(
        CompileSpec(model=str(model_dir), dtype="fp32", shapes=(Shape(64, 3),)),
        str(tmp_path / "artifact"),
    )
    assert (artifact.strategy, artifact.position_offset) == ("packing", 2)
    assert not [r for r in caplog.records if "can't be packed" in r.getMessage()]


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

"""The last layer computed for each segment's first token only (first_tokens.py): where the
graph reads nothing else of it, the same outputs as the whole layer, for every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchjob import first_tokens
from batchjob.batching import Shape
from batchjob.compile import packed_example
from batchjob.graphs import EncoderGraph, position_offset
from batchjob.models import load_model
from tests.family_models import build

SHAPE = Shape(64, 3)
MAX_SEGMENTS = 6
CASES = [
    *((kind, "text-classification", "auto") for kind in first_tokens.FAMILIES),
    *((kind, "feature-extraction", "cls") for kind in first_tokens.FAMILIES),
]


def graph(model_dir: Path, task: str, pooling: str, packed: bool) -> EncoderGraph:
    loaded = load_model(str(model_dir), task, torch.float32, pooling, normalize=False)
    return EncoderGraph(loaded, uses_token_types=True, packed=packed).eval()


@pytest.mark.parametrize("packed", [True, False], ids=["packing", "buckets"])
@pytest.mark.parametrize(("kind", "task", "pooling"), CASES)
def test_first_tokens_only_equals_the_whole_last_layer(
    kind: str,
    task: str,
    pooling: str,
    packed: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir = build(kind, task, tmp_path)
    short = graph(model_dir, task, pooling, packed)
    assert short.last is not None
    layers = short.model.base_model.config.num_hidden_layers
    stack = short.model.base_model
    left = stack.transformer.layer if kind == "distilbert" else stack.encoder.layer
    assert len(left) == layers - 1  # the model stops one layer short

    monkeypatch.setattr(first_tokens, "applies", lambda *_: False)
    whole = graph(model_dir, task, pooling, packed)
    assert whole.last is None

    inputs = packed_example(SHAPE, MAX_SEGMENTS, position_offset(short.config), 100)
    segment_ids = inputs[3]
    slots = torch.arange(1, MAX_SEGMENTS + 1)
    # The host reads the slots that hold a document; an empty one's output is nobody's.
    used = (segment_ids[:, None, :] == slots[None, :, None]).any(-1)  # (B, K)
    if not packed:  # (input_ids, attention mask, token types): one document a row
        inputs = (inputs[0], (segment_ids == 1).long(), inputs[2])
        used = used[:, 0]
    with torch.inference_mode():
        got, want = short(*inputs), whole(*inputs)
    assert used.sum() >= SHAPE.batch_size
    torch.testing.assert_close(got[used], want[used], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "task", "pooling"),
    [
        ("bert", "feature-extraction", "mean"),  # every token is read
        ("bert", "feature-extraction", "cls+mean"),
        ("bert", "token-classification", "auto"),
        ("modernbert", "text-classification", "auto"),  # pre-norm, rotary: runs whole
    ],
)
def test_the_whole_last_layer_where_more_is_read(kind: str, task: str, pooling: str) -> None:
    from tests.family_models import family_config

    assert not first_tokens.applies(family_config(kind, 2), task, pooling)

"""Tiny pair-task models for the tests (random weights, built here, never downloaded): a BERT
NLI classifier and a one-logit cross-encoder saved by sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchjob.batching import Shape
from tests.conftest import _save_tokenizer, _tiny_config

NLI_LABELS = ("contradiction", "neutral", "entailment")
TOPICS = ["sports", "politics", "science fiction", "music"]
BUCKETS = (Shape(16, 4), Shape(32, 4), Shape(64, 2))
PACKED = (Shape(96, 3),)


@pytest.fixture(scope="session")
def nli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-label BERT NLI classifier (entailment is label 2), random weights."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(5)
    config = _tiny_config(
        num_labels=3,
        id2label=dict(enumerate(NLI_LABELS)),
        label2id={label: i for i, label in enumerate(NLI_LABELS)},
    )
    path = tmp_path_factory.mktemp("nli")
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # logits of order 1: scores that differ, an order that means something
        model.classifier.weight.mul_(100)
    model.save_pretrained(path)
    _save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-logit BERT cross-encoder, saved by sentence-transformers' CrossEncoder."""
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    torch.manual_seed(6)
    raw = tmp_path_factory.mktemp("ce_raw")
    model = BertForSequenceClassification(_tiny_config(num_labels=1)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    model.save_pretrained(raw)
    _save_tokenizer(raw)
    path = tmp_path_factory.mktemp("cross_encoder")
    CrossEncoder(str(raw)).save(str(path))
    return path

"""Tiny random token classifiers (BERT, RoBERTa, DistilBERT) with the labels of a NER model,
their tokenizers as the hub has them (tokenizer_families.py), and what transformers'
pipeline answers for them: what the token-classification tests compare against."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from batchjob.artifact import Artifact, ArtifactLoader
from batchjob.batching import Item
from batchjob.engine import engine_batcher
from batchjob.output_format import OutputFormat, make_head
from batchjob.records import Record
from batchjob.token_classification import TokenClassification
from batchjob.token_spans import token_rows
from batchjob.tokens import RecordTokenizer
from tests.tokenizer_families import hub_directory

NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
NER_FAMILIES = ("bert", "roberta", "distilbert")
# Multi-byte characters, leading and doubled spaces, a word split in pieces, an unknown
# token (the emoji, for WordPiece), accents BERT's normalizer strips.
NER_TEXTS = [
    " Hello wörld, café naïve résumé 中文 😀 files",
    "  leading spaces and  double Paris",
    "John Smith lives in New York",
    "unbelievably tokenization of Ünïcødé naïve résumé",
    "x",
]


def _config(family: str, vocab: int) -> Any:
    from transformers import AutoConfig

    labels = {"id2label": dict(enumerate(NER_LABELS))}
    labels["label2id"] = {label: i for i, label in enumerate(NER_LABELS)}  # type: ignore[misc]
    if family == "distilbert":
        size = {"dim": 32, "n_heads": 4, "hidden_dim": 64, "n_layers": 2}
    else:
        size = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
        size["num_hidden_layers"] = 2
    extra = {"pad_token_id": 1, "max_position_embeddings": 130} if family == "roberta" else {}
    return AutoConfig.for_model(family, vocab_size=vocab, num_labels=5, **labels, **size, **extra)


def build_ner_model(family: str, root: Path, bytelevel: Path, unigram: Path) -> Path:
    """A token classifier of `family`, random weights (seeded), saved with its tokenizer."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        hub_directory(family, root / "hub", bytelevel, unigram)
    )
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(_config(family, len(tokenizer))).eval()
    # Larger logits than the initialisation gives: labels then change from token to token,
    # so that every grouping rule is exercised.
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    path = root / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=NER_FAMILIES)
def ner_model(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bytelevel_dir: Path,
    unigram_dir: Path,
) -> Path:
    root = tmp_path_factory.mktemp(f"ner-{request.param}")
    return build_ner_model(request.param, root, bytelevel_dir, unigram_dir)


@pytest.fixture(scope="session")
def bert_ner(
    tmp_path_factory: pytest.TempPathFactory, bytelevel_dir: Path, unigram_dir: Path
) -> Path:
    return build_ner_model("bert", tmp_path_factory.mktemp("ner-bert"), bytelevel_dir, unigram_dir)


@functools.cache
def _predict(path: str) -> Any:
    return ArtifactLoader(path)()


def entities_of(artifact: Artifact, texts: list[str], aggregation: str) -> list[Any]:
    """Each text's entities through the real tokenizer, batcher, graphs and head (the
    engine's steps, in this process)."""
    tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
    tokenizer.keep_spans()
    encoded = tokenizer.encode([Record(str(i), t) for i, t in enumerate(texts)])
    batcher = engine_batcher(artifact, tokenizer.pad_id, sort_window=64)
    items = [Item(i, e.ids, e.type_ids) for i, e in enumerate(encoded) if e is not None]
    predict = _predict(artifact.path)
    head = make_head(artifact, OutputFormat(aggregation=aggregation), calibrate=False)
    assert isinstance(head, TokenClassification)
    found: dict[int, Any] = {}
    for batch in batcher.add(items) + batcher.flush():
        rows = token_rows(batch, predict(batch.arrays))
        keys = [(j, int(k)) for j, k in enumerate(batch.keys) if k is not None]  # type: ignore[call-overload]
        spans = [encoded[k].spans for _, k in keys]  # type: ignore[union-attr]
        columns = head.entity_columns([rows[j] for j, _ in keys], spans)  # type: ignore[arg-type]
        found |= {k: e for (_, k), e in zip(keys, columns["entities"], strict=True)}
    return [found[i] for i in range(len(texts))]


def assert_same_entities(actual: list[Any], expected: list[Any]) -> None:
    """The same entities (every field but the score equal), scores within 1e-4."""
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys(), (a, e)
        assert {k: v for k, v in a.items() if k != "score"} == {
            k: (int(v) if k in ("start", "end", "index") else v)
            for k, v in e.items()
            if k != "score"
        }, (a, e)
        assert abs(float(a["score"]) - float(e["score"])) < 1e-4, (a, e)

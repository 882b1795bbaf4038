"""Token classification (`entities.py`, `token_spans.py`, `token_classification.py`): the
same entities as transformers' pipeline, for every aggregation strategy, over BERT
(WordPiece), RoBERTa (byte-level BPE offsets) and DistilBERT, buckets and packing."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from batchjob.batching import Shape
from batchjob.entities import AGGREGATIONS, merge_overlapping
from batchjob.errors import UsageError
from batchjob.output_format import OutputFormat, make_head
from batchjob.records import Record
from batchjob.token_classification import TokenClassification, chunk_rows, entity_type
from batchjob.tokens import RecordTokenizer
from tests.conftest import CompileFn, long_text
from tests.ner_models import (
    NER_LABELS,
    NER_TEXTS,
    assert_same_entities,
    bert_ner,
    entities_of,
    ner_model,
)

__all__ = ["bert_ner", "ner_model"]  # fixtures


@functools.cache
def _pipeline(model: Path, max_length: int | None = None) -> Any:
    """transformers' pipeline for `model` (once per model: the strategy goes with each call)."""
    from transformers import AutoTokenizer, pipeline

    kwargs = {} if max_length is None else {"model_max_length": max_length}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    return pipeline("token-classification", model=str(model), tokenizer=tokenizer)


# Byte-level BPE has no word-piece marker: the pipeline warns that it guesses words.
@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("packing", [False, True], ids=["buckets", "packing"])
def test_entities_equal_the_pipelines_for_every_aggregation(
    ner_model: Path, compiled: CompileFn, packing: bool
) -> None:
    shapes = (Shape(64, 4),) if packing else (Shape(16, 4), Shape(64, 2))
    artifact = compiled(ner_model, shapes=shapes, packing=packing)
    assert artifact.task == "token-classification"
    assert artifact.strategy == ("packing" if packing else "buckets")
    assert artifact.labels == NER_LABELS
    seen = 0
    for aggregation in AGGREGATIONS:
        pipe = _pipeline(ner_model)
        found = entities_of(artifact, NER_TEXTS, aggregation)
        for text, entities in zip(NER_TEXTS, found, strict=True):
            assert_same_entities(entities, pipe(text, aggregation_strategy=aggregation))
            seen += len(entities)
    assert seen > 20  # the labels vary: entities were compared, not empty lists


def test_truncated_texts_keep_the_entities_within_the_compiled_length(
    bert_ner: Path, compiled: CompileFn
) -> None:
    artifact = compiled(bert_ner, shapes=(Shape(16, 4), Shape(64, 2)))
    # The second is longer than the tokenizer's whole-text limit (16 × 64 + 4 × 256 chars):
    # it is tokenized from a prefix.
    texts = [long_text(60, seed=1), long_text(900, seed=2)]
    assert len(texts[1]) > RecordTokenizer(artifact.tokenizer_path, 64).long_text
    pipe = _pipeline(bert_ner, max_length=64)
    for text, entities in zip(texts, entities_of(artifact, texts, "first"), strict=True):
        assert_same_entities(entities, pipe(text, aggregation_strategy="first"))
    tokenizer = RecordTokenizer(artifact.tokenizer_path, 64)
    tokenizer.keep_spans()
    encoded = tokenizer.encode([Record("a", t) for t in texts])
    assert all(e is not None and e.truncated and len(e.ids) == 64 for e in encoded)


def test_the_column_type_and_what_the_metadata_records(bert_ner: Path, compiled: CompileFn) -> None:
    artifact = compiled(bert_ner)
    head = make_head(artifact, OutputFormat(), calibrate=False)
    assert isinstance(head, TokenClassification)
    assert head.aggregation == "simple"
    assert head.describe() == {
        "labels": list(NER_LABELS),
        "aggregation": "simple",
        "ignore_labels": ["O"],
    }
    grouped = entity_type("simple")
    assert [f.name for f in grouped] == ["entity_group", "score", "word", "start", "end"]
    assert [f.name for f in entity_type("none")] == [
        "entity",
        "score",
        "index",
        "word",
        "start",
        "end",
    ]
    assert grouped.field("score").type == pa.float32()
    assert grouped.field("start").type == pa.int32()
    found = entities_of(artifact, NER_TEXTS, "simple")
    pa.array(found, pa.list_(grouped))  # the values fit the column as they are


def test_options_that_do_not_apply_are_refused(
    bert_ner: Path, classifier_dir: Path, compiled: CompileFn
) -> None:
    ner, classifier = compiled(bert_ner), compiled(classifier_dir)
    with pytest.raises(UsageError, match="--aggregation must be one of none, simple"):
        OutputFormat(aggregation="mean")
    with pytest.raises(UsageError, match="--aggregation applies to token-classification"):
        make_head(classifier, OutputFormat(aggregation="first"), calibrate=False)
    with pytest.raises(UsageError, match="--multi-label and --threshold apply"):
        make_head(ner, OutputFormat(multi_label=True), calibrate=False)
    head = make_head(ner, OutputFormat(), calibrate=False)
    with pytest.raises(UsageError, match="--long-documents mean does not apply"):
        chunk_rows(head, "mean")
    assert chunk_rows(head, "chunk") is False  # a row per document
    assert chunk_rows(make_head(classifier, OutputFormat(), calibrate=False), "chunk") is True


def test_overlapping_entities_merge_as_the_pipeline_merges_chunks(bert_ner: Path) -> None:
    pipe = _pipeline(bert_ner)
    rng = np.random.default_rng(0)
    for _ in range(50):
        found = []
        for _ in range(rng.integers(0, 12)):
            start = int(rng.integers(0, 40))
            end = start + int(rng.integers(1, 8))
            score = float(rng.choice([0.5, 0.7, 0.9]))
            found.append({"entity_group": "PER", "score": score, "start": start, "end": end})
        assert merge_overlapping(found) == pipe.aggregate_overlapping_entities(list(found))

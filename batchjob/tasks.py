"""A run's head: what it makes of the graph's outputs. Its result columns and their Arrow
types, how a long document's windows combine, and what the output's metadata says about them.

The artifact holds what was compiled; a head adds this run's choices (`output_format.make_head`:
`--multi-label`, `--threshold`, the embedding options), so one artifact serves runs that label
or write embeddings differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import numpy as np
import pyarrow as pa

from batchjob.pair_tasks import Ranking, ZeroShot
from batchjob.token_classification import TokenClassification, token_head

if TYPE_CHECKING:  # artifact.py imports config.py, which imports output_format.py and this
    from batchjob.artifact import Artifact
    from batchjob.embeddings import Embedder

Fields: TypeAlias = "list[pa.Field[pa.DataType]]"


def _activate(logits: np.ndarray, function: str) -> np.ndarray:
    if function == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
        return probs
    if function == "sigmoid":
        sig: np.ndarray = 1.0 / (1.0 + np.exp(-logits))
        return sig
    return logits


@dataclass(frozen=True)
class Classification:
    """Logits → `label`, `score` and `scores` (in label order), as the pipeline's
    text-classification; multi-label adds `labels`: every label scoring ≥ threshold."""

    labels: tuple[str, ...]
    activation: str = "none"  # as run: softmax, sigmoid (always with multi-label) or none
    multi_label: bool = False
    threshold: float = 0.5
    task: ClassVar[str] = "text-classification"
    embedder: ClassVar[None] = None

    def fields(self) -> Fields:
        fields: Fields = [
            pa.field("label", pa.string()),
            pa.field("score", pa.float32()),
            pa.field("scores", pa.list_(pa.float32())),
        ]
        if self.multi_label:  # single-label outputs keep their schema
            fields.append(pa.field("labels", pa.list_(pa.string())))
        return fields

    def columns(self, outputs: np.ndarray) -> dict[str, list[Any]]:
        """Rows of logits (N, labels) → one list per column, N values each."""
        scores = _activate(outputs.astype(np.float32), self.activation)
        best = scores.argmax(axis=-1)
        columns: dict[str, list[Any]] = {
            "label": [self.labels[i] for i in best],
            "score": list(scores[np.arange(len(best)), best]),
            "scores": list(scores),
        }
        if self.multi_label:  # in label order, as `scores`
            chosen = scores >= np.float32(self.threshold)
            columns["labels"] = [[self.labels[i] for i in np.flatnonzero(row)] for row in chosen]
        return columns

    def combine(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """A long document's windows: the plain mean of their logits (activated after)."""
        mean: np.ndarray = rows.mean(axis=0)
        return mean

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "labels": list(self.labels),  # the order of `scores`
            "function_to_apply": self.activation,
            "multi_label": self.multi_label,
        }
        if self.multi_label:
            described["threshold"] = self.threshold
        return described


@dataclass(frozen=True)
class Embeddings:
    """Pooled vectors → `embedding`, written as the embedder says (float32 lists without)."""

    embedder: Embedder | None = None
    normalize: bool = True  # the model's: a long document's mean is normalised again
    task: ClassVar[str] = "feature-extraction"

    def fields(self) -> Fields:
        kind = pa.list_(pa.float32()) if self.embedder is None else self.embedder.arrow_type()
        return [pa.field("embedding", kind)]

    def columns(self, outputs: np.ndarray) -> dict[str, list[Any]]:
        vectors = outputs.astype(np.float32) if self.embedder is None else self.embedder(outputs)
        return {"embedding": list(vectors)}

    def combine(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """A long document's windows: their mean weighted by real tokens."""
        pooled: np.ndarray = tokens @ rows / tokens.sum()
        if self.normalize:
            pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        return pooled

    def describe(self) -> dict[str, Any]:
        return {} if self.embedder is None else {"embedding": self.embedder.describe()}


Head = Classification | Embeddings | TokenClassification | ZeroShot | Ranking


def default_head(artifact: Artifact) -> Head:
    """The head with no run-time choices: the artifact's activation, float32 embeddings."""
    if artifact.task == "text-classification":
        return Classification(artifact.labels, artifact.function_to_apply)
    if artifact.task == TokenClassification.task:
        return token_head(artifact)
    return Embeddings(normalize=artifact.normalize)

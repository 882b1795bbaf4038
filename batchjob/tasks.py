"""Per task: the graph's outputs → the task's result columns, and their Arrow types."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from batchjob.artifact import Artifact
from batchjob.embeddings import Embedder


def task_fields(
    task: str, embedder: Embedder | None = None, multi_label: bool = False
) -> list[pa.Field[pa.DataType]]:
    """The task's columns; embeddings typed as `embedder` writes them (list<float32> without).
    `labels` only when `multi_label`: single-label outputs keep their schema."""
    if task == "text-classification":
        fields: list[pa.Field[pa.DataType]] = [
            pa.field("label", pa.string()),
            pa.field("score", pa.float32()),
            pa.field("scores", pa.list_(pa.float32())),
        ]
        if multi_label:
            fields.append(pa.field("labels", pa.list_(pa.string())))
        return fields
    kind = pa.list_(pa.float32()) if embedder is None else embedder.arrow_type()
    return [pa.field("embedding", kind)]


def _activate(logits: np.ndarray, function: str) -> np.ndarray:
    if function == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
        return probs
    if function == "sigmoid":
        sig: np.ndarray = 1.0 / (1.0 + np.exp(-logits))
        return sig
    return logits


def task_columns(
    artifact: Artifact, outputs: np.ndarray, embedder: Embedder | None = None
) -> dict[str, list[Any]]:
    """Rows of graph outputs (N, ...) → one list per task column, N values each."""
    if artifact.task != "text-classification":
        embeddings = outputs.astype(np.float32) if embedder is None else embedder(outputs)
        return {"embedding": list(embeddings)}
    scores = _activate(outputs.astype(np.float32), artifact.activation)
    best = scores.argmax(axis=-1)
    columns: dict[str, list[Any]] = {
        "label": [artifact.labels[i] for i in best],
        "score": list(scores[np.arange(len(best)), best]),
        "scores": list(scores),
    }
    if artifact.multi_label:  # in label order, as `scores`
        chosen = scores >= np.float32(artifact.threshold)
        columns["labels"] = [[artifact.labels[i] for i in np.flatnonzero(row)] for row in chosen]
    return columns

"""A record's outcome (`Result`), and the results of records run as windows, put together.

`--long-documents chunk`: one (span, values) per window. `mean`: one set of values per
record, from its windows' outputs combined as the run's head says (`tasks.py`):
feature-extraction, their mean weighted by each window's real tokens, normalised again where
the model's embeddings are; text-classification, the plain mean of their logits.

The head's columns come last, to each output row's final outputs (each window's with chunk,
the combined one with mean): the activation, and the job's embedder (`--embedding-dim`,
`--embedding-precision`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchjob.pair_tasks import Ranking, ZeroShot
from batchjob.records import Record
from batchjob.tasks import Classification, Embeddings, Head
from batchjob.token_classification import TokenClassification


@dataclass(frozen=True, slots=True)
class Span:
    """Which window of its record a chunk row is: `text[char_start:char_end]`."""

    chunk: int
    char_start: int
    char_end: int


@dataclass(frozen=True, slots=True)
class Ran:
    """A row that ran for record `record` (a window of it): what putting results together
    needs of it, without its token ids (a document of megabytes has many windows)."""

    record: int
    span: Span
    tokens: int  # its real tokens, special tokens included: its weight in a mean


@dataclass(frozen=True, slots=True)
class Result:
    """One record's outcome: the task's values (as the head's `columns` names them), or error.
    With `--long-documents chunk`, `chunks` holds one (span, values) per window instead."""

    values: dict[str, Any] | None
    truncated: bool = False
    error: str | None = None
    chunks: tuple[tuple[Span, dict[str, Any]], ...] = ()
    windows: int = 1  # rows the model ran for it (0 for an error)


def assemble(
    head: Head,
    records: Sequence[Record],
    units: Sequence[Ran],
    failed: dict[int, str],
    outputs: dict[int, np.ndarray],
    mode: str,
) -> list[Result]:
    """One Result per record from its units' graph outputs (`outputs[i]` is units[i]'s)."""
    if isinstance(head, TokenClassification):  # its windows' entities merge as they come
        raise TypeError("token classification's windows are put together by assemble_entities")
    by_record: dict[int, list[int]] = {}
    for i, unit in enumerate(units):
        by_record.setdefault(unit.record, []).append(i)
    results = [
        Result(None, error=failed.get(i, record.error or "no result"), windows=0)
        for i, record in enumerate(records)
    ]
    if not units:
        return results
    if mode == "chunk":
        stacked = np.stack([outputs[i] for i in range(len(units))])
        columns = head.columns(stacked)
        for record, indices in by_record.items():
            chunks = tuple(
                (units[i].span, {name: column[i] for name, column in columns.items()})
                for i in indices
            )
            results[record] = Result(None, chunks=chunks, windows=len(indices))
        return results
    order = list(by_record)
    means = np.stack([_combine(head, units, outputs, by_record[r]) for r in order])
    columns = head.columns(means)
    for j, record in enumerate(order):
        values = {name: column[j] for name, column in columns.items()}
        results[record] = Result(values, windows=len(by_record[record]))
    return results


def _combine(
    head: Classification | Embeddings | ZeroShot | Ranking,
    units: Sequence[Ran],
    outputs: dict[int, np.ndarray],
    indices: list[int],
) -> np.ndarray:
    rows = np.stack([outputs[i] for i in indices]).astype(np.float64)
    if len(indices) == 1:
        first: np.ndarray = rows[0]
        return first
    return head.combine(rows, np.array([units[i].tokens for i in indices], dtype=np.float64))

"""The token-classification head: per-token logits → the `entities` column, aggregated as
transformers' `pipeline("token-classification", aggregation_strategy=...)` does
(`entities.py`), `--aggregation none|simple|first|average|max` (default simple).

Unlike the other heads it needs each record's tokens beside the graph's output (offsets,
special tokens, how the vocabulary spells them: `entities.TokenSpans`), so the engine hands
it both (`entity_columns`).

Long documents: with `--long-documents chunk` a document's windows are run as for the other
tasks, but their entities (offsets into the whole text) are merged into one row per
document as the pipeline merges its strided chunks (`entities.merge_overlapping`), not
written a row per window. `--long-documents mean` is refused: a mean of entities means
nothing. Without either, what lies past the compiled length has no entities, and the row is
`truncated`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from batchjob.entities import (
    AGGREGATIONS,
    DEFAULT_AGGREGATION,
    IGNORE_LABELS,
    Decode,
    Entity,
    LabelTags,
    TokenSpans,
    entities,
    merge_overlapping,
    softmax,
)
from batchjob.errors import UsageError
from batchjob.token_spans import token_rows

if TYPE_CHECKING:
    from batchjob.artifact import Artifact
    from batchjob.batching import Batch
    from batchjob.results import Ran, Result

TASK = "token-classification"
COLUMN = "entities"


def entity_type(aggregation: str) -> pa.DataType:
    """One entity's struct: the pipeline's dict, in its order."""
    label = "entity" if aggregation == "none" else "entity_group"
    fields: list[pa.Field[pa.DataType]] = [
        pa.field(label, pa.string()),
        pa.field("score", pa.float32()),
    ]
    if aggregation == "none":  # a token each: its label and its index, not a group
        fields.append(pa.field("index", pa.int32()))
    fields += [pa.field(name, kind) for name, kind in _REST]
    return pa.struct(fields)


_REST = (("word", pa.string()), ("start", pa.int32()), ("end", pa.int32()))


@dataclass(frozen=True)
class TokenClassification:
    """Per-token logits → `entities`, a list of the text's entities in text order."""

    labels: tuple[str, ...]
    aggregation: str = DEFAULT_AGGREGATION
    decode: Decode = field(default=" ".join, compare=False, repr=False)  # the tokenizer's
    _tags: LabelTags = field(init=False, compare=False, repr=False)
    task: ClassVar[str] = TASK
    embedder: ClassVar[None] = None

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise UsageError(
                f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"
            )
        object.__setattr__(self, "_tags", LabelTags(self.labels))

    def fields(self) -> list[pa.Field[pa.DataType]]:
        return [pa.field(COLUMN, pa.list_(entity_type(self.aggregation)))]

    def entity_columns(
        self, logits: Sequence[np.ndarray], spans: Sequence[TokenSpans]
    ) -> dict[str, list[Any]]:
        """Each record's tokens' logits (n, labels) and spans → the `entities` column."""
        if not logits:
            return {COLUMN: []}
        # One softmax for the batch: numpy's per-call cost would dominate a record's few tokens.
        scores = softmax(np.concatenate(logits))
        cuts = np.cumsum([len(x) for x in logits])[:-1]
        found = [
            entities(part, span, self._tags, self.aggregation, self.decode)
            for part, span in zip(np.split(scores, cuts), spans, strict=True)
        ]
        return {COLUMN: found}

    def batch_entities(
        self, batch: Batch, outputs: np.ndarray, spans: Sequence[TokenSpans]
    ) -> list[list[Entity]]:
        """A batch's per-token logits → the entities of each real row, in order (`spans`:
        theirs)."""
        logits = token_rows(batch, outputs)
        return self.entity_columns([logits[row] for row in sorted(logits)], spans)[COLUMN]  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "aggregation": self.aggregation,
            "ignore_labels": sorted(IGNORE_LABELS),
        }


def token_head(artifact: Artifact, aggregation: str = DEFAULT_AGGREGATION) -> TokenClassification:
    """The head for a token-classification artifact, its tokenizer's decoder joining words."""
    from batchjob.tokens import load_tokenizer

    decoder = load_tokenizer(artifact.tokenizer_path)[0].decoder
    decode: Decode = decoder.decode if decoder is not None else " ".join
    return TokenClassification(artifact.labels, aggregation, decode)


def chunk_rows(head: object, long_documents: str) -> bool:
    """Whether the output has a row per window (`chunk`, `char_start`, `char_end`): with
    --long-documents chunk, except for token classification (a row per document). UsageError
    for --long-documents mean with token classification."""
    if isinstance(head, TokenClassification):
        if long_documents == "mean":
            raise UsageError(
                "--long-documents mean does not apply to token-classification (a mean of "
                "entities means nothing): use chunk, which merges the windows' entities"
            )
        return False
    return long_documents == "chunk"


def assemble_entities(
    records: Sequence[Any], units: Sequence[Ran], failed: dict[int, str], found: dict[int, Any]
) -> list[Result]:
    """One Result per record from its windows' entities (`found[i]`: units[i]'s, offsets into
    the record's text): merged as the pipeline merges overlapping chunks."""
    from batchjob.results import Result

    by_record: dict[int, list[Entity]] = {}
    windows: dict[int, int] = {}
    for i, unit in enumerate(units):
        by_record.setdefault(unit.record, []).extend(found[i])
        windows[unit.record] = windows.get(unit.record, 0) + 1
    return [
        Result({COLUMN: merge_overlapping(by_record[i])}, windows=windows[i])
        if i in windows
        else Result(None, error=failed.get(i, record.error or "no result"), windows=0)
        for i, record in enumerate(records)
    ]

"""Zero-shot records → one row per (premise, hypothesis) pair → one result per record.

A record runs as one row per candidate label (its own, `Record.candidate_labels`, else the
run's `--candidate-labels`), the text its premise and `hypothesis_template.format(label)` its
hypothesis, tokenized as the pipeline does (`truncation="only_first"`: the premise is cut to
what the compiled length leaves after the hypothesis, never the hypothesis). The rows of all
records share the engine's batches (packed or bucketed) like any others; once a record's rows
are back, `ZeroShot.values` makes its `labels` and `scores` of their logits.

The premise is tokenized once per record and each hypothesis once per run (they repeat across
records); the pairs are framed from those ids with the special tokens the tokenizer's
post-processor puts around a pair, as `RecordTokenizer` frames a long text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from batchjob.long_documents import Failed, Unit, prompted
from batchjob.long_text import TextTokens, Unsplittable, head
from batchjob.pair_tasks import ZeroShot
from batchjob.records import Record
from batchjob.results import Ran, Result
from batchjob.tokens import RecordTokenizer


class ZeroShotPlan:
    """The rows to run for `records` (iterate: lazily, record by record), and their results
    put together (`assemble`) once the engine has every row's logits."""

    def __init__(
        self, head: ZeroShot, tokenizer: RecordTokenizer, records: Sequence[Record], prompt: str
    ) -> None:
        self._head, self._tokenizer = head, tokenizer
        self._records = [prompted(r, prompt) for r in records]
        self._candidates: dict[int, tuple[str, ...]] = {}
        self._truncated: set[int] = set()
        self._hypotheses: dict[str, list[int]] = {}  # hypothesis → its raw token ids
        # Text tokens a pair holds: the compiled length less the pair's special tokens.
        self._room = tokenizer.max_length - tokenizer.special_tokens(pair=True)

    def __iter__(self) -> Iterator[Unit | Failed]:
        for i, record in enumerate(self._records):
            if record.error is not None or record.text is None:
                yield Failed(i, record.error or "no text")
                continue
            candidates = record.candidate_labels or self._head.candidate_labels
            if not candidates:
                yield Failed(i, f"{record.id}: no candidate labels")
                continue
            yield from self._units(i, record.id, record.text, candidates)

    def _units(
        self, i: int, record_id: str, text: str, candidates: tuple[str, ...]
    ) -> Iterator[Unit | Failed]:
        hypotheses = [self._hypothesis(h) for h in self._head.hypotheses(candidates)]
        longest = max(len(ids) for ids in hypotheses)
        if self._room - longest < 1:
            label = candidates[max(range(len(candidates)), key=lambda k: len(hypotheses[k]))]
            yield Failed(
                i,
                f"{record_id}: the hypothesis for label {label!r} takes {longest} tokens: no "
                f"room for the text in the compiled length ({self._tokenizer.max_length})",
            )
            return
        premise = self._premise(text, self._room - min(len(ids) for ids in hypotheses))
        self._candidates[i] = candidates
        for k, hypothesis in enumerate(hypotheses):
            keep = self._room - len(hypothesis)
            cut = len(premise) > keep
            if cut:
                self._truncated.add(i)
            encoded = self._tokenizer.framed(premise[:keep], hypothesis, truncated=cut)
            yield Unit(i, k, 0, len(text), encoded)

    def _hypothesis(self, text: str) -> list[int]:
        ids = self._hypotheses.get(text)
        if ids is None:
            ids = list(self._tokenizer.raw.encode(text, add_special_tokens=False).ids)
            if len(self._hypotheses) < 65536:
                self._hypotheses[text] = ids
        return ids

    def _premise(self, text: str, most: int) -> list[int]:
        """The premise's raw token ids, at least the first `most` + 1 of them (a text of
        megabytes is tokenized only that far)."""
        raw = self._tokenizer.raw
        if len(text) > self._tokenizer.long_text:
            try:
                return head(TextTokens(raw, text, self._tokenizer.long_text), most + 1)
            except Unsplittable:
                pass
        return list(raw.encode(text, add_special_tokens=False).ids)

    def assemble(
        self, units: Sequence[Ran], failed: dict[int, str], outputs: dict[int, np.ndarray]
    ) -> list[Result]:
        """One Result per record from its rows' logits (`outputs[j]` is units[j]'s)."""
        rows: dict[int, list[int]] = {}
        for j, unit in enumerate(units):
            rows.setdefault(unit.record, []).append(j)
        results = []
        for i, record in enumerate(self._records):
            if i in failed or i not in rows:
                error = failed.get(i, record.error or "no result")
                results.append(Result(None, error=error, windows=0))
                continue
            order = sorted(rows[i], key=lambda j: units[j].span.chunk)
            logits = np.stack([outputs[j] for j in order])
            values = self._head.values(logits, self._candidates[i])
            results.append(Result(values, i in self._truncated, windows=len(order)))
        return results

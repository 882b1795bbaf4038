"""What token classification keeps of a text's tokens beside their ids (`entities.TokenSpans`),
as the pipeline's tokenizer call gives them (`return_offsets_mapping`,
`return_special_tokens_mask`), and each record's tokens' logits out of a batch.

Only engines of a token-classification head ask for spans (`RecordTokenizer.keep_spans`): the
other tasks tokenize as before, without offsets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from batchjob.batching import Batch
from batchjob.entities import TokenSpans
from batchjob.long_text import MARGIN, encode_one
from batchjob.records import Record

if TYPE_CHECKING:  # tokens.py imports this module when it is asked for spans
    from batchjob.tokens import Encoded, RecordTokenizer


def refuse_pairs(records: list[Record]) -> list[Record]:
    """Token classification takes one text a record (as the pipeline): a pair is an error."""
    return [
        Record(
            r.id,
            None,
            error=f"{r.id}: token-classification takes one text, not a text pair",
            kept=r.kept,
        )
        if r.error is None and r.text_pair is not None
        else r
        for r in records
    ]


class SpanReader:
    """How this tokenizer's tokens become spans: its unknown token, and whether its model
    marks the pieces inside a word (WordPiece's `##`), as the pipeline's `is_subword` asks."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        model: Any = tokenizer.model
        self.prefixed = bool(getattr(model, "continuing_subword_prefix", None))
        unk = getattr(model, "unk_token", None)
        unk_id = tokenizer.token_to_id(unk) if isinstance(unk, str) else None
        if unk_id is None and isinstance(getattr(model, "unk_id", None), int):
            unk_id = model.unk_id  # Unigram
        self.unk_id = unk_id

    def spans(self, e: Encoding, text: str) -> TokenSpans:
        offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        words = list(e.tokens)
        if self.prefixed:  # a piece of a word is spelt longer than its text (`##ing`)
            lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
            subword = lengths != ends - starts
        else:  # the pipeline's heuristic: no space just before or at the token's start
            subword = np.fromiter(
                (a > 0 and " " not in text[a - 1 : a + 1] for a in starts.tolist()),
                dtype=bool,
                count=len(words),
            )
        if self.unk_id is not None:
            for i in np.flatnonzero(np.asarray(e.ids) == self.unk_id).tolist():
                words[i] = text[starts[i] : ends[i]]
                subword[i] = False
        special = np.asarray(e.special_tokens_mask, dtype=bool)
        return TokenSpans(words, starts, ends, special, subword)


def encode_with_spans(tokenizer: RecordTokenizer, records: list[Record]) -> list[Encoded | None]:
    """`RecordTokenizer.encode`, each Encoded with its spans (one text a record)."""
    from batchjob.tokens import Encoded

    backend, reader = tokenizer.truncating, tokenizer.span_reader
    assert reader is not None  # keep_spans() was called
    out: list[Encoded | None] = [None] * len(records)
    whole: list[int] = []
    for i, record in enumerate(records):
        if record.error is not None or record.text is None:
            continue
        if len(record.text) > tokenizer.long_text:
            e, truncated = _encode_long(backend, record.text, tokenizer.long_text)
            out[i] = Encoded(e.ids, e.type_ids, truncated, reader.spans(e, record.text))
        else:
            whole.append(i)
    texts = [records[i].text or "" for i in whole]
    for i, text, e in zip(whole, texts, backend.encode_batch(texts) if texts else [], strict=True):
        out[i] = Encoded(e.ids, e.type_ids, bool(e.overflowing), reader.spans(e, text))
    return out


def _encode_long(backend: Tokenizer, text: str, prefix: int) -> tuple[Encoding, bool]:
    """A text of megabytes, truncated: the tokens of a prefix are the text's own where what
    follows them in the prefix is MARGIN characters long (long_text.py), so a prefix that
    holds more than the kept tokens before that point stands for the text."""
    e = encode_one(backend, text[:prefix])
    if e.overflowing:
        real = ~np.asarray(e.special_tokens_mask, dtype=bool)
        ends = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)[real, 1]
        if not len(ends) or int(ends.max()) <= prefix - MARGIN:
            return e, True
    e = encode_one(backend, text)  # rare: a prefix of few tokens (whitespace); exact
    return e, bool(e.overflowing)


def token_rows(batch: Batch, outputs: np.ndarray) -> dict[int, np.ndarray]:
    """Output row (`batch.keys` index) → its record's tokens' logits (n, labels). The graph
    answers per token of each row (B, S, labels); a packed row's records are the runs of
    their segment id, starting where `segment_index` says."""
    b, s = batch.shape.batch_size, batch.shape.seq_len
    logits = outputs.reshape(b, s, -1)
    arrays = batch.arrays
    rows: dict[int, np.ndarray] = {}
    if "segment_index" in arrays:
        k = arrays["segment_index"].shape[1]
        counts = np.stack([(arrays["segment_ids"] == slot + 1).sum(axis=1) for slot in range(k)])
        for j, key in enumerate(batch.keys):
            if key is not None:
                r, slot = divmod(j, k)
                start = int(arrays["segment_index"][r, slot])
                rows[j] = logits[r, start : start + int(counts[slot, r])]
        return rows
    lengths = arrays["attention_mask"].sum(axis=1)
    for j, key in enumerate(batch.keys):
        if key is not None:
            rows[j] = logits[j, : int(lengths[j])]
    return rows

"""Records → token ids with the artifact's fast tokenizer, truncated to the largest shape.

The result is always that of `tokenizer(text, text_pair, truncation=True, max_length=...)`
(longest_first, from the right) with the tokenizer `AutoTokenizer.from_pretrained` loads.
Short texts, nearly all records, are tokenized whole in one `encode_batch`. A long one is
tokenized only as far as the truncation keeps (`batchjob.long_text`): tokenizing a 15 MB line
whole took 2.8 GB and 28 s.

The tokenizer itself comes from the `tokenizers` library alone, without importing
transformers (a second of every start-up): an artifact's tokenizer/ is written by
transformers' `save_pretrained`, so its tokenizer.json holds the Rust tokenizer exactly as
transformers had built it, and for the families below transformers builds that same one
again when it loads the directory (tests/test_tokens.py checks each: the same JSON, the same
pad id). A directory of another tokenizer class is loaded by transformers, as before.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizers import Encoding, Tokenizer

from batchjob.long_text import (
    MARGIN,
    TextTokens,
    Unsplittable,
    compare_lengths,
    encode_one,
    head,
)
from batchjob.records import Record

if TYPE_CHECKING:
    from batchjob.entities import TokenSpans
    from batchjob.token_spans import SpanReader

log = logging.getLogger("batchjob.tokens")

# The `tokenizer_class` values save_pretrained writes for the families read without
# transformers: BERT, DistilBERT and ELECTRA (all BertTokenizer), MPNet, RoBERTa, XLM-R, and
# the generic class (ModernBERT's). tests/test_tokens.py checks each against AutoTokenizer.
PLAIN_CLASSES = frozenset(
    {
        "BertTokenizer",
        "MPNetTokenizer",
        "RobertaTokenizer",
        "XLMRobertaTokenizer",
        "TokenizersBackend",
    }
)


@dataclass(frozen=True, slots=True)
class Encoded:
    ids: list[int]
    type_ids: list[int]
    truncated: bool
    spans: TokenSpans | None = None  # token classification's offsets (keep_spans)


@dataclass(frozen=True, slots=True)
class _Frame:
    """Where the post-processor puts the special tokens around texts of given lengths."""

    ids: list[int]  # special tokens' ids; the texts' places hold -1
    type_ids: list[int]
    sequence: list[int | None]  # 0 or 1: that text's next token; None: a special token


class RecordTokenizer:
    """The Rust tokenizer behind the HF one: it releases the GIL, so it runs in a thread."""

    def __init__(self, tokenizer_path: str, max_length: int) -> None:
        backend, self.pad_id = load_tokenizer(tokenizer_path)
        self.max_length = max_length
        self._tokenizer = backend
        # Same truncation as `tokenizer(text, truncation=True, max_length=...)` (longest_first).
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.no_padding()
        # Long texts: windows tokenized with raw offsets (no post-processor trimming them),
        # and the post-processor applied once to what the truncation keeps.
        self._raw = _copy(backend, post_processor=False)
        self._framer = _copy(backend, post_processor=True)
        self._frames: dict[tuple[int, int | None], _Frame] = {}
        # Up to this many characters a text is tokenized whole: the first window would be.
        self.long_text = 16 * max_length + 4 * MARGIN
        # Token classification: each Encoded with its offsets and special tokens (spans).
        self.span_reader: SpanReader | None = None

    def keep_spans(self) -> None:
        """From now on, give each Encoded its spans (token classification only: offsets
        cost time the other tasks don't spend)."""
        from batchjob.token_spans import SpanReader

        self.span_reader = SpanReader(self._tokenizer)

    @property
    def truncating(self) -> Tokenizer:
        """The tokenizer as `encode` uses it: special tokens, truncation, no padding."""
        return self._tokenizer

    @property
    def raw(self) -> Tokenizer:
        """The tokenizer without special tokens, truncation or padding: raw offsets."""
        return self._raw

    def special_tokens(self, pair: bool = False) -> int:
        """How many special tokens the post-processor adds to one text (or a pair)."""
        count: int = self._tokenizer.num_special_tokens_to_add(pair)
        return count

    def encode(self, records: list[Record]) -> list[Encoded | None]:
        """One entry per record, None where the record is an error."""
        if self.span_reader is not None:
            from batchjob.token_spans import encode_with_spans

            return encode_with_spans(self, records)
        out: list[Encoded | None] = [None] * len(records)
        short: list[int] = []
        for i, record in enumerate(records):
            if record.error is not None:
                continue
            if self._is_long(record):
                out[i] = self._encode_long(record)
            else:
                short.append(i)
        inputs = [_input(records[i]) for i in short]
        for i, e in zip(short, self._tokenizer.encode_batch(inputs) if inputs else [], strict=True):
            out[i] = Encoded(e.ids, e.type_ids, bool(e.overflowing))
        return out

    def _is_long(self, record: Record) -> bool:
        size = len(record.text or "") + len(record.text_pair or "")
        return size > self.long_text

    def _encode_long(self, record: Record) -> Encoded:
        assert record.text is not None
        pair = record.text_pair is not None
        keep = self.max_length - self._tokenizer.num_special_tokens_to_add(pair)
        if keep < 1:  # no room for text: let the tokenizer say what it says
            return self._whole(record)
        try:
            return self._truncated(record.text, record.text_pair, keep)
        except Unsplittable:
            return self._whole(record)

    def _whole(self, record: Record) -> Encoded:
        e = encode_one(self._tokenizer, _input(record))
        return Encoded(e.ids, e.type_ids, bool(e.overflowing))

    def _truncated(self, text: str, text_pair: str | None, keep: int) -> Encoded:
        window = self.long_text
        first = TextTokens(self._raw, text, window)
        ids = head(first, keep + 1)
        if text_pair is None:
            return self._framed(ids[:keep], None, truncated=len(ids) > keep)
        second = TextTokens(self._raw, text_pair, window)
        pair_ids = head(second, keep + 1)
        n1, n2 = len(ids), len(pair_ids)  # each exact up to keep, else keep + 1
        if n1 + n2 <= keep:
            return self._framed(ids, pair_ids, truncated=False)
        if n1 > keep and n2 > keep:
            # Both halves: when `keep` is odd the longer text gets the extra token, so which
            # one is longer matters (counted, not kept).
            order = compare_lengths(first, second) if keep % 2 else 0
        else:
            order = (n1 > n2) - (n1 < n2)
        l1, l2 = longest_first(n1, n2, keep, order)
        return self._framed(ids[:l1], pair_ids[:l2], truncated=True)

    def framed(self, ids: list[int], pair_ids: list[int] | None, truncated: bool) -> Encoded:
        """Raw token ids of a text (and its pair) with the special tokens around them."""
        return self._framed(ids, pair_ids, truncated)

    def _framed(self, ids: list[int], pair_ids: list[int] | None, truncated: bool) -> Encoded:
        frame = self._frame(len(ids), None if pair_ids is None else len(pair_ids))
        texts = (iter(ids), iter(pair_ids or []))
        out = [
            frame_id if seq is None else next(texts[seq])
            for frame_id, seq in zip(frame.ids, frame.sequence, strict=True)
        ]
        return Encoded(out, list(frame.type_ids), truncated)

    def _frame(self, n1: int, n2: int | None) -> _Frame:
        key = (n1, n2)
        frame = self._frames.get(key)
        if frame is None:
            first = self._placeholder(n1)
            second = None if n2 is None else self._placeholder(n2)
            e = self._framer.post_process(first, second, add_special_tokens=True)
            # The texts' tokens are those the post-processor did not add, the first text's
            # first. (Encoding.sequence_ids loses the first text of a pair when one is empty.)
            texts = [0] * n1 + [1] * (n2 or 0)
            if len(e.special_tokens_mask) - sum(e.special_tokens_mask) != len(texts):
                raise RuntimeError(f"the post-processor changed texts of {n1} and {n2} tokens")
            slots = iter(texts)
            sequence = [None if special else next(slots) for special in e.special_tokens_mask]
            ids = [-1 if s is not None else i for i, s in zip(e.ids, sequence, strict=True)]
            frame = _Frame(ids, list(e.type_ids), sequence)
            if len(self._frames) < 4096:
                self._frames[key] = frame
        return frame

    def _placeholder(self, n: int) -> Encoding:
        """An encoding of exactly n tokens (their values don't matter, only their count)."""
        e = self._raw.encode(["a"] * n, is_pretokenized=True, add_special_tokens=False)
        e.truncate(n)
        if len(e.ids) != n:
            raise RuntimeError(f"placeholder of {n} tokens came out with {len(e.ids)}")
        return e


def load_tokenizer(path: str) -> tuple[Tokenizer, int]:
    """The Rust tokenizer that `AutoTokenizer.from_pretrained(path)` has as its backend, and
    its pad id (0 where it has no pad token)."""
    loaded = _load_saved(path)
    if loaded is not None:
        return loaded
    log.debug("%s: not a tokenizer directory read without transformers; loading it with it", path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    backend: Tokenizer = hf.backend_tokenizer
    return backend, hf.pad_token_id if hf.pad_token_id is not None else 0


def _load_saved(path: str) -> tuple[Tokenizer, int] | None:
    """From tokenizer.json and tokenizer_config.json alone, for the classes in PLAIN_CLASSES
    with a pad token in their vocabulary (else None: transformers must load it)."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            config: Any = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or str(config.get("tokenizer_class")) not in PLAIN_CLASSES:
        return None
    pad = config.get("pad_token")
    if isinstance(pad, dict):  # an AddedToken, serialized
        pad = pad.get("content")
    file = os.path.join(path, "tokenizer.json")
    if not isinstance(pad, str) or not os.path.isfile(file):
        return None
    tokenizer = Tokenizer.from_file(file)
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:  # transformers would add it to the vocabulary
        return None
    # transformers sets this from the config (False unless told), whatever tokenizer.json says.
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return tokenizer, pad_id


def longest_first(n1: int, n2: int, keep: int, order: int) -> tuple[int, int]:
    """The lengths tokenizers' longest_first truncation keeps of two texts of n1 and n2 tokens
    (`order`: the sign of the true n1 - n2, where n1 and n2 are capped at keep + 1)."""
    swap = order > 0
    short, long = (n2, n1) if swap else (n1, n2)
    long = short if short > keep else max(short, keep - short)
    if short + long > keep:
        short, long = keep // 2, keep // 2 + keep % 2
    first, second = (long, short) if swap else (short, long)
    return min(n1, first), min(n2, second)


def _copy(backend: Tokenizer, post_processor: bool) -> Tokenizer:
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if not post_processor:
        tokenizer.post_processor = None
    return tokenizer


def _input(record: Record) -> str | tuple[str, str]:
    assert record.text is not None
    return record.text if record.text_pair is None else (record.text, record.text_pair)

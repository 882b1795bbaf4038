"""Long documents (`--long-documents truncate|chunk|mean`) and prompts: what the engine runs
for each record.

`truncate` runs one row per record, cut to the compiled length (tokens.py). `chunk` and
`mean` split a record that does not fit into overlapping windows: each window is a slice
`text[char_start:char_end]`, and what runs is exactly the tokenization of `prompt + slice`
with its special tokens, as sentence-transformers' `encode(slice, prompt=prompt)` does: that
is the parity every window keeps, whatever the tokenizer does at the cuts. The prompt goes
before every window (each window is embedded as a passage of its own); offsets refer to the
original text, without the prompt.

Windows are planned from the raw tokens of a piece of the text at a time (a few windows'
worth of characters, never the whole text), so a document of megabytes costs the memory of
a window. A window starts at the start of a word (the pre-tokenizer's words: never inside a
word split into pieces), the first at 0; it ends at the end of a word, the last at the end
of the text; the next one starts `chunk_overlap` tokens before the end, moved back to the
start of that word. Only a word too long for the rest of a window (that would leave it less
than half full) is cut inside, at a token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

from batchjob.config import DEFAULT_CHUNK_OVERLAP, LONG_DOCUMENTS
from batchjob.long_text import MARGIN
from batchjob.records import Record
from batchjob.tokens import Encoded, RecordTokenizer

__all__ = ["DEFAULT_CHUNK_OVERLAP", "LONG_DOCUMENTS", "TextOptions", "plan_units"]


@dataclass(frozen=True, slots=True)
class TextOptions:
    """How records become rows to run: the long-document mode and the prompt (resolved)."""

    long_documents: str = "truncate"
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    prompt: str = ""  # prepended to every text (the first of a pair) before tokenization
    prompt_name: str | None = None  # where the prompt came from, for the manifest

    @property
    def windowed(self) -> bool:
        return self.long_documents != "truncate"

    def describe(self) -> dict[str, object]:
        """For the manifest."""
        return {
            "long_documents": self.long_documents,
            "chunk_overlap": self.chunk_overlap if self.windowed else None,
            "prompt": self.prompt,
            "prompt_name": self.prompt_name,
        }


@dataclass(frozen=True, slots=True)
class Unit:
    """One row to run: a window of record `record` (a whole record is its window 0)."""

    record: int
    chunk: int
    char_start: int
    char_end: int
    encoded: Encoded


@dataclass(frozen=True, slots=True)
class Failed:
    """A record with no row to run: its error."""

    record: int
    error: str


def prompted(record: Record, prompt: str) -> Record:
    """The record as it is tokenized: the prompt before its (first) text."""
    if not prompt or record.error is not None or record.text is None:
        return record
    return Record(record.id, prompt + record.text, record.text_pair, None)


def window_budget(tokenizer: RecordTokenizer, prompt: str) -> int:
    """Tokens of text a window may hold: the compiled length less the special tokens and the
    prompt's tokens (≤ 0: no room)."""
    raw = tokenizer.raw
    prompt_tokens = len(raw.encode(prompt, add_special_tokens=False).ids) if prompt else 0
    return tokenizer.max_length - tokenizer.special_tokens() - prompt_tokens


def plan_units(
    tokenizer: RecordTokenizer, records: list[Record], options: TextOptions
) -> Iterator[Unit | Failed]:
    """The rows to run for `records`, record by record and window by window (lazily: a long
    record's windows are tokenized as they are asked for)."""
    encoded = tokenizer.encode([prompted(r, options.prompt) for r in records])
    budget = window_budget(tokenizer, options.prompt)
    for i, (record, enc) in enumerate(zip(records, encoded, strict=True)):
        if enc is None:
            yield Failed(i, record.error or "no text")
            continue
        assert record.text is not None
        if not enc.truncated:
            yield Unit(i, 0, 0, len(record.text), enc)
        elif record.text_pair is not None:
            yield Failed(
                i,
                f"{record.id}: a text pair longer than the compiled length "
                f"({tokenizer.max_length} tokens) can't be split into windows "
                f"(--long-documents {options.long_documents})",
            )
        else:
            windows = Windows(tokenizer, record.text, options.prompt, budget, options.chunk_overlap)
            for chunk, (start, end, window) in enumerate(windows):
                yield Unit(i, chunk, start, end, window)


class Windows:
    """The windows of one text that does not fit: (char_start, char_end, encoded), in order."""

    def __init__(
        self, tokenizer: RecordTokenizer, text: str, prompt: str, budget: int, overlap: int
    ) -> None:
        if budget < 1 or not 0 <= overlap < budget:
            raise ValueError(f"window of {budget} tokens with an overlap of {overlap}")
        self._tokenizer = tokenizer
        self._raw: Tokenizer = tokenizer.raw
        self._text, self._prompt = text, prompt
        self._budget, self._overlap = budget, overlap

    def __iter__(self) -> Iterator[tuple[int, int, Encoded]]:
        text, n = self._text, len(self._text)
        start = 0
        while True:
            piece = self._piece(start)
            cuts = _word_cuts(piece.word_ids, len(piece.ids))
            m = self._last_cut(piece, cuts)
            while True:
                end = n if m == len(piece.ids) and piece.reaches_end else start + piece.ends[m - 1]
                window = self._encode(text[start:end])
                if not window.truncated or m == 1:
                    break
                # The slice tokenizes longer alone (or with the prompt) than in the piece:
                # one word less (one token less, if that leaves the window under half full
                # or it ends inside a word already).
                shorter = [c for c in cuts if c < m]
                at_word = m in cuts and shorter and 2 * shorter[-1] >= m
                m = shorter[-1] if at_word else m - 1
            yield start, end, window
            if end == n:
                return
            start = self._next_start(piece, cuts, m, start, end)

    def _encode(self, text: str) -> Encoded:
        (enc,) = self._tokenizer.encode([Record("", self._prompt + text)])
        assert enc is not None
        return enc

    def _piece(self, start: int) -> _Piece:
        """The raw tokens from `start` on: more than a window's worth that no cut further on
        changes (or all the rest of the text)."""
        text, n = self._text, len(self._text)
        size = max(8 * self._budget, 4 * MARGIN)
        while True:
            stop = min(n, start + size)
            enc = self._raw.encode(text[start:stop], add_special_tokens=False)
            piece = _Piece.of(enc, stop == n)
            if piece.reaches_end:
                return piece
            settled = piece.settled(stop - start - MARGIN)
            if settled > self._budget:
                piece.keep(settled)
                return piece
            size *= 2

    def _last_cut(self, piece: _Piece, cuts: list[int]) -> int:
        """How many of the piece's tokens the window takes: the most that fit, ending at the
        end of a word (all of them at the end of the text)."""
        count = len(piece.ids)
        if piece.reaches_end and count <= self._budget:
            return count
        most = min(self._budget, count)
        fitting = [c for c in cuts if c <= most]
        # A word too long for what is left of the window is cut inside (at a token), rather
        # than leave the window less than half full: else windows before a giant word would
        # each end where it starts, moving forward a few tokens at a time.
        m = fitting[-1] if fitting and 2 * fitting[-1] >= most else most
        # Tokens that end at one offset (the bytes of one character) stay together.
        while m > 1 and m < count and piece.ends[m - 1] == piece.ends[m]:
            m -= 1
        return max(m, 1)

    def _next_start(self, piece: _Piece, cuts: list[int], m: int, start: int, end: int) -> int:
        """Where the next window starts: `overlap` tokens before this one's end, moved back
        to the start of that word; forward to the next word start if that gets nowhere."""
        j = m - self._overlap
        back = [c for c in cuts if 0 < c <= j]
        if back:
            j = back[-1]
        else:
            ahead = [c for c in cuts if 0 < c <= m]
            j = ahead[0] if ahead else max(1, j)
        while 0 < j < min(m, len(piece.ids)) and piece.ends[j - 1] == piece.ends[j]:
            j += 1
        at = start + (piece.starts[j] if j < len(piece.ids) else piece.ends[j - 1])
        return min(max(at, start + 1), end)  # always forward, and no gap between windows


def _word_cuts(word_ids: list[int | None], count: int) -> list[int]:
    """Token indices (1..count) where a new word starts (count: after the last token)."""
    cuts = [
        i
        for i in range(1, count)
        if word_ids[i] is None or word_ids[i - 1] is None or word_ids[i] != word_ids[i - 1]
    ]
    return [*cuts, count]


@dataclass
class _Piece:
    ids: list[int]
    starts: list[int]
    ends: list[int]
    word_ids: list[int | None]
    reaches_end: bool

    @classmethod
    def of(cls, enc: Encoding, reaches_end: bool) -> _Piece:
        starts = [a for a, _ in enc.offsets]
        ends = [b for _, b in enc.offsets]
        return cls(list(enc.ids), starts, ends, list(enc.word_ids), reaches_end)

    def settled(self, limit: int) -> int:
        """How many tokens no cut past `limit` changes: they end by then, and so does their
        word (its next token, if any, starts another word)."""
        k = 0
        while k < len(self.ends) and self.ends[k] <= limit:
            k += 1
        word = self.word_ids[k - 1] if k else None
        if k < len(self.ids) and word is not None and self.word_ids[k] == word:
            while k > 0 and self.word_ids[k - 1] == word:
                k -= 1
        return k

    def keep(self, count: int) -> None:
        for tokens in (self.ids, self.starts, self.ends, self.word_ids):
            del tokens[count:]

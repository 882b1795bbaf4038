"""The tokens of a long text, window by window: exactly those of tokenizing it whole, in a
memory bounded by a window, not by the text (one 15 MB line took 2.8 GB tokenized whole).

A window is a slice `text[a:b]` tokenized alone (no special tokens, no post-processor: raw
offsets). A cut changes tokens only near it: normalizers map characters (or short sequences)
one place at a time, pre-tokenizers split on local patterns (whitespace, punctuation, letter
or digit runs), and models tokenize one pre-token ("word") at a time. So a token of a window
is the text's own when what follows it in the window is `MARGIN` characters long, counted
after normalization (a normalizer that drops NULs or zero widths joins the words around them,
however far apart), and it is past the window's left context. Besides:

- A WordPiece, WordLevel or Unigram word depends on all of itself: its pieces change (or it
  becomes one [UNK]) if it goes on past the cut, and Unigram's best path through a run such
  as "ababab..." can change from its start. Such tokens count only when their word is over.
  BPE merges go leftmost first, so a right cut changes only the pieces near it: they count
  one by one, even inside a "word" of megabytes; the next window then starts where that word
  starts (a left cut would shift its merges).
- Whitespace at the right cut counts for nothing yet: an added token with `lstrip` (RoBERTa's
  <mask>) swallows the whitespace before it, however long the run.
- A WordPiece word of more than `max_input_chars_per_word` characters is one [UNK] however
  long it is: its end is found by reading windows forward (keeping nothing), and the tokens
  go on from there.
- Where nothing but characters without tokens (BERT's whitespace) lies ahead, windows move on.

Tokens are matched across windows by their end offsets, which never decrease. A text that
breaks these rules (offsets that go backwards) raises `Unsplittable`: tokenize it whole.
Where a word never settles (a Unigram word, or a run of whitespace before which a byte-level
BPE can't tell, that is megabytes long), the window grows to it: still exact, no longer small.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right

from tokenizers import Encoding, Tokenizer

# How far the effect of a cut can reach, in (normalized) characters. Normalizers and
# pre-tokenizers look a few characters around a position; BPE merges, in practice, a few
# pieces. Generous on purpose: it costs only the width of a window.
MARGIN = 256
# A window that starts inside the text starts this far before what it is asked for.
CONTEXT = 2 * MARGIN
# A window while looking for the end of a giant word or across text without tokens.
LARGE_WINDOW = 1 << 18


class Unsplittable(Exception):
    """This text can't be matched across windows (offsets that go backwards)."""


class TextTokens:
    """The token ids of one text, in order, a window's worth at a time (`next_chunk`)."""

    def __init__(self, raw: Tokenizer, text: str, window: int) -> None:
        self._raw = raw
        self._text = text
        self.window = window  # characters tokenized at a time; the caller may change it
        model = raw.model
        kind = type(model).__name__
        self._piecewise = kind == "BPE"  # pieces settle one by one
        self._unk: int | None = None
        self._max_word = 0
        if kind == "WordPiece":
            self._unk = raw.token_to_id(model.unk_token)
            self._max_word = model.max_input_chars_per_word
        self._p = 0  # every token that ends at or before text position _p has been given
        self._word: int | None = None  # where the word that _p is inside starts, if it is
        self._started = False  # whether anything was given, or skipped, yet
        self.done = False
        self.count = 0  # tokens given so far

    def next_chunk(self) -> list[int]:
        """The next tokens (at least one, unless the text has no more: then `done`)."""
        text, n = self._text, len(self._text)
        while not self.done:
            # A BPE word is only cut on its right: its pieces depend on where it starts.
            start = self._p if self._word is None else self._word
            a = max(0, start - CONTEXT) if self._started else 0
            self.window = max(self.window, CONTEXT + 4 * MARGIN)
            b = min(n, self._p + self.window)
            window = text[a:b]
            enc = encode_one(self._raw, window, add_special_tokens=False)
            ids = enc.ids
            ends = _ends(enc)
            first = bisect_right(ends, self._p - a) if self._started else 0
            if b == n:
                self.done = True
                return self._give(ids[first:], n, None)
            last = self._settled(enc, ends, first, self._limit(window))
            if last > first:
                return self._give(ids[first:last], a + ends[last - 1], _open_word(enc, last, a))
            if first == len(ids):
                # Nothing but text without tokens (whitespace, removed characters) ahead.
                self._p, self._word, self._started = max(self._p, b - MARGIN), None, True
                self.window = max(self.window, min(2 * self.window, LARGE_WINDOW))
                continue
            inside = self._giant_unk(enc, ends, first, a, b)
            if inside is not None:
                return self._give([ids[first]], self._word_end(inside), None)
            self.window *= 2  # a word longer than the window: see more of it
        return []

    def _limit(self, window: str) -> int:
        """Tokens of the window that end here or before are the text's own, if their words
        are over (see the module docstring for why the whitespace before the cut is out)."""
        n = len(window)
        limit = min(n - MARGIN, len(window.rstrip()))
        normalizer = self._raw.normalizer
        if normalizer is None:
            return limit
        # The margin is one of normalized characters: a normalizer that removes characters
        # (controls, zero widths) joins what is on either side of them, however far apart.
        tail = 2 * MARGIN
        while tail < n and len(normalizer.normalize_str(window[n - tail :])) < MARGIN:
            tail *= 2
        return min(limit, max(0, n - tail))

    def _give(self, ids: list[int], end: int, word: int | None) -> list[int]:
        self._p, self._word, self._started = end, word, True
        self.count += len(ids)
        return ids

    def _settled(self, enc: Encoding, ends: list[int], first: int, limit: int) -> int:
        """The index after the last token of `first..` that is the text's own."""
        words = enc.word_ids
        last = first
        if self._piecewise:
            while last < len(ends) and ends[last] <= limit:
                last += 1
        else:
            while last < len(ends):
                word = words[last]
                stop = last + 1
                while word is not None and stop < len(ends) and words[stop] == word:
                    stop += 1
                if ends[stop - 1] > limit:
                    break
                last = stop
        # Tokens that share an end offset (the bytes of one character) go together.
        while first < last < len(ends) and ends[last - 1] == ends[last]:
            last -= 1
        return last

    def _giant_unk(self, enc: Encoding, ends: list[int], i: int, a: int, b: int) -> int | None:
        """A text position inside the word of token i, if that token is a WordPiece [UNK] for a
        word that goes past the cut and whose part in the window alone has more than
        `max_input_chars_per_word` characters, normalized: one [UNK] wherever it ends."""
        if self._unk is None or enc.ids[i] != self._unk:
            return None
        words = enc.word_ids
        if i + 1 < len(ends) and words[i + 1] is not None and words[i + 1] == words[i]:
            return None
        start = a + enc.offsets[i][0]
        seen = a + min(ends[i], b - a - MARGIN)  # what no cut changes
        if (self._started and start < self._p) or seen - start < max(
            4 * self._max_word, 2 * MARGIN
        ):
            return None
        part = self._text[start:seen]
        normalizer = self._raw.normalizer
        length = len(normalizer.normalize_str(part)) if normalizer is not None else len(part)
        return seen - 1 if length > self._max_word + MARGIN else None

    def _word_end(self, inside: int) -> int:
        """Where the word that covers text position `inside` ends, reading windows forward."""
        text, n = self._text, len(self._text)
        size = LARGE_WINDOW
        while True:
            a = inside - CONTEXT
            b = min(n, a + size)
            window = text[a:b]
            enc = encode_one(self._raw, window, add_special_tokens=False)
            ends = _ends(enc)
            i = bisect_right(ends, inside - a)
            if i == len(ends) or enc.offsets[i][0] > inside - a:
                raise Unsplittable("the giant word ended where the previous window said it goes on")
            words = enc.word_ids
            while i + 1 < len(ends) and words[i] is not None and words[i + 1] == words[i]:
                i += 1
            end = ends[i]
            if b == n or end <= self._limit(window):
                return a + end
            if end <= b - a - MARGIN:
                # The word may go on past characters that normalize to nothing: look further.
                inside, size = a + end - 1, 2 * size
            else:
                inside = b - MARGIN


def encode_one(tokenizer: Tokenizer, text: str | tuple[str, str], **options: bool) -> Encoding:
    """`tokenizer.encode`, through encode_batch: that one releases the GIL, encode does not.
    One pathological "word" of megabytes takes seconds, in which other threads (serve's event
    loop, answering /ping) would otherwise stand still."""
    [encoding] = tokenizer.encode_batch([text], **options)
    return encoding


def _open_word(enc: Encoding, i: int, a: int) -> int | None:
    """Where the word of token i starts, in the text, if token i - 1 is of the same word."""
    words = enc.word_ids
    if i >= len(words) or words[i] is None or words[i - 1] != words[i]:
        return None
    while i > 0 and words[i - 1] == words[i]:
        i -= 1
    return a + enc.offsets[i][0]


def _ends(enc: Encoding) -> list[int]:
    ends = [end for _, end in enc.offsets]
    if any(x > y for x, y in itertools.pairwise(ends)):
        raise Unsplittable("token offsets go backwards")
    return ends


def head(tokens: TextTokens, need: int) -> list[int]:
    """The first `need` tokens (all of them, when there are fewer)."""
    out: list[int] = []
    while len(out) < need and not tokens.done:
        out += tokens.next_chunk()
    return out[:need]


def compare_lengths(first: TextTokens, second: TextTokens) -> int:
    """-1, 0 or 1 as the first text has fewer, as many or more tokens than the second, reading
    both in step until one ends (keeping counts, not tokens)."""
    first.window = second.window = LARGE_WINDOW
    while not (first.done or second.done):
        (first if first.count <= second.count else second).next_chunk()
    for done, other in ((first, second), (second, first)):
        while done.done and not other.done and other.count <= done.count:
            other.next_chunk()
    return (first.count > second.count) - (first.count < second.count)

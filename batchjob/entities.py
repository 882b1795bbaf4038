"""Token classification's entities, exactly as transformers' `TokenClassificationPipeline`
makes them (`gather_pre_entities`, `aggregate`, `aggregate_words`, `group_entities`,
`aggregate_overlapping_entities`), with numpy over a text's tokens at once: Python work is
left only for the entities that are kept.

What the pipeline does, step by step (its quirks kept, since parity is the contract):
- scores are the softmax of each token's logits (float32); special tokens are left out;
- `none`: one entity per token (`entity`, `score`, `index`, `word` the token as the
  vocabulary spells it, `start`, `end`); `simple`: those tokens, then grouped;
- `first`, `average`, `max`: tokens are put together into words first (a token is inside a
  word when `TokenSpans.subword` says so, the first token always starts one): the label of
  the first token, of the mean of the word's scores, or of its token with the highest score;
- grouping: a run of neighbours with the same tag (the label less a `B-`/`I-` prefix) is one
  entity, except that a `B-` label starts a new one; its `entity_group` is the first label
  after its first `-`, its score the mean of its members', its word their text joined by the
  tokenizer's decoder;
- entities labelled `O` (`ignore_labels`) are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

AGGREGATIONS = ("none", "simple", "first", "average", "max")
DEFAULT_AGGREGATION = "simple"
IGNORE_LABELS = frozenset({"O"})  # the pipeline's default ignore_labels

Decode = Callable[[list[str]], str]  # the tokenizer's decoder: tokens (or words) → text
Entity = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TokenSpans:
    """What aggregation needs of one tokenized text, per token (special tokens included)."""

    words: list[str]  # the token as the vocabulary spells it (an unknown one: its text)
    starts: np.ndarray  # int64: character offsets into the text
    ends: np.ndarray
    special: np.ndarray  # bool: added by the post-processor (or a special added token)
    subword: np.ndarray  # bool: continues the word of the token before it

    def __len__(self) -> int:
        return len(self.words)

    def shifted(self, by: int) -> TokenSpans:
        """Offsets into a text of which this one starts at `by` (a window of a document)."""
        if not by:
            return self
        return TokenSpans(self.words, self.starts + by, self.ends + by, self.special, self.subword)


class LabelTags:
    """Per label id: its tag (an index), whether it is a `B-` label, the name a group of it
    gets (`entity_group`), and whether a token or a group of it is ignored."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        tags = [_tag(label) for label in self.labels]
        names = sorted({t for _, t in tags})
        self.tag = np.array([names.index(t) for _, t in tags], dtype=np.int64)
        self.begins = np.array([bi == "B" for bi, _ in tags], dtype=bool)
        self.group = [label.split("-", 1)[-1] for label in self.labels]
        self.ignored = np.array([label in IGNORE_LABELS for label in self.labels], dtype=bool)
        self.ignored_group = np.array([g in IGNORE_LABELS for g in self.group], dtype=bool)


def _tag(label: str) -> tuple[str, str]:
    """The pipeline's get_tag: B-X → (B, X), I-X → (I, X), anything else → (I, itself)."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def softmax(logits: np.ndarray) -> np.ndarray:
    """As the pipeline: in float32, shifted by each row's max."""
    logits = logits.astype(np.float32, copy=False)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs


def entities(
    scores: np.ndarray, spans: TokenSpans, tags: LabelTags, strategy: str, decode: Decode
) -> list[Entity]:
    """One text's entities from its tokens' scores (n, labels), in text order."""
    kept = np.flatnonzero(~spans.special)
    if not len(kept):
        return []
    token_scores = scores[kept]
    if strategy in ("none", "simple"):
        best = token_scores.argmax(axis=-1)
        best_scores = token_scores[np.arange(len(kept)), best]
        if strategy == "none":
            shown = np.flatnonzero(~tags.ignored[best])
            index = kept[shown]
            return [
                {
                    "entity": tags.labels[label],
                    "score": score,
                    "index": i,
                    "word": spans.words[i],
                    "start": start,
                    "end": end,
                }
                for label, score, i, start, end in zip(
                    best[shown].tolist(),
                    best_scores[shown].tolist(),
                    index.tolist(),
                    spans.starts[index].tolist(),
                    spans.ends[index].tolist(),
                    strict=True,
                )
            ]
        firsts = np.arange(len(kept))  # each token is its own "word"
        lasts = firsts
        tokens = [spans.words[i] for i in kept.tolist()]

        def word(w: int) -> str:
            return tokens[w]

    else:
        best, best_scores, firsts, lasts = _words(token_scores, spans.subword[kept], strategy)
        tokens = [spans.words[i] for i in kept.tolist()]
        bounds = list(zip(firsts.tolist(), (lasts + 1).tolist(), strict=True))

        def word(w: int) -> str:
            a, b = bounds[w]
            return decode(tokens[a:b])

    return _group(best, best_scores, kept[firsts], kept[lasts], spans, tags, word, decode)


def _words(
    scores: np.ndarray, subword: np.ndarray, strategy: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """aggregate_words: per word, its label and score, its first and last token (indices
    into the kept tokens)."""
    starts = ~subword
    starts[0] = True
    firsts = np.flatnonzero(starts)
    lasts = np.append(firsts[1:] - 1, len(scores) - 1)
    if strategy == "first":
        word_scores = scores[firsts]
    elif strategy == "average":
        counts = (lasts - firsts + 1).astype(np.float32)
        word_scores = np.add.reduceat(scores, firsts, axis=0) / counts[:, None]
    elif strategy == "max":
        # The word's token with the highest score (the first of equals, as Python's max).
        top = scores.max(axis=-1)
        word_of = np.cumsum(starts) - 1
        at_max = np.flatnonzero(top == np.maximum.reduceat(top, firsts)[word_of])
        _, first_at_max = np.unique(word_of[at_max], return_index=True)
        word_scores = scores[at_max[first_at_max]]
    else:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {strategy!r}")
    best = word_scores.argmax(axis=-1)
    return best, word_scores[np.arange(len(best)), best], firsts, lasts


def _group(
    labels: np.ndarray,
    scores: np.ndarray,
    first_token: np.ndarray,
    last_token: np.ndarray,
    spans: TokenSpans,
    tags: LabelTags,
    word: Callable[[int], str],
    decode: Decode,
) -> list[Entity]:
    """group_entities, then the ignored groups dropped: `labels`, `scores` per word (or
    token), with the text tokens each starts and ends with."""
    tag = tags.tag[labels]
    new = np.ones(len(labels), dtype=bool)
    new[1:] = (tag[1:] != tag[:-1]) | tags.begins[labels[1:]]
    firsts = np.flatnonzero(new)
    lasts = np.append(firsts[1:], len(labels))
    kept = np.flatnonzero(~tags.ignored_group[labels[firsts]])
    if not len(kept):
        return []
    # A group's score: the mean of its members' (no NaN: scores come from a softmax).
    means = np.add.reduceat(scores, firsts)[kept] / (lasts - firsts)[kept]
    a_kept, b_kept = firsts[kept], lasts[kept]
    starts = spans.starts[first_token[a_kept]].tolist()
    ends = spans.ends[last_token[b_kept - 1]].tolist()
    names = [tags.group[label] for label in labels[a_kept].tolist()]
    return [
        {
            "entity_group": name,
            "score": score,
            "word": decode([word(w) for w in range(a, b)]),
            "start": start,
            "end": end,
        }
        for name, score, a, b, start, end in zip(
            names, means.tolist(), a_kept.tolist(), b_kept.tolist(), starts, ends, strict=True
        )
    ]


def merge_overlapping(found: Sequence[Entity]) -> list[Entity]:
    """A document's entities from windows that overlap: aggregate_overlapping_entities.
    Sorted by start (stably); of entities that start inside the one before, the longer is
    kept (of equal lengths, the higher score)."""
    if not found:
        return []
    ordered = sorted(found, key=lambda e: e["start"])
    merged: list[Entity] = []
    previous = ordered[0]
    for entity in ordered:
        if previous["start"] <= entity["start"] < previous["end"]:
            length = entity["end"] - entity["start"]
            previous_length = previous["end"] - previous["start"]
            if length > previous_length or (
                length == previous_length and entity["score"] > previous["score"]
            ):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged

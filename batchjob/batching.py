"""The pure batcher: token ids of many records in, batches of exactly a compiled shape out.

Compiled graphs (Inferentia, and the traced CPU graphs) accept only the fixed shapes they
were compiled for, so every batch must be exactly ``(batch_size, seq_len)`` of one bucket.
Nothing here does I/O, awaits or touches torch: the runner feeds items in and ships the
numpy arrays to a replica, and output order is restored by the caller from the keys.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np

_INT = np.int64


@dataclass(frozen=True, slots=True)
class Shape:
    """One compiled bucket: sequences up to ``seq_len`` tokens, ``batch_size`` rows."""

    seq_len: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be ≥ 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(
                f"batch_size must be ≥ 1, got {self.batch_size} (seq_len {self.seq_len})"
            )


@dataclass(frozen=True, slots=True)
class Item:
    """One tokenized record. ``key`` is opaque here, e.g. ``(shard_no, index)``."""

    key: Hashable
    ids: Sequence[int]
    type_ids: Sequence[int] | None = None  # None means all zeros (a single text, not a pair)


# eq=False: the generated __eq__/__hash__ would compare numpy arrays, which is ambiguous.
@dataclass(frozen=True, eq=False)
class Batch:
    """Arrays of exactly ``shape``; ``keys[i]`` is row i's item key, None for padding rows."""

    shape: Shape
    arrays: dict[str, np.ndarray]  # input_ids, attention_mask, token_type_ids: (B, S) int64
    keys: tuple[Hashable | None, ...]

    @property
    def valid(self) -> np.ndarray:
        """(B,) bool: True for rows holding a real item."""
        return np.fromiter((k is not None for k in self.keys), dtype=bool, count=len(self.keys))

    @property
    def real_tokens(self) -> int:
        """Tokens of real items only: padding rows' one dummy mask position is not counted."""
        return int(self.arrays["attention_mask"][self.valid].sum())

    def __len__(self) -> int:
        return sum(k is not None for k in self.keys)


@runtime_checkable
class Batcher(Protocol):
    """A batching strategy: buckets now, sequence packing later."""

    def add(self, items: Iterable[Item]) -> list[Batch]: ...

    def flush(self) -> list[Batch]: ...

    @property
    def pending(self) -> int: ...


class BucketBatcher:
    """Each item goes to the smallest bucket that fits it; a full bucket becomes a batch.

    Bucketing by length is the length sort: items of similar length share a batch, so
    little compute goes to padding. ``sort_window`` bounds the wait: once more than
    ``sort_window`` items have been added after the oldest pending item, its bucket goes
    out as a partial (padded) batch. Hence at most ``min(sort_window + 1, sum(batch_size - 1))``
    items are pending between calls, and the output does not depend on how the items are
    split across ``add`` calls.
    """

    def __init__(
        self, shapes: Sequence[Shape], *, sort_window: int = 4096, pad_id: int = 0
    ) -> None:
        if not shapes:
            raise ValueError("at least one bucket shape is required, got none")
        lens = [s.seq_len for s in shapes]
        if any(a >= b for a, b in pairwise(lens)):
            raise ValueError(f"buckets must be strictly increasing, got {','.join(map(str, lens))}")
        if sort_window < 1:
            raise ValueError(f"sort_window must be ≥ 1, got {sort_window}")
        self._shapes = tuple(shapes)
        self._lens = lens
        self._sort_window = sort_window
        self._pad_id = pad_id
        # Per bucket, FIFO of (sequence number, item); the number says when it was added.
        self._queues: list[list[tuple[int, Item]]] = [[] for _ in shapes]
        self._added = 0

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return self._shapes

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues)

    def add(self, items: Iterable[Item]) -> list[Batch]:
        """Queue items; return the batches that became full or waited past the window.

        All items are checked before any is queued, so a bad item raises without having
        consumed (and lost) batches that earlier items of the same call would have emitted.
        """
        placed = [(self._bucket_of(item), item) for item in items]
        out: list[Batch] = []
        for b, item in placed:
            queue = self._queues[b]
            queue.append((self._added, item))
            self._added += 1
            if len(queue) == self._shapes[b].batch_size:
                out.append(self._emit(b))
            # Checked after every item, so at most one item crosses the window at a time:
            # only the oldest pending item can be stale, and only its bucket goes out.
            cutoff = self._added - 1 - self._sort_window
            for i, q in enumerate(self._queues):
                if q and q[0][0] < cutoff:
                    out.append(self._emit(i))
        return out

    def flush(self) -> list[Batch]:
        """Emit every non-empty bucket, oldest waiting item first."""
        order = sorted((q[0][0], i) for i, q in enumerate(self._queues) if q)
        return [self._emit(i) for _, i in order]

    def _bucket_of(self, item: Item) -> int:
        n = len(item.ids)
        if n == 0:
            raise ValueError(
                f"item {item.key!r} has no token ids (a tokenizer always emits specials)"
            )
        if item.key is None:
            raise ValueError("item key must not be None: None marks padding rows")
        if item.type_ids is not None and len(item.type_ids) != n:
            raise ValueError(
                f"item {item.key!r} has {len(item.type_ids)} token type ids for {n} token ids"
            )
        b = bisect_left(self._lens, n)
        if b == len(self._lens):
            raise ValueError(
                f"item {item.key!r} has {n} tokens, more than the largest bucket {self._lens[-1]}"
            )
        return b

    def _emit(self, b: int) -> Batch:
        shape = self._shapes[b]
        queue, self._queues[b] = self._queues[b], []
        rows, cols = shape.batch_size, shape.seq_len
        input_ids = np.full((rows, cols), self._pad_id, dtype=_INT)
        mask = np.zeros((rows, cols), dtype=_INT)
        types = np.zeros((rows, cols), dtype=_INT)
        for r, (_, item) in enumerate(queue):
            n = len(item.ids)
            input_ids[r, :n] = item.ids
            mask[r, :n] = 1
            if item.type_ids is not None:
                types[r, :n] = item.type_ids
        # Padding rows attend to one (pad) token: an all-zero mask row makes the softmax
        # 0/0 = NaN in some attention kernels. Their outputs are dropped anyway, but NaNs
        # can hit slow paths and trip NaN checks.
        mask[len(queue) :, 0] = 1
        keys = tuple(item.key for _, item in queue) + (None,) * (rows - len(queue))
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
        return Batch(shape=shape, arrays=arrays, keys=keys)

"""The pure batcher: token ids of many records in, batches of exactly a compiled shape out.

Compiled graphs (Inferentia, and the traced CPU graphs) accept only the fixed shapes they
were compiled for, so every batch must be exactly ``(batch_size, seq_len)`` of one bucket.
Nothing here does I/O, awaits or touches torch: the runner feeds items in and ships the
numpy arrays to a replica, and output order is restored by the caller from the keys.
"""

from __future__ import annotations

from bisect import bisect_left, insort
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
    """Arrays of exactly ``shape``, and the key of each of the graph's output rows.

    The graph answers one output row per batch row (buckets) or per segment slot of each
    row (packing: B × K); ``keys[i]`` is output row i's item key, None for padding.
    """

    shape: Shape
    arrays: dict[str, np.ndarray]  # (B, S) int64 each; packing adds segment_index (B, K)
    keys: tuple[Hashable | None, ...]
    real_tokens: int  # tokens of real items: what the batch is worth, padding excluded

    @property
    def valid(self) -> np.ndarray:
        """One bool per output row: True where it holds a real item."""
        return np.fromiter((k is not None for k in self.keys), dtype=bool, count=len(self.keys))

    def __len__(self) -> int:
        return sum(k is not None for k in self.keys)


@runtime_checkable
class Batcher(Protocol):
    """A batching strategy: buckets or sequence packing (`make_batcher`)."""

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
        real = sum(len(item.ids) for _, item in queue)
        return Batch(shape=shape, arrays=arrays, keys=keys, real_tokens=real)


class PackingBatcher:
    """Several items per row of one compiled shape, each a segment attending only to itself.

    Items are collected ``sort_window`` at a time, sorted longest first and packed best-fit
    (the row with the least room that still fits; as tight as first-fit decreasing, and
    found by bisection) into rows of ``seq_len`` tokens and at most ``max_segments``
    segments; the rows go out ``batch_size`` at a time, the last batch padded. Position ids
    restart at each segment's start (plus ``position_offset``: RoBERTa-style models count
    from padding_idx + 1). The graph answers one output per segment slot, so ``keys`` has
    ``batch_size × max_segments`` entries.
    """

    def __init__(
        self,
        shape: Shape,
        *,
        max_segments: int,
        position_offset: int = 0,
        sort_window: int = 4096,
        pad_id: int = 0,
    ) -> None:
        if max_segments < 1:
            raise ValueError(f"max_segments must be ≥ 1, got {max_segments}")
        if sort_window < 1:
            raise ValueError(f"sort_window must be ≥ 1, got {sort_window}")
        self._shape = shape
        self._k = max_segments
        self._offset = position_offset
        self._sort_window = sort_window
        self._pad_id = pad_id
        self._items: list[Item] = []
        # Checks are BucketBatcher's: one bucket of this shape.
        self._check = BucketBatcher([shape])._bucket_of

    @property
    def pending(self) -> int:
        return len(self._items)

    def add(self, items: Iterable[Item]) -> list[Batch]:
        new = list(items)
        for item in new:
            self._check(item)
        self._items.extend(new)
        out: list[Batch] = []
        while len(self._items) >= self._sort_window:
            window = self._items[: self._sort_window]
            del self._items[: self._sort_window]
            out.extend(self._pack(window))
        return out

    def flush(self) -> list[Batch]:
        window, self._items = self._items, []
        return self._pack(window)

    def _pack(self, items: list[Item]) -> list[Batch]:
        rows: list[list[Item]] = []
        room: list[tuple[int, int]] = []  # (free tokens, row) of rows that can take more
        for item in sorted(items, key=lambda it: -len(it.ids)):
            n = len(item.ids)
            i = bisect_left(room, (n, -1))
            if i == len(room):
                rows.append([item])
                free, row = self._shape.seq_len - n, len(rows) - 1
            else:
                free, row = room.pop(i)
                rows[row].append(item)
                free -= n
            if free > 0 and len(rows[row]) < self._k:
                insort(room, (free, row))
        b = self._shape.batch_size
        return [self._emit(rows[i : i + b]) for i in range(0, len(rows), b)]

    def _emit(self, rows: list[list[Item]]) -> Batch:
        b, s, k = self._shape.batch_size, self._shape.seq_len, self._k
        input_ids = np.full((b, s), self._pad_id, dtype=_INT)
        positions = np.zeros((b, s), dtype=_INT)
        types = np.zeros((b, s), dtype=_INT)
        segments = np.zeros((b, s), dtype=_INT)
        starts = np.zeros((b, k), dtype=_INT)
        keys: list[Hashable | None] = [None] * (b * k)
        real = 0
        for r, row in enumerate(rows):
            start = 0
            for slot, item in enumerate(row):
                end = start + len(item.ids)
                input_ids[r, start:end] = item.ids
                positions[r, start:end] = np.arange(self._offset, self._offset + end - start)
                if item.type_ids is not None:
                    types[r, start:end] = item.type_ids
                segments[r, start:end] = slot + 1
                starts[r, slot] = start
                keys[r * k + slot] = item.key
                start = end
            real += start
        arrays = {
            "input_ids": input_ids,
            "position_ids": positions,
            "token_type_ids": types,
            "segment_ids": segments,
            "segment_index": starts,
        }
        return Batch(shape=self._shape, arrays=arrays, keys=tuple(keys), real_tokens=real)


def make_batcher(
    strategy: str,
    shapes: Sequence[Shape],
    *,
    max_segments: int = 1,
    position_offset: int = 0,
    sort_window: int = 4096,
    pad_id: int = 0,
) -> Batcher:
    """The batcher an artifact's graphs expect (its `strategy`)."""
    if strategy == "packing":
        return PackingBatcher(
            shapes[0],
            max_segments=max_segments,
            position_offset=position_offset,
            sort_window=sort_window,
            pad_id=pad_id,
        )
    if strategy == "buckets":
        return BucketBatcher(shapes, sort_window=sort_window, pad_id=pad_id)
    raise ValueError(f"unknown batching strategy {strategy!r}: expected buckets or packing")

"""Tests for the pure bucket batcher: properties over random inputs, then specific cases."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjob.batching import Batch, Batcher, BucketBatcher, Item, Shape


def _items(lengths: Sequence[int], *, pairs: bool = False) -> list[Item]:
    # Ids start at 1000 + i so every token is distinguishable from padding and other items.
    return [
        Item(
            key=("s", i),
            ids=[1000 + i + j for j in range(n)],
            type_ids=[j % 2 for j in range(n)] if pairs else None,
        )
        for i, n in enumerate(lengths)
    ]


def _check_batch(
    batch: Batch, by_key: dict[Hashable, Item], shapes: Sequence[Shape], pad: int
) -> None:
    assert batch.shape in shapes
    rows, cols = batch.shape.batch_size, batch.shape.seq_len
    assert set(batch.arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    for a in batch.arrays.values():
        assert a.shape == (rows, cols)
        assert a.dtype == np.int64
        assert a.flags.c_contiguous
    ids, mask, types = (batch.arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert len(batch.keys) == rows
    n_real = len(batch)
    assert n_real >= 1, "no batch is all padding"
    # Real rows first, padding rows after.
    assert all(k is not None for k in batch.keys[:n_real])
    assert all(k is None for k in batch.keys[n_real:])
    assert batch.valid.tolist() == [True] * n_real + [False] * (rows - n_real)
    lens = [s.seq_len for s in shapes]
    tokens = 0
    for r, key in enumerate(batch.keys[:n_real]):
        item = by_key[key]
        n = len(item.ids)
        tokens += n
        assert batch.shape.seq_len == min(s for s in lens if s >= n), "smallest bucket that fits"
        assert ids[r, :n].tolist() == list(item.ids)
        assert (ids[r, n:] == pad).all()
        assert mask[r].tolist() == [1] * n + [0] * (cols - n)
        want_types = list(item.type_ids) if item.type_ids is not None else [0] * n
        assert types[r].tolist() == want_types + [0] * (cols - n)
    for r in range(n_real, rows):
        assert (ids[r] == pad).all()
        assert mask[r].tolist() == [1] + [0] * (cols - 1)
        assert (types[r] == 0).all()
    assert batch.real_tokens == tokens


@st.composite
def _scenario(draw: st.DrawFn) -> tuple[list[Shape], int, int, list[Item], list[int]]:
    lens = sorted(draw(st.sets(st.integers(1, 40), min_size=1, max_size=4)))
    shapes = [Shape(n, draw(st.integers(1, 6))) for n in lens]
    window = draw(st.one_of(st.integers(1, 12), st.just(4096)))
    pad = draw(st.sampled_from([0, 1, 7]))
    lengths = draw(st.lists(st.integers(1, lens[-1]), max_size=60))
    items = _items(lengths, pairs=draw(st.booleans()))
    cuts = sorted(draw(st.lists(st.integers(0, len(items)), max_size=8)))
    return shapes, window, pad, items, cuts


def _one_at_a_time(shapes: list[Shape], window: int, pad: int, items: list[Item]) -> list[Batch]:
    batcher = BucketBatcher(shapes, sort_window=window, pad_id=pad)
    out: list[Batch] = []
    for i, item in enumerate(items):
        out += batcher.add([item])
        # The window bounds the wait: nothing older than `window` items ago is still pending.
        done = {k for b in out for k in b.keys if k is not None}
        assert all(it.key in done for it in items[: max(0, i - window)])
    return out + batcher.flush()


@settings(max_examples=200, deadline=None)
@given(_scenario())
def test_properties(scenario: tuple[list[Shape], int, int, list[Item], list[int]]) -> None:
    shapes, window, pad, items, cuts = scenario
    by_key = {it.key: it for it in items}
    batcher = BucketBatcher(shapes, sort_window=window, pad_id=pad)
    bound = min(window + 1, sum(s.batch_size - 1 for s in shapes))
    out: list[Batch] = []
    emitted = 0
    for lo, hi in zip([0, *cuts], [*cuts, len(items)], strict=True):
        got = batcher.add(iter(items[lo:hi]))  # any iterable, not only lists
        for b in got:
            _check_batch(b, by_key, shapes, pad)
        out += got
        emitted += sum(len(b) for b in got)
        assert batcher.pending == hi - emitted
        assert batcher.pending <= bound
    tail = batcher.flush()
    assert batcher.pending == 0
    assert batcher.flush() == []
    for b in tail:
        _check_batch(b, by_key, shapes, pad)
    out += tail

    keys = [k for b in out for k in b.keys if k is not None]
    assert sorted(keys) == sorted(by_key), "every item exactly once"  # type: ignore[type-var]
    # Insertion order within each bucket.
    for shape in shapes:
        order = [k[1] for b in out if b.shape == shape for k in b.keys if k is not None]  # type: ignore[index]
        assert order == sorted(order)
    # The batches do not depend on how items were split across add() calls.
    ref = _one_at_a_time(shapes, window, pad, items)
    assert [(b.shape, b.keys) for b in out] == [(b.shape, b.keys) for b in ref]


def test_is_a_batcher() -> None:
    assert isinstance(BucketBatcher([Shape(8, 2)]), Batcher)


def test_full_batch_emitted_as_soon_as_bucket_fills() -> None:
    batcher = BucketBatcher([Shape(4, 2), Shape(8, 3)])
    a, b, c, d, e = (Item(k, [5] * n) for k, n in zip("abcde", [3, 6, 4, 8, 5], strict=True))
    assert batcher.add([a, b]) == []
    assert batcher.pending == 2
    (full,) = batcher.add([c])
    assert full.shape == Shape(4, 2)
    assert full.keys == ("a", "c")
    assert len(full) == 2
    assert full.real_tokens == 7
    assert batcher.add([d]) == []
    (full,) = batcher.add([e])
    assert full.keys == ("b", "d", "e")
    assert full.arrays["input_ids"].shape == (3, 8)
    assert batcher.pending == 0
    assert batcher.flush() == []


def test_window_emits_partial_batch() -> None:
    batcher = BucketBatcher([Shape(4, 4), Shape(8, 4)], sort_window=2, pad_id=9)
    assert batcher.add([Item("a", [1, 2])]) == []
    # "a" has had two items added after it: not yet more than the window.
    assert batcher.add([Item("b", [3] * 6), Item("c", [3] * 6)]) == []
    (partial,) = batcher.add([Item("d", [3] * 6)])
    assert partial.shape == Shape(4, 4)
    assert partial.keys == ("a", None, None, None)
    assert partial.valid.tolist() == [True, False, False, False]
    assert len(partial) == 1
    assert partial.real_tokens == 2
    assert partial.arrays["input_ids"].tolist() == [[1, 2, 9, 9]] + [[9, 9, 9, 9]] * 3
    # Padding rows attend to their first position only (an all-zero row can give NaN).
    assert partial.arrays["attention_mask"].tolist() == [[1, 1, 0, 0]] + [[1, 0, 0, 0]] * 3
    assert batcher.pending == 3
    (full,) = batcher.add([Item("e", [4] * 7)])
    assert full.keys == ("b", "c", "d", "e")
    assert batcher.pending == 0


def test_flush_emits_oldest_first_and_empties() -> None:
    batcher = BucketBatcher([Shape(2, 4), Shape(4, 4)])
    batcher.add([Item("long", [1, 2, 3]), Item("short", [1])])
    out = batcher.flush()
    assert [b.keys for b in out] == [("long", None, None, None), ("short", None, None, None)]
    assert batcher.pending == 0


def test_token_type_ids_carried_through() -> None:
    batcher = BucketBatcher([Shape(6, 2)])
    (batch,) = batcher.add(
        [Item("pair", [101, 7, 102, 8, 102], type_ids=[0, 0, 0, 1, 1]), Item("single", [101, 102])]
    )
    assert batch.arrays["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 0], [0] * 6]
    assert batch.arrays["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]


def test_numpy_ids_accepted() -> None:
    batcher = BucketBatcher([Shape(4, 1)])
    (batch,) = batcher.add([Item(0, np.array([3, 4], dtype=np.int32))])  # type: ignore[arg-type]
    assert batch.arrays["input_ids"].tolist() == [[3, 4, 0, 0]]
    assert batch.arrays["input_ids"].dtype == np.int64


@pytest.mark.parametrize(
    ("shapes", "kwargs", "message"),
    [
        ([Shape(32, 4), Shape(16, 4)], {}, "buckets must be strictly increasing, got 32,16"),
        ([Shape(16, 4), Shape(16, 8)], {}, "buckets must be strictly increasing, got 16,16"),
        ([], {}, "at least one bucket"),
        ([Shape(16, 4)], {"sort_window": 0}, "sort_window must be ≥ 1, got 0"),
    ],
)
def test_bad_batcher_config(shapes: list[Shape], kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BucketBatcher(shapes, **kwargs)


def test_bad_shape() -> None:
    with pytest.raises(ValueError, match="batch_size must be ≥ 1, got 0"):
        Shape(16, 0)
    with pytest.raises(ValueError, match="seq_len must be ≥ 1, got -1"):
        Shape(-1, 4)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            Item(("s3", 17), [1] * 9),
            r"item \('s3', 17\) has 9 tokens, more than the largest bucket 8",
        ),
        (Item(("s3", 4), []), r"item \('s3', 4\) has no token ids"),
        (Item("p", [1, 2, 3], type_ids=[0, 1]), "item 'p' has 2 token type ids for 3 token ids"),
        (Item(None, [1]), "key must not be None"),
    ],
)
def test_bad_item(item: Item, message: str) -> None:
    batcher = BucketBatcher([Shape(4, 2), Shape(8, 2)])
    # The good item before the bad one would fill a batch; the call must not consume it.
    batcher.add([Item("ok", [1])])
    with pytest.raises(ValueError, match=message):
        batcher.add([Item("ok2", [1]), item])
    assert batcher.pending == 1
    (batch,) = batcher.flush()
    assert batch.keys == ("ok", None)

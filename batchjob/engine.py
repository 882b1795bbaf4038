"""The dynamic-batching inference engine: records in, results out, shared by many callers.

`serve` (one call per HTTP request) and the SQS worker (one per message) hand it records;
the records of concurrent calls share the fixed-shape batches:

    infer() ─► tokenize (thread) ─► batcher ─► bounded queue ─► dispatcher ─► replica pool
                                       ▲                                        │
                        flusher: partial batches once the oldest            results ─► futures
                        item waited max_batch_delay and a replica starves

Full batches go out at once. A partial batch goes out once its oldest item has waited
`max_batch_delay` *and* a replica would otherwise have nothing to run (nothing queued, fewer
batches in flight than replicas): while every replica is busy, waiting longer costs no
latency and lets the batch fill (the batcher's sort window still bounds how long an item
can wait under sustained load). Backpressure comes from the pool: the dispatcher awaits
`submit`, the queue fills, and `infer` waits to add more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from batchjob.artifact import Artifact
from batchjob.batching import Batch, Batcher, Item, make_batcher
from batchjob.entities import Entity, TokenSpans
from batchjob.errors import BatchJobError, ReplicaError, UsageError
from batchjob.long_documents import Failed, TextOptions, Unit, plan_units, prompted
from batchjob.pair_tasks import ZeroShot
from batchjob.records import Record
from batchjob.results import Ran, Span, assemble
from batchjob.results import Result as Result
from batchjob.startup import mark
from batchjob.tasks import Head, default_head
from batchjob.token_classification import COLUMN, TokenClassification, assemble_entities
from batchjob.token_spans import refuse_pairs
from batchjob.tokens import RecordTokenizer
from batchjob.zero_shot import ZeroShotPlan

log = logging.getLogger("batchjob.engine")

DEFAULT_MAX_BATCH_DELAY = 0.005  # seconds
TRUNCATE = TextOptions()
# Items added to the batcher per step: building a batch's arrays is Python work on the event
# loop, so a large request is added in slices and the loop answers /ping in between.
ADD_SLICE = 256


class EngineClosedError(BatchJobError):
    """The engine is closing or closed: it takes no more records."""


class Submitter(Protocol):
    """What the engine needs of a replica pool (ReplicaPool is one)."""

    @property
    def size(self) -> int: ...

    async def submit(self, arrays: dict[str, np.ndarray]) -> asyncio.Future[np.ndarray]: ...


@dataclass
class EngineStats:
    records: int = 0  # records inferred (error records not counted)
    windows: int = 0  # rows run for them (more than records where long ones were split)
    batches: int = 0
    partial_flushes: int = 0  # flushes of partial batches by the delay
    real_tokens: int = 0
    compiled_tokens: int = 0


@dataclass(eq=False)
class _Call:
    """One `infer` call's records on their way: results land by index, and one future says
    when all have. (A future per record costs the event loop dearly on a 20k-record request.)"""

    results: list[Result | None]
    truncated: list[bool]
    done: asyncio.Future[None]
    remaining: int = 0
    raw: dict[int, np.ndarray] | None = None  # windowed calls: the graph's output per unit
    # Token classification: each item's token spans, and (windowed) each unit's entities.
    spans: dict[int, TokenSpans] | None = None
    found: dict[int, list[Entity]] | None = None

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


# An item's key in the batcher: its call and its index there.
_Key = tuple[_Call, int]


def engine_batcher(artifact: Artifact, pad_id: int, sort_window: int = 4096) -> Batcher:
    """The batching strategy the artifact's graphs expect (buckets, or sequence packing)."""
    return make_batcher(
        artifact.strategy,
        artifact.shapes,
        max_segments=artifact.max_segments,
        position_offset=artifact.position_offset,
        sort_window=sort_window,
        pad_id=pad_id,
    )


class Engine:
    """Batches the records of concurrent `infer` calls into the artifact's compiled shapes."""

    def __init__(
        self,
        artifact: Artifact,
        pool: Submitter,
        *,
        max_batch_delay: float = DEFAULT_MAX_BATCH_DELAY,
        sort_window: int = 4096,
        tokenizer: RecordTokenizer | None = None,
        head: Head | None = None,  # None: the artifact's (float32 embeddings)
    ) -> None:
        if not max_batch_delay >= 0:
            raise UsageError(f"max_batch_delay must be ≥ 0 seconds, got {max_batch_delay}")
        self.artifact, self.pool, self.max_batch_delay = artifact, pool, max_batch_delay
        self.head = head or default_head(artifact)
        self.tokenizer = tokenizer or RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
        self.batcher = engine_batcher(artifact, self.tokenizer.pad_id, sort_window)
        self.token_head = self.head if isinstance(self.head, TokenClassification) else None
        if self.token_head is not None:
            self.tokenizer.keep_spans()
        # the output's columns
        self.task_names = [f.name for f in self.head.fields()]
        self.stats = EngineStats()
        # Items in the batcher, oldest first, with when they came: the flusher's clock.
        self._waiting: collections.OrderedDict[_Key, float] = collections.OrderedDict()
        # Batches for the dispatcher. Backpressure is applied before items go into the batcher
        # (`_add`), never between the batcher emitting a batch and this queue taking it: a call
        # cancelled there would strand the other calls' records that share its batches.
        self._batches: asyncio.Queue[Batch] = asyncio.Queue()
        self._queue_limit = 2 * pool.size
        self._taken = asyncio.Event()  # the dispatcher took a batch: there may be room
        self._submitting = False
        self._in_flight = 0  # batches the pool took and has not answered yet
        self._changed = asyncio.Event()  # items added, the dispatcher or a replica freed up
        self._idle = asyncio.Event()  # no infer() call in progress
        self._idle.set()
        self._active = 0
        self._closing = False
        self._closed: str | None = None  # why, once close() stopped the dispatcher
        self._broken: BaseException | None = None  # a background task died: a bug
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("Engine.start() called twice")
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="batchjob-engine-dispatch"),
            asyncio.create_task(self._flush_loop(), name="batchjob-engine-flush"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # The loops only end by cancellation; anything else would leave callers waiting forever.
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("engine task %s died: %r", task.get_name(), error, exc_info=error)
        self._broken = error
        for call, _ in self._waiting:
            call.fail(BatchJobError(f"engine failed: {error!r}"))

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Take no new calls; let calls in progress finish by `timeout`; then stop."""
        self._closing = True
        self._changed.set()  # the flusher sends what is left without waiting
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # What calls still in progress wait for (if the timeout passed) will not come.
        self._closed = f"engine closed after {timeout:g} s"
        self._taken.set()
        closed = EngineClosedError(self._closed)
        while not self._batches.empty():
            self._fail(self._batches.get_nowait(), closed)
        for call, _ in self._waiting:
            call.fail(closed)
        self._waiting.clear()

    async def infer(
        self,
        records: Sequence[Record],
        options: TextOptions = TRUNCATE,
        zero_shot: ZeroShot | None = None,
    ) -> list[Result]:
        """One result per record, in order. Error records come back as they are.
        `zero_shot`: this call's zero-shot head (a request's parameters), for the engine's."""
        if self._closing:
            raise EngineClosedError("the engine is shutting down: it takes no new records")
        if self._broken is not None:
            raise BatchJobError(f"engine failed: {self._broken!r}")
        if not self._tasks:
            raise RuntimeError("Engine.infer() before start()")
        self._active += 1
        self._idle.clear()
        try:
            if self.token_head is not None:
                records = refuse_pairs(list(records))
            zero_shot = zero_shot or (self.head if isinstance(self.head, ZeroShot) else None)
            if options.windowed or zero_shot is not None:  # rows ≠ records
                return await self._infer_windows(list(records), options, zero_shot)
            if options.prompt:
                records = [prompted(r, options.prompt) for r in records]
            return await self._infer(list(records))
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _infer(self, records: list[Record]) -> list[Result]:
        if not any(r.error is None for r in records):
            return [Result(None, error=r.error, windows=0) for r in records]
        mark("first records in", once=True)
        encoded = await asyncio.to_thread(self.tokenizer.encode, records)
        n = len(records)
        call = _Call([None] * n, [False] * n, asyncio.get_running_loop().create_future())
        if self.token_head is not None:
            call.spans = {}
        items = []
        for i, (record, enc) in enumerate(zip(records, encoded, strict=True)):
            if enc is None:
                call.results[i] = Result(None, error=record.error, windows=0)
            else:
                call.truncated[i] = enc.truncated
                if call.spans is not None and enc.spans is not None:
                    call.spans[i] = enc.spans
                items.append(Item((call, i), enc.ids, enc.type_ids))
        call.remaining = len(items)
        self.stats.records += len(items)
        self.stats.windows += len(items)
        try:
            for start in range(0, len(items), ADD_SLICE):
                await self._add(items[start : start + ADD_SLICE])
            await call.done
        except BaseException:
            call.done.cancel()  # nobody waits for it any more: its late results are dropped
            raise
        return cast(list[Result], call.results)

    async def _add(self, items: list[Item]) -> None:
        while self._batches.qsize() >= self._queue_limit and not self._closed:
            self._taken.clear()
            await self._taken.wait()
        if self._closed:  # close() timed out with this call still adding: nothing would run it
            raise EngineClosedError(self._closed)
        now = time.monotonic()
        for item in items:
            self._waiting[cast(_Key, item.key)] = now
        for batch in self.batcher.add(items):
            self._enqueue(batch)
        self._changed.set()
        await asyncio.sleep(0)  # let /ping and other requests in between slices

    async def _infer_windows(
        self, records: list[Record], options: TextOptions, zero_shot: ZeroShot | None = None
    ) -> list[Result]:
        """Records → rows to run (a long record's windows tokenized a slice at a time, so
        its first batches run while the rest are tokenized) → one Result per record."""
        if not any(r.error is None for r in records):
            return [Result(None, error=r.error, windows=0) for r in records]
        mark("first records in", once=True)
        n = len(records)
        call = _Call([None] * n, [False] * n, asyncio.get_running_loop().create_future(), raw={})
        if self.token_head is not None:
            call.spans, call.found = {}, {}
        units: list[Ran] = []
        failed: dict[int, str] = {}
        expanded = None  # zero-shot: a row per candidate label
        if zero_shot is not None:
            expanded = ZeroShotPlan(zero_shot, self.tokenizer, records, options.prompt)
        planned = (
            iter(expanded) if expanded is not None else plan_units(self.tokenizer, records, options)
        )
        call.remaining = 1  # until every unit is planned
        try:
            while not call.done.done() and (
                part := await asyncio.to_thread(_take, planned, ADD_SLICE)
            ):
                items = []
                for unit in part:
                    if isinstance(unit, Failed):
                        failed[unit.record] = unit.error
                        continue
                    enc = unit.encoded
                    if call.spans is not None and enc.spans is not None:
                        # Offsets into the whole text: entities of windows merge there.
                        call.spans[len(units)] = enc.spans.shifted(unit.char_start)
                    items.append(Item((call, len(units)), enc.ids, enc.type_ids))
                    span = Span(unit.chunk, unit.char_start, unit.char_end)
                    units.append(Ran(unit.record, span, len(enc.ids)))
                call.remaining += len(items)
                self.stats.windows += len(items)
                await self._add(items)
            self.stats.records += n - len(failed)
            call.remaining -= 1
            if not call.remaining and not call.done.done():
                call.done.set_result(None)
            await call.done  # raises if a batch of it failed (planning stopped there)
        except BaseException:
            call.done.cancel()
            raise
        assert call.raw is not None
        if expanded is not None:
            return expanded.assemble(units, failed, call.raw)
        if call.found is not None:
            return assemble_entities(records, units, failed, call.found)
        return assemble(self.head, records, units, failed, call.raw, options.long_documents)

    def _enqueue(self, batch: Batch) -> None:
        for key in batch.keys:
            if key is not None:
                self._waiting.pop(cast(_Key, key), None)
        self.stats.batches += 1
        self.stats.real_tokens += batch.real_tokens
        self.stats.compiled_tokens += batch.shape.seq_len * batch.shape.batch_size
        self._batches.put_nowait(batch)

    def _pool_idle(self) -> bool:
        """Nothing queued for the pool, and a replica without a batch: it is about to starve.
        (The pool keeps two batches per replica; flushing into the second slot would only
        make the batch wait, unfilled, behind the first.)"""
        return self._batches.empty() and not self._submitting and self._in_flight < self.pool.size

    async def _flush_loop(self) -> None:
        while True:
            self._changed.clear()
            timeout = None
            if self._waiting:
                oldest = next(iter(self._waiting.values()))
                due = oldest + (0.0 if self._closing else self.max_batch_delay)
                now = time.monotonic()
                if now >= due and self._pool_idle():
                    self.stats.partial_flushes += 1
                    for batch in self.batcher.flush():
                        self._enqueue(batch)
                    self._waiting.clear()  # (already: every item went into a batch)
                    continue
                if now < due:
                    timeout = due - now
            # Woken by new items, the dispatcher freeing up, or the oldest item falling due.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _dispatch(self) -> None:
        while True:
            batch = await self._batches.get()
            self._taken.set()
            self._submitting = True
            try:
                future = await self.pool.submit(batch.arrays)
            except asyncio.CancelledError:  # close() gave up waiting: no caller may hang
                self._fail(batch, EngineClosedError("engine closed before this batch ran"))
                raise
            except Exception as e:  # the pool failed or is closing: fail this batch, go on
                self._fail(batch, e)
                continue
            finally:
                self._submitting = False
                self._changed.set()
            self._in_flight += 1
            future.add_done_callback(functools.partial(self._deliver, batch))

    def _deliver(self, batch: Batch, future: asyncio.Future[np.ndarray]) -> None:
        self._in_flight -= 1
        self._changed.set()
        if future.cancelled():
            self._fail(batch, ReplicaError("the replica pool dropped this batch"))
            return
        if (error := future.exception()) is not None:
            self._fail(batch, error)
            return
        found: list[list[Entity]] | None = None  # token classification: each row's entities
        try:
            outputs = future.result()
            rows = np.flatnonzero(batch.valid)
            keys = [cast(_Key, batch.keys[row]) for row in rows]
            head = self.head
            if isinstance(head, TokenClassification):
                spans = [cast(dict[int, TokenSpans], call.spans)[i] for call, i in keys]
                found = head.batch_entities(batch, outputs, spans)
                plain, columns = [], {}
            else:
                # Windowed calls take the graph's outputs as they are: their values are made
                # when the record's windows are put together (results.assemble), the head's
                # columns last.
                plain = [row for row, (call, _) in zip(rows, keys, strict=True) if call.raw is None]
                columns = head.columns(outputs[plain]) if plain else {}
        except Exception as e:  # a callback's exception would only be logged: callers would hang
            shape = f"{batch.shape.batch_size}x{batch.shape.seq_len}"
            self._fail(batch, BatchJobError(f"unreadable model output for a {shape} batch: {e!r}"))
            return
        place = {row: j for j, row in enumerate(plain)}  # a plain row's place in `columns`
        for k, (row, (call, i)) in enumerate(zip(rows, keys, strict=True)):
            if call.done.done():  # its caller went away, or another batch of it failed
                continue
            if found is not None and call.found is not None:  # a window: merged at the end
                call.found[i] = found[k]
            elif found is not None:
                call.results[i] = Result({COLUMN: found[k]}, call.truncated[i])
            elif call.raw is not None:
                call.raw[i] = outputs[row]
            else:
                call.results[i] = Result(
                    {name: col[place[row]] for name, col in columns.items()}, call.truncated[i]
                )
            call.remaining -= 1
            if not call.remaining:
                call.done.set_result(None)

    @staticmethod
    def _fail(batch: Batch, error: BaseException) -> None:
        for key in batch.keys:
            if key is not None:
                cast(_Key, key)[0].fail(error)


def _take(units: Iterator[Unit | Failed], count: int) -> list[Unit | Failed]:
    return list(itertools.islice(units, count))

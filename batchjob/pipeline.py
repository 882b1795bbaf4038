"""One shard through the engine, as `run` and `worker` both write shards:

    chunks of records ─► Engine.infer (a few chunks in flight, sharing batches with every
    other caller's) ─► rows in input order ─► the output's temp file ─► published once

Rows reach the output in input order as the oldest chunk finishes; a row group is written
every ROWS_PER_WRITE rows, so memory stays bounded by the chunks in flight. The output is
published only when the whole shard is done (sinks.py: a rename, or one conditional S3
upload), and thrown away on any failure or cancellation.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass

from batchjob.engine import TRUNCATE, Engine
from batchjob.long_documents import TextOptions
from batchjob.pair_tasks import Ranking, assign_ranks
from batchjob.records import Record
from batchjob.results import Result
from batchjob.sinks import OutputWriter, Row, row_columns
from batchjob.token_classification import chunk_rows

CHUNKS_IN_FLIGHT = 4  # per shard: results are written in order as the oldest chunk finishes
ROWS_PER_WRITE = 4096  # rows per Parquet row group


@dataclass
class Counts:
    """What writing shards produced: `run`'s manifest, a worker's message, their summaries."""

    outputs: int = 0  # outputs written by us
    existing: int = 0  # outputs there already (a redelivery, another run's)
    documents: int = 0  # records written (a row each, or a row per window: chunk)
    errors: int = 0  # error rows among them
    truncated: int = 0
    windows: int = 0  # rows the model ran for the documents (--long-documents chunk, mean)
    split: int = 0  # documents run as more than one window

    def add(self, other: Counts) -> None:
        self.outputs += other.outputs
        self.existing += other.existing
        self.documents += other.documents
        self.errors += other.errors
        self.truncated += other.truncated
        self.windows += other.windows
        self.split += other.split


async def write_shard(
    engine: Engine,
    writer: OutputWriter,
    chunks: Iterator[list[Record]],
    *,
    threaded: bool = False,
    on_rows: Callable[[int], None] | None = None,
    options: TextOptions = TRUNCATE,
    keep: Sequence[str] = (),
) -> Counts:
    """Chunks of records (read in a thread when `threaded`: parsing, maybe gunzip) → the
    engine → rows in order → `writer`, committed. `on_rows(n)` after each row group, with
    the documents it held. With `--long-documents chunk` (`options`), a row per window.
    `keep` names the records' kept columns (`Record.kept`, read with `Fields.keep`): a
    chunked document's are repeated on each of its window rows."""
    counts = Counts()
    task_names = engine.task_names
    chunked = chunk_rows(engine.head, options.long_documents)
    pending: deque[tuple[list[Record], asyncio.Task[list[Result]]]] = deque()
    rows: list[Row] = []
    documents = 0  # in `rows`
    # text-ranking with --group-field: `rank` within each group of the shard, so the shard's
    # rows (small: id, score, kept columns) are held until its last record is in.
    ranked = isinstance(engine.head, Ranking) and engine.head.group_field is not None
    groups: list[str | None] = []

    async def oldest_done() -> None:
        nonlocal documents
        records, task = pending.popleft()
        results = await task
        for record, result in zip(records, results, strict=True):
            documents += 1
            counts.windows += result.windows
            counts.split += result.windows > 1
            new = result_rows(record, result)
            rows.extend(new)
            groups.extend([record.group] * len(new))
        if (len(rows) >= ROWS_PER_WRITE and not ranked) or not pending:
            if ranked:
                assign_ranks([row.values for row in rows], groups)
            for start in range(0, max(len(rows), 1), ROWS_PER_WRITE):  # an empty shard too
                part = rows[start : start + ROWS_PER_WRITE]
                writer.write(row_columns(task_names, part, chunked, keep))
            groups.clear()
            counts.documents += documents
            counts.errors += sum(row.error is not None for row in rows)
            counts.truncated += sum(row.truncated for row in rows)
            if on_rows is not None:
                on_rows(documents)
            rows.clear()
            documents = 0

    try:
        while True:
            if threaded:
                records = await asyncio.to_thread(next, chunks, None)
            else:
                records = next(chunks, None)
            if records is None:
                break
            pending.append((records, asyncio.create_task(engine.infer(records, options))))
            if len(pending) >= CHUNKS_IN_FLIGHT:
                await oldest_done()
        while pending:
            await oldest_done()
    except BaseException:
        for _, task in pending:
            task.cancel()
        await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
        writer.abort()
        raise
    if await writer.commit():
        counts.outputs = 1
    else:
        counts.existing = 1
    return counts


def result_rows(record: Record, result: Result) -> list[Row]:
    """A record's output rows: one, or with `--long-documents chunk` one per window, each
    carrying the record's kept values."""
    if not result.chunks:
        return [Row(record.id, result.values, result.truncated, result.error, kept=record.kept)]
    return [
        Row(record.id, values, False, None, astuple(span), record.kept)
        for span, values in result.chunks
    ]


def chunked(records: list[Record], size: int) -> Iterator[list[Record]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]

"""A message's work, done: S3 objects, prefixes and inline documents → the engine → Parquet
outputs, each written once.

Records stream from each shard in chunks; a few chunks per shard are in the engine at a
time (where they share batches with every other message's), and rows reach the output in
input order as the oldest chunk finishes. Before any work, an output that exists already is
looked for (a HEAD): a redelivered message costs nothing else. Publishing is `run`'s
(sinks.py: a temp file, then one conditional upload), so two workers racing on one message
write one object, and the second counts it as existing.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from batchjob.config import WorkerSpec
from batchjob.engine import Engine, Result
from batchjob.errors import BatchJobError
from batchjob.messages import InlineWork, JobWork, MessageError, ObjectWork, Work
from batchjob.paths import allowed, is_under, output_problems, overlap
from batchjob.records import (
    Fields,
    Record,
    detect_format,
    is_gzip,
    read_records,
    records_from_objects,
)
from batchjob.s3 import S3Url
from batchjob.shards import ShardRef
from batchjob.sinks import OutputWriter, Row, output_schema, row_columns
from batchjob.storage import Storage
from batchjob.tasks import task_fields

CHUNK_RECORDS = 256  # records per Engine.infer call
CHUNKS_IN_FLIGHT = 4  # per shard: results are written in order as the oldest chunk finishes
ROWS_PER_WRITE = 4096  # rows per Parquet row group
SHARDS_IN_FLIGHT = 4  # per job message naming a prefix


@dataclass
class Counts:
    """What a message's work produced."""

    what: str = ""  # the work: its input → its output
    outputs: int = 0  # written by us
    existing: int = 0  # there already (a duplicate delivery, or another worker's)
    documents: int = 0
    errors: int = 0

    def add(self, other: Counts) -> None:
        self.outputs += other.outputs
        self.existing += other.existing
        self.documents += other.documents
        self.errors += other.errors

    def __str__(self) -> str:
        existing = f", {self.existing} existed already" if self.existing else ""
        return (
            f"{self.what}: {self.outputs} output(s) written{existing}, {self.documents} "
            f"documents, {self.errors} error rows"
        )


class Executor:
    """Does the work messages ask for, with the worker's engine and storage."""

    def __init__(self, spec: WorkerSpec, storage: Storage, engine: Engine) -> None:
        self.spec, self.storage, self.engine = spec, storage, engine
        self.schema = output_schema(engine.artifact.task)
        self.task_names = [f.name for f in task_fields(engine.artifact.task)]
        self.fields = Fields(spec.text_field, spec.text_pair_field, spec.id_field)
        self.inferred = 0  # documents with results so far: for the throughput log
        self.output = S3Url.parse(spec.output)
        # None: --allow-any-input. Else what S3 events and job messages may read.
        self.allowed = None if spec.allow_any_input else [S3Url.parse(p) for p in spec.allow_input]

    async def do(self, works: list[Work]) -> Counts:
        counts = Counts(what="; ".join(self.describe(work) for work in works))
        for work in works:
            if isinstance(work, InlineWork):
                counts.add(await self._inline(work))
            elif isinstance(work, ObjectWork):
                counts.add(await self._object(work.url, self.spec.output))
            else:
                counts.add(await self._job(work))
        return counts

    def describe(self, work: Work) -> str:
        if isinstance(work, InlineWork):
            return f"{len(work.documents)} inline documents → inline/{work.id}.parquet"
        if isinstance(work, ObjectWork):
            return f"{work.url} → {self.spec.output}"
        return f"{work.input} → {work.output or self.spec.output}"

    def own_output(self, url: S3Url) -> bool:
        """An event for one of our outputs (notifications on the output's bucket): to work on
        it would write an output of the output, and so on, forever."""
        return is_under(url, self.output)

    def _check_input(self, url: S3Url, what: str) -> None:
        """Nothing outside --allow-input is read (not even listed or looked at)."""
        if self.allowed is not None and not allowed(url, self.allowed):
            prefixes = ", ".join(map(str, self.allowed))
            raise MessageError(f"{what} {url} is not under --allow-input ({prefixes}): refused")

    async def _object(self, url: S3Url, output: str) -> Counts:
        """One object → `<output>/<key without extension>.parquet`."""
        self._check_input(url, "object")
        name = posixpath.basename(url.key)
        ref = ShardRef(str(url), url.key, detect_format(name), is_gzip(name))
        if why := overlap(output, None, [ref]):
            raise MessageError(f"{why}: refused")
        return await self._shard(ref, output)

    async def _job(self, work: JobWork) -> Counts:
        self._check_input(S3Url.parse(work.input), "job input")
        output = work.output or self.spec.output
        out = S3Url.parse(output)
        if not is_under(S3Url(out.bucket, out.prefix), self.output):
            raise MessageError(f"job output {output} is not under --output {self.spec.output}")
        if why := overlap(output, work.input, []):
            raise MessageError(f"{why}: refused")
        shards = await self.storage.list_shards(work.input, exclude=output, label="job input")
        if len(shards) == 1 and shards[0].path == work.input:  # an object, not a prefix
            return await self._object(S3Url.parse(work.input), output)
        if why := overlap(output, work.input, shards):
            raise MessageError(f"{why}: refused")
        done = await self.storage.existing_outputs(output)
        counts = Counts(existing=sum(s.output_rel in done for s in shards))
        todo = [s for s in shards if s.output_rel not in done]
        limit = asyncio.Semaphore(SHARDS_IN_FLIGHT)
        total, problems = len(todo), output_problems(output, todo)
        failed = [f"{rel}: {why}" for rel, why in problems.items()]
        todo = [s for s in todo if s.rel not in problems]

        async def one(ref: ShardRef) -> None:
            # A shard that fails doesn't stop the others: their outputs are committed, and
            # the message's next delivery skips them.
            async with limit:
                try:
                    counts.add(await self._shard(ref, output))
                except (BatchJobError, OSError) as e:
                    failed.append(f"{ref.rel}: {e}")

        await asyncio.gather(*(one(ref) for ref in todo))
        if failed:
            raise BatchJobError(
                f"{len(failed)} of {total} shards failed ({counts.outputs} written): "
                + "; ".join(failed[:3])
            )
        return counts

    async def _inline(self, work: InlineWork) -> Counts:
        rel = f"inline/{work.id}.parquet"
        if await self.storage.output_exists(self.spec.output, rel):
            return Counts(existing=1)
        records = records_from_objects(work.documents, f"inline/{work.id}", self.fields)
        writer = await self.storage.writer(self.spec.output, rel, self.schema)
        return await self._write(writer, _chunked(records))

    async def _shard(self, ref: ShardRef, output: str) -> Counts:
        if await self.storage.output_exists(output, ref.output_rel):
            return Counts(existing=1)
        stream = await self.storage.open(ref)
        try:
            reader = read_records(
                stream, ref.format, ref.rel, self.fields, gzip=ref.gzip, chunk_size=CHUNK_RECORDS
            )
            writer = await self.storage.writer(output, ref.output_rel, self.schema)
            return await self._write(writer, reader, threaded=True)
        finally:
            stream.close()

    async def _write(
        self, writer: OutputWriter, chunks: Iterator[list[Record]], *, threaded: bool = False
    ) -> Counts:
        """Chunks of records → the engine (a few chunks in flight) → rows in order → commit."""
        counts = Counts()
        pending: deque[tuple[list[Record], asyncio.Task[list[Result]]]] = deque()
        rows: list[Row] = []

        async def oldest_done() -> None:
            records, task = pending.popleft()
            results = await task
            self.inferred += len(results)
            for record, result in zip(records, results, strict=True):
                rows.append((record.id, result.values, result.truncated, result.error))
                counts.errors += result.error is not None
            if len(rows) >= ROWS_PER_WRITE or not pending:
                writer.write(row_columns(self.task_names, rows))
                counts.documents += len(rows)
                rows.clear()

        try:
            while True:
                if threaded:  # a shard's reader: parsing, and maybe gunzip
                    records = await asyncio.to_thread(next, chunks, None)
                else:
                    records = next(chunks, None)
                if records is None:
                    break
                pending.append((records, asyncio.create_task(self.engine.infer(records))))
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


def _chunked(records: list[Record]) -> Iterator[list[Record]]:
    for start in range(0, len(records), CHUNK_RECORDS):
        yield records[start : start + CHUNK_RECORDS]

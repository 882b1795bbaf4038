"""A message's work, done: S3 objects, prefixes and inline documents → the engine → Parquet
outputs, each written once.

Each shard goes through `pipeline.write_shard`, as `run`'s do: its chunks share the engine's
batches with every other message's, rows reach the output in input order. Before any work,
an output that exists already is looked for (a HEAD): a redelivered message costs nothing
else. Publishing is `run`'s (sinks.py: a temp file, then one conditional upload), so two
workers racing on one message write one object, and the second counts it as existing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import posixpath

from batchjob.config import WorkerSpec
from batchjob.engine import Engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.messages import InlineWork, JobWork, MessageError, ObjectWork, Work
from batchjob.paths import allowed, is_under, output_problems, overlap
from batchjob.pipeline import Counts, chunked, write_shard
from batchjob.records import Fields, detect_format, is_gzip, read_records, records_from_objects
from batchjob.s3 import S3Url
from batchjob.shards import ShardRef
from batchjob.sinks import SchemaSource, check_keep_columns, output_schema_source
from batchjob.storage import Storage

CHUNK_RECORDS = 256  # records per Engine.infer call: small, for a message's latency
SHARDS_IN_FLIGHT = 4  # per job message naming a prefix


def message_line(what: str, counts: Counts) -> str:
    """A message's log line after its timing: its work, then what came of it."""
    existing = f", {counts.existing} existed already" if counts.existing else ""
    return (
        f"{what}: {counts.outputs} output(s) written{existing}, {counts.documents} "
        f"documents, {counts.errors} error rows"
    )


class Executor:
    """Does the work messages ask for, with the worker's engine and storage."""

    def __init__(self, spec: WorkerSpec, storage: Storage, engine: Engine) -> None:
        self.spec, self.storage, self.engine = spec, storage, engine
        self.fields = Fields(spec.text_field, spec.text_pair_field, spec.id_field)
        self.inferred = 0  # documents with results so far: for the throughput log
        self.output = S3Url.parse(spec.output)
        # None: --allow-any-input. Else what S3 events and job messages may read.
        self.allowed = None if spec.allow_any_input else [S3Url.parse(p) for p in spec.allow_input]

    def _output(self, keep: tuple[str, ...] | None) -> tuple[Fields, SchemaSource]:
        """How records are read and outputs written for a message that keeps `keep` (None:
        --keep-columns)."""
        if keep is None:
            keep = self.spec.output_format.keep_columns
        try:
            check_keep_columns(keep, self.engine.task_names, "keep_columns")
        except UsageError as e:
            raise MessageError(str(e)) from None
        fields = dataclasses.replace(self.fields, keep=keep)
        return fields, output_schema_source(self.engine, keep)

    async def do(self, works: list[Work]) -> Counts:
        counts = Counts()
        for work in works:
            if isinstance(work, InlineWork):
                counts.add(await self._inline(work))
            elif isinstance(work, ObjectWork):
                counts.add(await self._object(work.url, self.spec.output, None))
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

    async def _object(self, url: S3Url, output: str, keep: tuple[str, ...] | None) -> Counts:
        """One object → `<output>/<key without extension>.parquet`."""
        self._check_input(url, "object")
        name = posixpath.basename(url.key)
        ref = ShardRef(str(url), url.key, detect_format(name), is_gzip(name))
        if why := overlap(output, None, [ref]):
            raise MessageError(f"{why}: refused")
        return await self._shard(ref, output, keep)

    async def _job(self, work: JobWork) -> Counts:
        self._check_input(S3Url.parse(work.input), "job input")
        self._output(work.keep_columns)  # a bad keep_columns fails the message before work
        output = work.output or self.spec.output
        out = S3Url.parse(output)
        if not is_under(S3Url(out.bucket, out.prefix), self.output):
            raise MessageError(f"job output {output} is not under --output {self.spec.output}")
        if why := overlap(output, work.input, []):
            raise MessageError(f"{why}: refused")
        shards = await self.storage.list_shards(work.input, exclude=output, label="job input")
        if len(shards) == 1 and shards[0].path == work.input:  # an object, not a prefix
            return await self._object(S3Url.parse(work.input), output, work.keep_columns)
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
                    counts.add(await self._shard(ref, output, work.keep_columns))
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
        fields, schema = self._output(work.keep_columns)
        if await self.storage.output_exists(self.spec.output, rel):
            return Counts(existing=1)
        records = records_from_objects(work.documents, f"inline/{work.id}", fields)
        writer = await self.storage.writer(self.spec.output, rel, schema)
        return await write_shard(
            self.engine,
            writer,
            chunked(records, CHUNK_RECORDS),
            on_rows=self._inferred,
            keep=fields.keep,
        )

    async def _shard(self, ref: ShardRef, output: str, keep: tuple[str, ...] | None) -> Counts:
        fields, schema = self._output(keep)
        if await self.storage.output_exists(output, ref.output_rel):
            return Counts(existing=1)
        stream = await self.storage.open(ref)
        try:
            reader = read_records(
                stream, ref.format, ref.rel, fields, gzip=ref.gzip, chunk_size=CHUNK_RECORDS
            )
            writer = await self.storage.writer(output, ref.output_rel, schema)
            return await write_shard(
                self.engine,
                writer,
                reader,
                threaded=True,
                on_rows=self._inferred,
                keep=fields.keep,
            )
        finally:
            stream.close()

    def _inferred(self, documents: int) -> None:
        self.inferred += documents

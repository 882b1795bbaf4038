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
from dataclasses import dataclass

from batchjob.config import WorkerSpec
from batchjob.engine import Engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.long_documents import TextOptions
from batchjob.messages import InlineWork, JobWork, MessageError, ObjectWork, TextRequest, Work
from batchjob.paths import allowed, is_under, output_problems, overlap
from batchjob.pipeline import Counts, chunked, write_shard
from batchjob.prompts import resolve_text_options
from batchjob.records import Fields, detect_format, is_gzip, read_records, records_from_objects
from batchjob.s3 import S3Url
from batchjob.shards import ShardRef
from batchjob.sinks import SchemaSource, check_keep_columns, output_schema_source
from batchjob.storage import Storage
from batchjob.token_classification import chunk_rows

CHUNK_RECORDS = 256  # records per Engine.infer call: small, for a message's latency
SHARDS_IN_FLIGHT = 4  # per job message naming a prefix


def message_line(what: str, counts: Counts) -> str:
    """A message's log line after its timing: its work, then what came of it."""
    existing = f", {counts.existing} existed already" if counts.existing else ""
    split = f" ({counts.windows} windows, {counts.split} split)" if counts.split else ""
    return (
        f"{what}: {counts.outputs} output(s) written{existing}, {counts.documents} "
        f"documents{split}, {counts.errors} error rows"
    )


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a message asks of how its records are read (its kept columns), run (its text
    options) and written (the schema those make)."""

    fields: Fields
    options: TextOptions
    schema: SchemaSource


class Executor:
    """Does the work messages ask for, with the worker's engine and storage."""

    def __init__(self, spec: WorkerSpec, storage: Storage, engine: Engine) -> None:
        self.spec, self.storage, self.engine = spec, storage, engine
        # The worker's flags, checked before it started (worker.py): UsageError there.
        self.options = resolve_text_options(
            engine.artifact,
            engine.tokenizer,
            long_documents=spec.long_documents,
            chunk_overlap=spec.chunk_overlap,
            prompt=spec.prompt,
            prompt_name=spec.prompt_name,
            error=UsageError,
        )
        self.fields = Fields(spec.text_field, spec.text_pair_field, spec.id_field)
        self.inferred = 0  # documents with results so far: for the throughput log
        self.output = S3Url.parse(spec.output)
        # None: --allow-any-input. Else what S3 events and job messages may read.
        self.allowed = None if spec.allow_any_input else [S3Url.parse(p) for p in spec.allow_input]

    def _plan(self, keep: tuple[str, ...] | None, options: TextOptions) -> _Plan:
        """How a message's records are read, run and written: it keeps `keep` (None:
        --keep-columns) and runs with `options`. MessageError for a bad keep_columns."""
        if keep is None:
            keep = self.spec.output_format.keep_columns
        try:
            chunked = chunk_rows(self.engine.head, options.long_documents)
            check_keep_columns(keep, self.engine.task_names, "keep_columns", chunked)
        except UsageError as e:
            raise MessageError(str(e)) from None
        fields = dataclasses.replace(self.fields, keep=keep)
        return _Plan(fields, options, output_schema_source(self.engine, keep, options))

    async def do(self, works: list[Work]) -> Counts:
        counts = Counts()
        for work in works:
            if isinstance(work, InlineWork):
                plan = self._plan(work.keep_columns, self._options(work.text))
                counts.add(await self._inline(work, plan))
            elif isinstance(work, ObjectWork):
                plan = self._plan(None, self.options)
                counts.add(await self._object(work.url, self.spec.output, plan))
            else:
                # A bad keep_columns or text option fails the message before any work.
                plan = self._plan(work.keep_columns, self._options(work.text))
                counts.add(await self._job(work, plan))
        return counts

    def _options(self, asked: TextRequest) -> TextOptions:
        """The worker's options, with what the message asks instead (MessageError if bad)."""
        spec, options = self.spec, self.options
        prompt, name = spec.prompt, spec.prompt_name
        if asked.prompt is not None or asked.prompt_name is not None:
            prompt, name = asked.prompt, asked.prompt_name
        return resolve_text_options(
            self.engine.artifact,
            self.engine.tokenizer,
            long_documents=asked.long_documents or options.long_documents,
            chunk_overlap=(
                options.chunk_overlap if asked.chunk_overlap is None else asked.chunk_overlap
            ),
            prompt=prompt,
            prompt_name=name,
            error=MessageError,
            names=("long_documents", "chunk_overlap", "prompt", "prompt_name"),
        )

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

    async def _object(self, url: S3Url, output: str, plan: _Plan) -> Counts:
        """One object → `<output>/<key without extension>.parquet`."""
        self._check_input(url, "object")
        name = posixpath.basename(url.key)
        ref = ShardRef(str(url), url.key, detect_format(name), is_gzip(name))
        if why := overlap(output, None, [ref]):
            raise MessageError(f"{why}: refused")
        return await self._shard(ref, output, plan)

    async def _job(self, work: JobWork, plan: _Plan) -> Counts:
        self._check_input(S3Url.parse(work.input), "job input")
        output = work.output or self.spec.output
        out = S3Url.parse(output)
        if not is_under(S3Url(out.bucket, out.prefix), self.output):
            raise MessageError(f"job output {output} is not under --output {self.spec.output}")
        if why := overlap(output, work.input, []):
            raise MessageError(f"{why}: refused")
        shards = await self.storage.list_shards(work.input, exclude=output, label="job input")
        if len(shards) == 1 and shards[0].path == work.input:  # an object, not a prefix
            return await self._object(S3Url.parse(work.input), output, plan)
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
                    counts.add(await self._shard(ref, output, plan))
                except (BatchJobError, OSError) as e:
                    failed.append(f"{ref.rel}: {e}")

        await asyncio.gather(*(one(ref) for ref in todo))
        if failed:
            raise BatchJobError(
                f"{len(failed)} of {total} shards failed ({counts.outputs} written): "
                + "; ".join(failed[:3])
            )
        return counts

    async def _inline(self, work: InlineWork, plan: _Plan) -> Counts:
        rel = f"inline/{work.id}.parquet"
        if await self.storage.output_exists(self.spec.output, rel):
            return Counts(existing=1)
        records = records_from_objects(work.documents, f"inline/{work.id}", plan.fields)
        writer = await self.storage.writer(self.spec.output, rel, plan.schema)
        return await write_shard(
            self.engine,
            writer,
            chunked(records, CHUNK_RECORDS),
            on_rows=self._inferred,
            options=plan.options,
            keep=plan.fields.keep,
        )

    async def _shard(self, ref: ShardRef, output: str, plan: _Plan) -> Counts:
        if await self.storage.output_exists(output, ref.output_rel):
            return Counts(existing=1)
        stream = await self.storage.open(ref)
        try:
            reader = read_records(
                stream, ref.format, ref.rel, plan.fields, gzip=ref.gzip, chunk_size=CHUNK_RECORDS
            )
            writer = await self.storage.writer(output, ref.output_rel, plan.schema)
            return await write_shard(
                self.engine,
                writer,
                reader,
                threaded=True,
                on_rows=self._inferred,
                options=plan.options,
                keep=plan.fields.keep,
            )
        finally:
            stream.close()

    def _inferred(self, documents: int) -> None:
        self.inferred += documents

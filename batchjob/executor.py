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
import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchjob.config import WorkerSpec
from batchjob.engine import Engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.job_records import message_key, new_id
from batchjob.long_documents import TextOptions
from batchjob.messages import (
    InlineWork,
    JobWork,
    MessageError,
    ObjectWork,
    ShardsWork,
    TextRequest,
    Work,
)
from batchjob.pair_tasks import pair_fields
from batchjob.paths import allowed, is_under, output_problems, overlap
from batchjob.pipeline import Counts, chunked, write_shard
from batchjob.prompts import resolve_text_options
from batchjob.record_store import put_record
from batchjob.records import Fields, detect_format, is_gzip, read_records, records_from_objects
from batchjob.s3 import S3Url
from batchjob.shards import ShardRef, shard
from batchjob.sinks import SchemaSource, check_keep_columns, output_schema_source
from batchjob.storage import Storage
from batchjob.token_classification import chunk_rows

log = logging.getLogger("batchjob.worker")

CHUNK_RECORDS = 256  # records per Engine.infer call: small, for a message's latency
SHARDS_IN_FLIGHT = 4  # per job message naming a prefix, or shards


def message_line(what: str, counts: Counts) -> str:
    """A message's log line after its timing: its work, then what came of it."""
    existing = f", {counts.existing} existed already" if counts.existing else ""
    split = f" ({counts.windows} windows, {counts.split} split)" if counts.split else ""
    return (
        f"{what}: {counts.outputs} output(s) written{existing}, {counts.documents} "
        f"documents{split}, {counts.errors} error rows"
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """Which delivery of which message a work is, by which worker: what the record of a
    submitted job's message says (job_records.py), for `batchjob status`."""

    message_id: str
    receive_count: int
    max_receive_count: int | None  # the redrive policy's; None: retried for ever
    worker: str
    totals: Callable[[], dict[str, Any]]  # the worker's busy seconds, documents, tokens so far

    @property
    def last(self) -> bool:
        """The last delivery before the dead-letter queue: a failure now is for good."""
        limit = self.max_receive_count
        return limit is not None and self.receive_count >= limit


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
        self.fields = pair_fields(
            Fields(spec.text_field, spec.text_pair_field, spec.id_field), spec.output_format.pairs
        )
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

    async def do(self, works: list[Work], delivery: Delivery | None = None) -> Counts:
        counts = Counts()
        for work in works:
            if isinstance(work, ShardsWork):
                plan = self._plan(work.keep_columns, self._options(work.text))
                counts.add(await self._shards(work, plan, delivery))
            elif isinstance(work, InlineWork):
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
        task = spec.output_format.pairs.task
        if task is not None and asked.long_documents not in (None, "truncate"):
            raise MessageError(f"long_documents: --task {task} truncates long texts")
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
        if isinstance(work, ShardsWork):
            return f"job {work.job_id}: {len(work.shards)} shard(s) of {work.input} → {work.output}"
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

    def _check_output(self, output: str, input_root: str) -> None:
        out = S3Url.parse(output)
        if not is_under(S3Url(out.bucket, out.prefix), self.output):
            raise MessageError(f"job output {output} is not under --output {self.spec.output}")
        if why := overlap(output, input_root, []):
            raise MessageError(f"{why}: refused")

    async def _job(self, work: JobWork, plan: _Plan) -> Counts:
        self._check_input(S3Url.parse(work.input), "job input")
        output = work.output or self.spec.output
        self._check_output(output, work.input)
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

    async def _shards(self, work: ShardsWork, plan: _Plan, delivery: Delivery | None) -> Counts:
        """A submitted job's shards, each checked against --allow-input, each output written
        once; then the delivery's record under the output (when it may be written there)."""
        self._check_output(work.output, work.input)  # else no record: not our output
        started, failed = time.time(), {}
        refs: list[ShardRef] = []
        try:
            for uri, _ in work.shards:
                self._check_input(S3Url.parse(uri), "shard")
            for uri, rel in work.shards:
                try:
                    refs.append(shard(uri, rel, "auto"))
                except UsageError as e:
                    failed[rel] = str(e)
            if why := overlap(work.output, work.input, refs):
                raise MessageError(f"{why}: refused")
        except MessageError as e:
            # Refused before any work: every shard fails with the reason.
            await self._record(work, delivery, started, {}, {rel: str(e) for _, rel in work.shards})
            raise
        failed |= output_problems(work.output, refs)
        counts, written = Counts(), {}
        limit = asyncio.Semaphore(SHARDS_IN_FLIGHT)

        async def one(ref: ShardRef) -> None:
            async with limit:
                try:
                    done = await self._shard(ref, work.output, plan)
                except (BatchJobError, OSError) as e:
                    failed[ref.rel] = str(e) if isinstance(e, BatchJobError) else repr(e)
                    return
            counts.add(done)
            written[ref.rel] = {
                "written": bool(done.outputs),
                "documents": done.documents,
                "errors": done.errors,
            }

        await asyncio.gather(*(one(ref) for ref in refs if ref.rel not in failed))
        await self._record(work, delivery, started, written, failed)
        if failed:
            raise BatchJobError(
                f"{len(failed)} of {len(work.shards)} shards failed ({counts.outputs} written): "
                + "; ".join(f"{rel}: {why}" for rel, why in list(failed.items())[:3])
            )
        return counts

    async def _record(
        self,
        work: ShardsWork,
        delivery: Delivery | None,
        started: float,
        written: dict[str, dict[str, Any]],
        failed: dict[str, str],
    ) -> None:
        """This delivery's record: `status` counts the shards it wrote, and the failures of
        the last delivery before the dead-letter queue as failures for good."""
        if delivery is None:
            return
        record = {
            "kind": "message",
            "job_id": work.job_id,
            "message_id": delivery.message_id,
            "receive_count": delivery.receive_count,
            "max_receive_count": delivery.max_receive_count,
            "final": bool(failed) and delivery.last,
            "worker": delivery.worker,
            "started": started,
            "finished": time.time(),
            "shards": written,
            "failed": failed,
            "worker_totals": delivery.totals(),
        }
        key = message_key(work.job_id, new_id())
        try:
            await put_record(self.storage, work.output, key, record)
        except (BatchJobError, OSError) as e:
            if not failed:
                raise  # the message fails, and its next delivery (outputs done) records it
            log.error("message %s: its record %s: %s", delivery.message_id, key, e)

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

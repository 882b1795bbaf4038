"""`batchjob run`: one asyncio pipeline from shards to Parquet.

    fetch (loop) ─► read (thread) ─► tokenize (thread) ─► batcher ─► replica pool ─► collect
      ─► writer (temp file) ─► commit (rename, or one conditional S3 upload)

Bounded queues sit between the stages, at most --max-shards-in-flight shards are open (S3
objects download ahead into bounded buffers), and the batcher's sort window bounds how many
records wait, so memory stays flat however large the input. Rows reach each shard's temp
file in input order; it is published only once the whole shard is done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from batchjob.artifact import Artifact, ArtifactLoader
from batchjob.backends import get_backend
from batchjob.batching import Batch, Item, make_batcher
from batchjob.compile import ensure_artifact
from batchjob.config import RunSpec
from batchjob.errors import BatchJobError, UsageError
from batchjob.paths import output_problems, overlap
from batchjob.progress import Progress
from batchjob.records import Fields, Record, read_records
from batchjob.replica_process import Placement, plan_placements
from batchjob.replicas import ReplicaPool
from batchjob.s3 import is_s3
from batchjob.shards import ShardRef
from batchjob.sinks import OutputWriter, Row, output_schema, row_columns
from batchjob.storage import Storage
from batchjob.tasks import task_columns, task_fields
from batchjob.tokens import Encoded, RecordTokenizer

log = logging.getLogger("batchjob.run")

ROWS_PER_WRITE = 4096  # rows buffered per shard before a Parquet row group is written
CHUNKS_AHEAD = 4  # tokenized chunks read ahead of dispatch
# On SIGTERM, outputs already being published get this long to finish: under Kubernetes'
# default 30 s grace period, with room to stop the replicas and write the manifest.
COMMIT_GRACE_SECONDS = 15.0


@dataclass(eq=False)
class ShardState:
    ref: ShardRef
    writer: OutputWriter
    count: int = 0  # records read so far
    total: int | None = None  # known once the shard is fully read
    written: int = 0
    errors: int = 0
    truncated: int = 0
    failed: str | None = None
    waiting: dict[int, tuple[str, bool]] = field(default_factory=dict)  # index → (id, truncated)
    ready: dict[int, Row] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.total is not None and self.written == self.total


@dataclass
class Report:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    documents: int = 0
    errors: int = 0
    truncated: int = 0
    batches: int = 0
    real_tokens: int = 0
    compiled_tokens: int = 0
    replica_restarts: int = 0
    seconds: float = 0.0  # the whole run
    pipeline_seconds: float = 0.0  # from replicas ready to the last shard committed

    def account(self, shards: list[ShardRef], reason: str) -> None:
        """Every shard is listed once, as done, skipped or failed: those the run never
        finished are failed with `reason`."""
        listed = {*self.done, *self.skipped, *(f["shard"] for f in self.failed)}
        self.failed += [{"shard": s.rel, "error": reason} for s in shards if s.rel not in listed]


def run(spec: RunSpec) -> int:
    """Run the job; 0 when every shard is done, 1 when some failed. UsageError: nothing written."""
    started = time.monotonic()
    if not is_s3(spec.output) and os.path.exists(spec.output) and not os.path.isdir(spec.output):
        raise UsageError(f"--output {spec.output}: exists and is not a directory")
    report = asyncio.run(_main(spec, started))
    rate = report.documents / max(report.seconds, 1e-9)
    print(
        f"batchjob run: {report.documents} documents, {report.errors} errors, "
        f"{len(report.done)} shards done, {len(report.failed)} failed, "
        f"{len(report.skipped)} skipped, {report.seconds:.1f}s, {rate:.1f} documents/s",
        flush=True,
    )
    return 1 if report.failed else 0


async def _main(spec: RunSpec, started: float) -> Report:
    # Connections: the shards downloading ahead, the uploads, a listing.
    storage = Storage(
        connections=spec.max_shards_in_flight + 6, expected_bucket_owner=spec.expected_bucket_owner
    )
    async with storage:
        # Everything that can be known before the first batch is checked before it: a
        # refusal (UsageError) writes nothing.
        if spec.input_manifest:
            shards = await storage.read_shard_list(spec.input_manifest, spec.format)
        else:
            shards = await storage.list_shards(spec.input, spec.format, exclude=spec.output)
        if why := overlap(spec.output, spec.input or None, shards):
            raise UsageError(f"{why}: its results would overwrite or shadow the input")
        if spec.text_pair_field and any(s.format == "txt" for s in shards):
            raise UsageError("--text-pair-field can't be used with .txt shards (one text per line)")
        artifact = ensure_artifact(spec.compile, spec.cache_dir)
        device = get_backend(artifact.backend).device
        placements = plan_placements(spec.replicas, spec.cores_per_replica, device)
        done_before = await storage.prepare_output(spec.output, list_existing=spec.resume)
        report = Report(skipped=[s.rel for s in shards if s.output_rel in done_before])
        if report.skipped:
            log.info("--resume: %d shard(s) already done", len(report.skipped))
        todo = [s for s in shards if s.output_rel not in done_before]
        problems = output_problems(spec.output, todo)  # these fail; the others run
        for rel, why in problems.items():
            log.error("shard failed: %s: %s", rel, why)
            report.failed.append({"shard": rel, "error": why})
        todo = [s for s in todo if s.rel not in problems]
        unfinished = "not finished: the run stopped"
        try:
            await _run(spec, artifact, placements, storage, todo, report)
        except asyncio.CancelledError:
            if task := asyncio.current_task():
                task.uncancel()  # handled here: the manifest still gets written
            unfinished = "not finished: interrupted by a signal; run again with --resume"
            raise BatchJobError(
                f"interrupted by a signal after {len(report.done)} shard(s); "
                "run again with --resume to finish"
            ) from None
        except Exception as e:
            unfinished = f"not finished: the run failed: {e}"
            raise
        finally:
            report.seconds = time.monotonic() - started
            report.account(shards, unfinished)
            await storage.write_manifest(spec.output, _manifest(spec, artifact, report))
    return report


async def _run(
    spec: RunSpec,
    artifact: Artifact,
    placements: list[Placement],
    storage: Storage,
    shards: list[ShardRef],
    report: Report,
) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: task.cancel() if task else None)
    pool = ReplicaPool(
        ArtifactLoader(artifact), placements, start_timeout=spec.replica_start_timeout
    )
    job = _Job(spec, artifact, storage, report, Progress(spec.progress, len(shards)))
    try:
        async with pool:
            ready = time.monotonic()
            await job.pipeline(pool, shards)
            report.pipeline_seconds = time.monotonic() - ready
            report.replica_restarts = pool.restarts
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        job.progress.close()
        for state in job.open_shards:
            state.writer.abort()
        if job.commits:  # interrupted: let the outputs already being published finish
            _, late = await asyncio.wait(job.commits, timeout=COMMIT_GRACE_SECONDS)
            for commit in late:  # while the S3 client is open, so multipart uploads abort
                commit.cancel()
            await asyncio.gather(*late, return_exceptions=True)


class _Job:
    def __init__(
        self,
        spec: RunSpec,
        artifact: Artifact,
        storage: Storage,
        report: Report,
        progress: Progress,
    ):
        self.spec = spec
        self.artifact = artifact
        self.storage = storage
        self.report = report
        self.progress = progress
        self.schema = output_schema(artifact.task)
        self.task_names = [f.name for f in task_fields(artifact.task)]
        self.fields = Fields(spec.text_field, spec.text_pair_field, spec.id_field)
        self.tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
        self.batcher = make_batcher(
            artifact.strategy,
            artifact.shapes,
            max_segments=artifact.max_segments,
            position_offset=artifact.position_offset,
            sort_window=spec.sort_window,
            pad_id=self.tokenizer.pad_id,
        )
        self.open_shards: list[ShardState] = []
        self.commits: set[asyncio.Task[None]] = set()  # outputs being published

    async def pipeline(self, pool: ReplicaPool, shards: list[ShardRef]) -> None:
        chunks: asyncio.Queue[Any] = asyncio.Queue(CHUNKS_AHEAD)
        results: asyncio.Queue[Any] = asyncio.Queue(2 * pool.size + 2)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.read(shards, chunks))
            tg.create_task(self.dispatch(pool, chunks, results))
            tg.create_task(self.collect(results))
        if self.commits:
            await asyncio.wait(set(self.commits))
        unfinished = [s.ref.rel for s in self.open_shards]
        if unfinished:
            raise BatchJobError(f"internal error: shards left unfinished: {unfinished[:5]}")

    async def read(self, shards: list[ShardRef], out: asyncio.Queue[Any]) -> None:
        """Each shard's records, tokenized, in chunks; then (state, None) when it is whole."""
        async with self.storage.prefetch(shards, self.spec.max_shards_in_flight) as opened:
            async for shard in opened:
                ref = shard.ref
                try:
                    output, rel = self.spec.output, ref.output_rel
                    writer = await self.storage.writer(output, rel, self.schema)
                except (BatchJobError, OSError) as e:
                    shard.close()
                    self.report.failed.append({"shard": ref.rel, "error": _reason(e)})
                    log.error("shard failed: %s: %s", ref.rel, _reason(e))
                    continue
                state = ShardState(ref, writer)
                self.open_shards.append(state)
                try:
                    if shard.error is not None:
                        raise shard.error
                    assert shard.stream is not None
                    reader = read_records(
                        shard.stream,
                        ref.format,
                        ref.rel,
                        self.fields,
                        gzip=ref.gzip,
                        chunk_size=self.spec.chunk_size,
                    )
                    while (records := await asyncio.to_thread(_next_chunk, reader)) is not None:
                        encoded = await asyncio.to_thread(self.tokenizer.encode, records)
                        await out.put((state, records, encoded))
                        if state.failed:  # its output can't be written: stop reading it
                            break
                except (BatchJobError, OSError, EOFError) as e:
                    await out.put((state, _reason(e), None))
                    continue
                finally:
                    shard.close()
                await out.put((state, None, None))
        await out.put(None)

    async def dispatch(
        self, pool: ReplicaPool, chunks: asyncio.Queue[Any], results: asyncio.Queue[Any]
    ) -> None:
        while (chunk := await chunks.get()) is not None:
            state, records, encoded = chunk
            if isinstance(records, str):
                self.fail_shard(state, records)
            elif records is None:
                state.total = state.count
                self.advance(state)
            else:
                for batch in self.batcher.add(self.register(state, records, encoded)):
                    await self.submit(pool, batch, results)
                self.advance(state)
        for batch in self.batcher.flush():
            await self.submit(pool, batch, results)
        await results.put(None)

    def register(
        self, state: ShardState, records: list[Record], encoded: list[Encoded | None]
    ) -> Iterator[Item]:
        for record, enc in zip(records, encoded, strict=True):
            index = state.count
            state.count += 1
            if enc is None:
                state.ready[index] = (record.id, None, False, record.error)
            else:
                state.waiting[index] = (record.id, enc.truncated)
                yield Item((state, index), enc.ids, enc.type_ids)

    async def submit(self, pool: ReplicaPool, batch: Batch, results: asyncio.Queue[Any]) -> None:
        future = await pool.submit(batch.arrays)
        await results.put((batch, future))
        self.report.batches += 1
        self.report.real_tokens += batch.real_tokens
        self.report.compiled_tokens += batch.shape.seq_len * batch.shape.batch_size

    async def collect(self, results: asyncio.Queue[Any]) -> None:
        while (item := await results.get()) is not None:
            batch, future = item
            outputs: np.ndarray = await future
            rows = np.flatnonzero(batch.valid)
            columns = task_columns(self.artifact, outputs[rows])
            touched = set()
            for j, row in enumerate(rows):
                state, index = batch.keys[row]
                if state.failed:
                    continue
                record_id, truncated = state.waiting.pop(index)
                values = {name: column[j] for name, column in columns.items()}
                state.ready[index] = (record_id, values, truncated, None)
                touched.add(state)
            for state in touched:
                self.advance(state)

    def advance(self, state: ShardState) -> None:
        """Write the rows now contiguous from the last one written; commit a whole shard."""
        if state.failed:
            return
        end = state.written
        while end in state.ready:
            end += 1
        whole = state.total is not None and end == state.total
        if end - state.written >= ROWS_PER_WRITE or (whole and end > state.written):
            rows = [state.ready.pop(i) for i in range(state.written, end)]
            try:
                state.writer.write(row_columns(self.task_names, rows))
            except (OSError, pa.ArrowException) as e:  # a full disk, a lost mount
                self.fail_shard(state, f"writing its output: {_reason(e)}")
                return
            state.written = end
            state.errors += sum(1 for r in rows if r[3] is not None)
            state.truncated += sum(1 for r in rows if r[2])
            self.progress.add(documents=len(rows))
        if state.complete:
            self.open_shards.remove(state)
            # A task of its own, started here and outside the pipeline's task group: a
            # cancelled run still publishes the outputs it has fully computed (`_run` waits
            # for `commits` a while), none is half published, and none is left neither
            # published nor aborted (a task-group task could be cancelled before it ran).
            task = asyncio.ensure_future(self.publish(state))
            self.commits.add(task)
            task.add_done_callback(self.commits.discard)

    async def publish(self, state: ShardState) -> None:
        try:
            written = await state.writer.commit()
        except (BatchJobError, OSError, pa.ArrowException) as e:
            self.record_failure(state, f"publishing its output: {_reason(e)}")
            return
        if not written:
            log.info("shard %s: its output exists already (another run wrote it)", state.ref.rel)
        self.report.done.append(state.ref.rel)
        self.report.documents += state.written
        self.report.errors += state.errors
        self.report.truncated += state.truncated
        self.progress.add(shards=1)
        log.debug("shard done: %s (%d rows)", state.ref.rel, state.written)

    def fail_shard(self, state: ShardState, reason: str) -> None:
        state.writer.abort()
        state.waiting.clear()
        state.ready.clear()
        self.open_shards.remove(state)
        self.record_failure(state, reason)

    def record_failure(self, state: ShardState, reason: str) -> None:
        log.error("shard failed: %s: %s", state.ref.rel, reason)
        state.failed = reason
        self.report.failed.append({"shard": state.ref.rel, "error": reason})


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _next_chunk(reader: Iterator[list[Record]]) -> list[Record] | None:
    return next(reader, None)


def _manifest(spec: RunSpec, artifact: Artifact, report: Report) -> dict[str, Any]:
    return {
        "input": spec.input,
        "input_manifest": spec.input_manifest,
        "output": spec.output,
        "model": artifact.source_model,
        "artifact": artifact.path,
        "task": artifact.task,
        "backend": artifact.backend,
        "dtype": artifact.dtype,
        "shapes": [[s.batch_size, s.seq_len] for s in artifact.shapes],
        "versions": artifact.versions,
        "shards": {"done": report.done, "skipped": report.skipped, "failed": report.failed},
        "counts": {
            "documents": report.documents,
            "errors": report.errors,
            "truncated": report.truncated,
            "batches": report.batches,
            "real_tokens": report.real_tokens,
            "compiled_tokens": report.compiled_tokens,
            "replica_restarts": report.replica_restarts,
        },
        "timings": {
            "seconds": round(report.seconds, 3),
            "pipeline_seconds": round(report.pipeline_seconds, 3),
            "documents_per_second": round(report.documents / max(report.seconds, 1e-9), 2),
        },
    }

"""`batchjob worker`: an SQS queue in, Parquet on S3 out, safe under at-least-once delivery.

    receive (long poll, ≤ max in flight) ─► one task per message:
        heartbeat: extend its visibility before it lapses (up to SQS's 12-hour ceiling)
        work: parse (messages.py) ─► shards ─► Engine.infer ─► writer ─► commit ─► delete

The documents of every message in progress share the engine's fixed-shape batches. A
message is deleted only once its outputs are committed; an output is written at most once
(`If-None-Match`), and one that exists already counts as done, so a redelivered or raced
message costs a HEAD, not a second object. A message that fails is made visible again at
once, and the queue's redrive policy moves it to the dead-letter queue in time; a bad
record is not a failure: it becomes an error row.

SIGTERM or SIGINT: stop receiving, give the messages in progress `drain_seconds` to finish,
release the rest (visibility 0: another worker takes them at once), exit 0. A second signal
exits at once (128 + the signal's number).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from batchjob.config import WorkerSpec
from batchjob.engine import Engine, Result, start_engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.messages import InlineWork, JobWork, ObjectWork, Work, parse_message
from batchjob.metrics import WorkerMetrics
from batchjob.queue import MAX_WAIT_SECONDS, Message, QueueError, SqsQueue
from batchjob.records import (
    Fields,
    Record,
    detect_format,
    is_gzip,
    read_records,
    records_from_objects,
)
from batchjob.replicas import ReplicaPool
from batchjob.s3 import S3Url, is_s3
from batchjob.sinks import OutputWriter, Row, output_schema, row_columns
from batchjob.storage import ShardRef, Storage
from batchjob.tasks import task_fields

log = logging.getLogger("batchjob.worker")

CHUNK_RECORDS = 256  # records per Engine.infer call
CHUNKS_IN_FLIGHT = 4  # per shard: results are written in order as the oldest chunk finishes
ROWS_PER_WRITE = 4096  # rows per Parquet row group
SHARDS_IN_FLIGHT = 4  # per job message naming a prefix
THROUGHPUT_LOG_SECONDS = 30.0
RECEIVE_BACKOFF_SECONDS = 5.0  # after a ReceiveMessage that failed past botocore's retries
CLOCK_MARGIN = 5.0  # seconds: our receipt time trails SQS's


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


@dataclass
class Summary:
    done: int = 0
    duplicate: int = 0
    ignored: int = 0
    failed: int = 0
    released: int = 0
    documents: int = 0
    errors: int = 0
    busy_seconds: float = 0.0  # time with at least one message in progress


class WorkTooLongError(BatchJobError):
    """The work would outlast SQS's visibility ceiling for one receipt."""


class Worker:
    """Receives messages and works on them until stopped (or idle, with exit_when_idle)."""

    def __init__(
        self,
        spec: WorkerSpec,
        queue: SqsQueue,
        storage: Storage,
        engine: Engine,
        pool: ReplicaPool,
        metrics: WorkerMetrics,
    ) -> None:
        self.spec, self.queue, self.storage = spec, queue, storage
        self.engine, self.pool, self.metrics = engine, pool, metrics
        self.schema = output_schema(engine.artifact.task)
        self.task_names = [f.name for f in task_fields(engine.artifact.task)]
        self.fields = Fields(spec.text_field, spec.text_pair_field, spec.id_field)
        self.visibility = max(1, queue.visibility_timeout)
        self.heartbeat = max(0.5, self.visibility / 3)
        self.summary = Summary()
        self.inferred = 0  # documents with results so far: the throughput log's count
        self.fatal: str | None = None  # the replicas gave up: stop, release, exit 1
        self._tasks: dict[asyncio.Task[None], Message] = {}
        self._slot_free = asyncio.Event()
        self._last_activity = time.monotonic()
        self._busy_since: float | None = None
        self._stopped = asyncio.Event()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> Summary:
        """Work until stop() (drain, release) or idle; the summary of what was done."""
        throughput = asyncio.create_task(self._log_throughput())
        receiving = asyncio.create_task(self._receive_loop())
        stopped = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait({receiving, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if self._tasks:
                log.info(
                    "draining: %d message(s) in progress get up to %g s",
                    len(self._tasks), self.spec.drain_seconds,
                )  # fmt: skip
                await asyncio.wait(self._tasks, timeout=self.spec.drain_seconds)
            unfinished = list(self._tasks.items())
            for task, _ in unfinished:
                task.cancel()
            await asyncio.gather(*(task for task, _ in unfinished), return_exceptions=True)
            # A long poll in progress is let finish, not cancelled: SQS would still hand it
            # messages, each then lost to everyone until its visibility lapsed. Releasing
            # before it ends would let it take the released ones back.
            await receiving
            await self._release([message for _, message in unfinished])
        finally:
            throughput.cancel()
            stopped.cancel()
        return self.summary

    def stop(self, why: str) -> None:
        """Stop receiving; messages in progress get drain_seconds, then are released."""
        if not self._stopped.is_set():
            log.info("%s: no more receiving", why)
        self._stopped.set()
        self._slot_free.set()

    async def _receive_loop(self) -> None:
        spec = self.spec
        while not self._stopped.is_set():
            if len(self._tasks) >= spec.max_messages_in_flight:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            wait = MAX_WAIT_SECONDS
            if spec.exit_when_idle is not None:
                idle = time.monotonic() - self._last_activity
                if not self._tasks and idle >= spec.exit_when_idle:
                    log.info("idle for %g s: exiting", spec.exit_when_idle)
                    return
                wait = max(1, min(MAX_WAIT_SECONDS, round(spec.exit_when_idle)))
            free = spec.max_messages_in_flight - len(self._tasks)
            try:
                messages = await self.queue.receive(free, wait, self.visibility)
            except QueueError as e:
                log.error("%s; trying again in %g s", e, RECEIVE_BACKOFF_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), RECEIVE_BACKOFF_SECONDS)
                continue
            if self._stopped.is_set():  # received while stopping: for another worker
                await self._release(messages)
                return
            for message in messages:
                self._start(message)

    def _start(self, message: Message) -> None:
        now = self._last_activity = time.monotonic()
        if not self._tasks:
            self._busy_since = now
        task = asyncio.create_task(self._handle(message), name=f"message-{message.id}")
        self._tasks[task] = message
        self.metrics.in_progress.set(len(self._tasks))
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        now = self._last_activity = time.monotonic()
        if not self._tasks and self._busy_since is not None:
            self.summary.busy_seconds += now - self._busy_since
            self._busy_since = None
        self.metrics.in_progress.set(len(self._tasks))
        self._slot_free.set()
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("message task died: %r", error, exc_info=error)  # a bug: fail loudly
            self.fatal = f"internal error: {error!r}"
            self.stop("internal error")

    async def _release(self, messages: list[Message]) -> None:
        if not messages:
            return
        released = await self.queue.release(messages)
        self.summary.released += len(released)
        self.metrics.messages.labels("released").inc(len(released))
        for message in released:
            log.info("message %s released: visible again for another worker", message.id)

    async def _log_throughput(self) -> None:
        last_documents, last = 0, time.monotonic()
        while True:
            await asyncio.sleep(THROUGHPUT_LOG_SECONDS)
            now, documents = time.monotonic(), self.inferred
            if documents != last_documents or self._tasks:
                stats = self.engine.stats
                fill = stats.real_tokens / stats.compiled_tokens if stats.compiled_tokens else 0
                log.info(
                    "%.1f documents/s over %.0f s; %d messages done, %d in progress; "
                    "batch fill %.1f%%",
                    (documents - last_documents) / (now - last), now - last, self.summary.done,
                    len(self._tasks), 100 * fill,
                )  # fmt: skip
            last_documents, last = documents, now

    # -- one message ------------------------------------------------------------------------

    async def _handle(self, message: Message) -> None:
        work = asyncio.create_task(self._work(message))
        try:
            counts = await self._keep_hidden(message, work)
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise
        except (BatchJobError, OSError) as e:
            await self._failed(message, e)
            return
        seconds = time.monotonic() - message.received
        try:
            await self.queue.delete(message)
        except QueueError as e:
            self.metrics.delete_failures.inc()
            log.error(
                "message %s: its outputs are committed but it was not deleted (%s): a "
                "redelivery will find them and skip the work", message.id, e,
            )  # fmt: skip
        if counts is None:
            outcome, what = "ignored", "nothing to do (a test event, or not an object's creation)"
        else:
            outcome = "duplicate" if counts.existing and not counts.outputs else "done"
            what = str(counts)
        self._count(outcome, counts, seconds)
        log.info("%.3fs message %s %s: %s", seconds, message.id, outcome, what)

    async def _keep_hidden(self, message: Message, work: asyncio.Task[Counts | None]) -> Any:
        """Await `work`, extending the message's visibility before it lapses."""
        ceiling = self.spec.visibility_ceiling - CLOCK_MARGIN
        while True:
            done, _ = await asyncio.wait({work}, timeout=self.heartbeat)
            if done:
                return work.result()
            held = time.monotonic() - message.received
            if held + self.heartbeat >= ceiling:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                raise WorkTooLongError(
                    f"work still running after {held:.0f} s: it would outlast SQS's "
                    f"{self.spec.visibility_ceiling:g} s visibility ceiling"
                )
            await self.queue.set_visibility(
                message, max(1, int(min(self.visibility, ceiling - held)))
            )

    async def _failed(self, message: Message, error: BaseException) -> None:
        seconds = time.monotonic() - message.received
        if self.pool.failed is not None and self.fatal is None:
            self.fatal = f"the replicas failed: {self.pool.failed}"
            self.stop("the replicas failed")
        left = ""
        if self.queue.max_receive_count is not None:
            left = f" of {self.queue.max_receive_count} before the dead-letter queue"
        why = str(error) if isinstance(error, BatchJobError) else f"{type(error).__name__}: {error}"
        log.error(
            "%.3fs message %s failed (ApproximateReceiveCount %d%s): %s",
            seconds, message.id, message.receive_count, left, why,
        )  # fmt: skip
        self._count("failed", None, seconds)
        await self.queue.set_visibility(message, 0)  # for a retry now, or the redrive policy

    def _count(self, outcome: str, counts: Counts | None, seconds: float) -> None:
        summary = self.summary
        setattr(summary, outcome, getattr(summary, outcome) + 1)
        self.metrics.messages.labels(outcome).inc()
        self.metrics.seconds.observe(seconds)
        if counts is not None:
            summary.documents += counts.documents
            summary.errors += counts.errors
            self.metrics.documents.inc(counts.documents)
            self.metrics.errors.inc(counts.errors)

    async def _work(self, message: Message) -> Counts | None:
        """The message's work, done: its counts; None when it asks for nothing."""
        works: list[Work] = []
        for work in parse_message(message.body, message.id):
            if isinstance(work, ObjectWork) and self._own_output(work.url):
                log.info("message %s: %s is its own output: ignored", message.id, work.url)
            else:
                works.append(work)
        if not works:
            return None
        counts = Counts(what="; ".join(self._describe(work) for work in works))
        for work in works:
            if isinstance(work, InlineWork):
                counts.add(await self._inline(work))
            elif isinstance(work, ObjectWork):
                counts.add(await self._object(work.url, work.output or self.spec.output))
            else:
                counts.add(await self._job(work))
        return counts

    def _describe(self, work: Work) -> str:
        if isinstance(work, InlineWork):
            return f"{len(work.documents)} inline documents → inline/{work.id}.parquet"
        source = str(work.url) if isinstance(work, ObjectWork) else work.input
        return f"{source} → {work.output or self.spec.output}"

    def _own_output(self, url: S3Url) -> bool:
        """An event for one of our outputs (notifications on the output's bucket): to work on
        it would write an output of the output, and so on, forever."""
        if not is_s3(self.spec.output):
            return False
        output = S3Url.parse(self.spec.output)
        return url.bucket == output.bucket and url.key.startswith(output.prefix)

    async def _object(self, url: S3Url, output: str) -> Counts:
        """One object → `<output>/<key without extension>.parquet`."""
        name = posixpath.basename(url.key)
        ref = ShardRef(str(url), url.key, detect_format(name), is_gzip(name))
        return await self._shard(ref, output)

    async def _job(self, work: JobWork) -> Counts:
        output = work.output or self.spec.output
        shards = await self.storage.list_shards(work.input, exclude=output, label="job input")
        if len(shards) == 1 and shards[0].path == work.input:  # an object, not a prefix
            return await self._object(S3Url.parse(work.input), output)
        done = await self.storage.prepare_output(output, list_existing=True)
        counts = Counts(existing=sum(s.output_rel in done for s in shards))
        todo = [s for s in shards if s.output_rel not in done]
        limit = asyncio.Semaphore(SHARDS_IN_FLIGHT)

        async def one(ref: ShardRef) -> None:
            async with limit:
                counts.add(await self._shard(ref, output))

        async with asyncio.TaskGroup() as group:
            for ref in todo:
                group.create_task(one(ref))
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


# -- the command ----------------------------------------------------------------------------


def work(spec: WorkerSpec) -> int:
    """Consume the queue until a signal (0 once drained) or idle (0); 1 when the replicas
    failed. UsageError: no such queue, bucket or model (nothing received)."""
    started = time.monotonic()
    summary, fatal = asyncio.run(_main(spec))
    rate = summary.documents / summary.busy_seconds if summary.busy_seconds else 0.0
    print(
        f"batchjob worker: {summary.done} messages done, {summary.duplicate} duplicate, "
        f"{summary.ignored} ignored, {summary.failed} failed, {summary.released} released; "
        f"{summary.documents} documents, {summary.errors} errors; "
        f"{time.monotonic() - started:.1f}s, busy {summary.busy_seconds:.3f}s, "
        f"{rate:.1f} documents/s while busy",
        flush=True,
    )
    if fatal:
        log.error("exiting: %s", fatal)
        return 1
    return 0


async def _main(spec: WorkerSpec) -> tuple[Summary, str | None]:
    # Imported here: torch takes seconds to import, and a bad --queue should fail at once.
    from batchjob.backends import get_backend
    from batchjob.compile import ensure_artifact
    from batchjob.replica_process import plan_placements

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    worker: Worker | None = None
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals > 1:
            log.warning("second %s: exiting at once", name)
            logging.shutdown()
            os._exit(128 + signum)
        if worker is not None:
            worker.stop(name)
        elif main is not None:
            main.cancel()  # still starting: nothing received yet, nothing to release

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with contextlib.AsyncExitStack() as stack:
            queue = await stack.enter_async_context(SqsQueue(spec.queue))
            storage = await stack.enter_async_context(Storage(connections=32))
            await storage.prepare_output(spec.output)
            artifact = await asyncio.to_thread(ensure_artifact, spec.compile, spec.cache_dir)
            if spec.compile.task is not None and artifact.task != spec.compile.task:
                raise UsageError(
                    f"--task is {spec.compile.task} but the artifact {artifact.path} was "
                    f"compiled for {artifact.task}"
                )
            metrics = WorkerMetrics()
            if spec.metrics_port is not None:
                runner = await metrics.serve(spec.metrics_host, spec.metrics_port)
                stack.push_async_callback(runner.cleanup)
            device = get_backend(artifact.backend).device
            placements = plan_placements(spec.replicas, spec.cores_per_replica, device)
            engine, pool = await start_engine(
                stack,
                artifact,
                placements,
                start_timeout=spec.replica_start_timeout,
                max_batch_delay=spec.max_batch_delay_ms / 1000,
            )
            metrics.watch_engine(lambda: engine.stats, lambda: pool.restarts)
            worker = Worker(spec, queue, storage, engine, pool, metrics)
            log.info(
                "consuming %s: %d replicas, up to %d messages in flight, visibility %d s%s",
                queue.url, pool.size, spec.max_messages_in_flight, queue.visibility_timeout,
                "" if queue.max_receive_count is None
                else f", dead-letter queue after {queue.max_receive_count} receives",
            )  # fmt: skip
            summary = await worker.run()
            return summary, worker.fatal
    except asyncio.CancelledError:
        if signals and (task := asyncio.current_task()) is not None:
            task.uncancel()
            log.info("stopped by a signal while starting")
            return Summary(), None
        raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

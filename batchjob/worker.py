"""`batchjob worker`: an SQS queue in, Parquet on S3 out, safe under at-least-once delivery.

    receive (long poll, ≤ max in flight) ─► one task per message:
        heartbeat: extend its visibility before it lapses (up to SQS's 12-hour ceiling)
        work: parse (messages.py) ─► executor.py: shards ─► Engine.infer ─► Parquet, each
              output committed once ─► delete

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
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from batchjob.config import WorkerSpec
from batchjob.engine import Engine
from batchjob.engine_start import open_artifact, start_engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.executor import Delivery, Executor, message_line
from batchjob.messages import ObjectWork, Work, parse_message
from batchjob.metrics import WorkerMetrics
from batchjob.output_format import make_head
from batchjob.pipeline import Counts
from batchjob.prompts import spec_text_options
from batchjob.replicas import ReplicaPool
from batchjob.sinks import check_keep_columns, task_names
from batchjob.sqs import MAX_WAIT_SECONDS, Message, QueueError, SqsQueue
from batchjob.storage import Storage
from batchjob.token_classification import chunk_rows

log = logging.getLogger("batchjob.worker")

THROUGHPUT_LOG_SECONDS = 30.0
RECEIVE_BACKOFF_SECONDS = 5.0  # after a ReceiveMessage that failed past botocore's retries
CLOCK_MARGIN = 5.0  # seconds: our receipt time trails SQS's


@dataclass
class Summary:
    """Messages by outcome, and what their work produced."""

    done: int = 0
    duplicate: int = 0
    ignored: int = 0
    failed: int = 0
    released: int = 0
    counts: Counts = field(default_factory=Counts)
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
        self.spec, self.queue = spec, queue
        self.engine, self.pool, self.metrics = engine, pool, metrics
        self.executor = Executor(spec, storage, engine)
        self.visibility = max(1, queue.visibility_timeout)
        self.heartbeat = max(0.5, self.visibility / 3)
        self.summary = Summary()
        self.fatal: str | None = None  # the replicas gave up: stop, release, exit 1
        self._tasks: dict[asyncio.Task[None], Message] = {}
        self._slot_free = asyncio.Event()
        self._last_activity = time.monotonic()
        self._busy_since: float | None = None
        self._stopped = asyncio.Event()
        # Names this worker in the records of submitted jobs' messages (status sums its time).
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"

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
            now, documents = time.monotonic(), self.executor.inferred
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
            done: tuple[str, Counts] | None = await self._keep_hidden(message, work)
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise
        except Exception as e:  # this message fails; the worker goes on
            if not isinstance(e, BatchJobError | OSError):  # not foreseen: a bug, or a library's
                log.error("message %s: unexpected %r", message.id, e, exc_info=e)
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
        counts = None if done is None else done[1]
        if done is None:
            outcome, what = "ignored", "nothing to do (a test event, or not an object's creation)"
        else:
            outcome = "duplicate" if done[1].existing and not done[1].outputs else "done"
            what = message_line(*done)
        self._count(outcome, counts, seconds)
        log.info("%.3fs message %s %s: %s", seconds, message.id, outcome, what)

    async def _keep_hidden(self, message: Message, work: asyncio.Task[Any]) -> Any:
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
            summary.counts.add(counts)
            self.metrics.documents.inc(counts.documents)
            self.metrics.errors.inc(counts.errors)
            self.metrics.windows.inc(counts.windows)

    async def _work(self, message: Message) -> tuple[str, Counts] | None:
        """The message's work, done: what it was and its counts; None when it asks for
        nothing."""
        works: list[Work] = []
        for work in parse_message(message.body, message.id):
            if isinstance(work, ObjectWork) and self.executor.own_output(work.url):
                log.info("message %s: %s is its own output: ignored", message.id, work.url)
            else:
                works.append(work)
        if not works:
            return None
        what = "; ".join(self.executor.describe(work) for work in works)
        delivery = Delivery(
            message.id,
            message.receive_count,
            self.queue.max_receive_count,
            self.name,
            self._totals,
        )
        return what, await self.executor.do(works, delivery)

    def _totals(self) -> dict[str, Any]:
        """What this worker did so far: its busy time (a message in progress), documents and
        real tokens, for the cost of the jobs it worked on."""
        busy = self.summary.busy_seconds
        if self._busy_since is not None:
            busy += time.monotonic() - self._busy_since
        return {
            "busy_seconds": round(busy, 3),
            "documents": self.executor.inferred,
            "real_tokens": self.engine.stats.real_tokens,
        }


# -- the command ----------------------------------------------------------------------------


def work(spec: WorkerSpec) -> int:
    """Consume the queue until a signal (0 once drained) or idle (0); 1 when the replicas
    failed. UsageError: no such queue, bucket or model (nothing received)."""
    started = time.monotonic()
    summary, fatal = asyncio.run(_main(spec))
    counts = summary.counts
    rate = counts.documents / summary.busy_seconds if summary.busy_seconds else 0.0
    print(
        f"batchjob worker: {summary.done} messages done, {summary.duplicate} duplicate, "
        f"{summary.ignored} ignored, {summary.failed} failed, {summary.released} released; "
        f"{counts.documents} documents, {counts.errors} errors; "
        f"{time.monotonic() - started:.1f}s, busy {summary.busy_seconds:.3f}s, "
        f"{rate:.1f} documents/s while busy",
        flush=True,
    )
    if fatal:
        log.error("exiting: %s", fatal)
        return 1
    return 0


async def _main(spec: WorkerSpec) -> tuple[Summary, str | None]:
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
            storage = Storage(connections=32, expected_bucket_owner=spec.expected_bucket_owner)
            await stack.enter_async_context(storage)
            await storage.check_writable(spec.output)
            artifact, placements = await asyncio.to_thread(open_artifact, spec)
            # Bad --prompt-name, --chunk-overlap...: refused before any replica starts.
            options = await asyncio.to_thread(spec_text_options, artifact, spec, UsageError)
            # Workers on one queue can't share a first batch: int8 needs given ranges.
            head = make_head(artifact, spec.output_format, calibrate=False)
            check_keep_columns(
                spec.output_format.keep_columns,
                task_names(head),
                "--keep-columns",
                chunk_rows(head, options.long_documents),
            )
            metrics = WorkerMetrics()
            if spec.metrics_port is not None:
                runner = await metrics.serve(spec.metrics_host, spec.metrics_port)
                stack.push_async_callback(runner.cleanup)
            engine, pool = await start_engine(
                stack,
                artifact,
                placements,
                start_timeout=spec.replica_start_timeout,
                max_batch_delay=spec.max_batch_delay_ms / 1000,
                head=head,
            )
            metrics.watch_engine(lambda: engine.stats, lambda: pool.restarts)
            worker = Worker(spec, queue, storage, engine, pool, metrics)
            log.info(
                "consuming %s: %d replicas, up to %d messages in flight, visibility %d s%s",
                queue.url, pool.size, spec.max_messages_in_flight, queue.visibility_timeout,
                "" if queue.max_receive_count is None
                else f", dead-letter queue after {queue.max_receive_count} receives",
            )  # fmt: skip
            log.info(
                "messages may read %s; outputs go under %s",
                "any object (--allow-any-input)" if spec.allow_any_input
                else ", ".join(spec.allow_input), spec.output,
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

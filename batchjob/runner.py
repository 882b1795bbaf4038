"""`batchjob run`: a job over shards, a thin driver of the one engine.

    list shards, check everything (refuse before any work) ─► start the engine
      ─► up to --max-shards-in-flight shards at once (S3 objects download ahead):
         each through pipeline.write_shard (the engine's batches, rows in order, published
         once) ─► the manifest: every shard once, done, skipped or failed

The shards in flight share the engine's fixed-shape batches, as the messages of a worker and
the requests of `serve` do; the engine's sort window bounds how many records wait, and each
shard has a few chunks in flight, so memory stays flat however large the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from batchjob.artifact import Artifact
from batchjob.calibration import SHARD_ERRORS, earlier_ranges, first_records_ranges
from batchjob.config import RunSpec
from batchjob.engine import Engine, EngineStats
from batchjob.engine_start import open_artifact, start_engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.job_records import new_id
from batchjob.long_documents import TextOptions
from batchjob.output_format import format_changes, make_head, output_metadata
from batchjob.pair_tasks import pair_fields
from batchjob.paths import output_problems, overlap
from batchjob.pipeline import Counts, write_shard
from batchjob.prices import cost, hourly_price
from batchjob.progress import Progress
from batchjob.prompts import spec_text_options
from batchjob.record_store import earlier_output_formats, publish_run
from batchjob.records import Fields, read_records
from batchjob.replica_process import Placement
from batchjob.s3 import is_s3
from batchjob.shards import ShardRef
from batchjob.sinks import check_keep_columns, output_schema_source, task_names
from batchjob.startup import mark
from batchjob.storage import OpenShard, Storage
from batchjob.tasks import Head
from batchjob.token_classification import chunk_rows

log = logging.getLogger("batchjob.run")

# A run has no latency to keep: a partial batch waits this long, and only while a replica
# would otherwise idle (the engine's rule), for more records to fill it.
MAX_BATCH_DELAY = 0.05


@dataclass
class Report:
    """What the manifest says: every shard once, and what writing them produced."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    engine: EngineStats = field(default_factory=EngineStats)  # batches, real/compiled tokens
    replica_restarts: int = 0
    seconds: float = 0.0  # the whole run
    shards: int = 0  # this run's (its part's) shards
    listed: int = 0  # shards in the input; with --partition, this part has fewer
    cost: str = ""  # with --price-per-hour or --instance-type: what it came to
    pipeline_seconds: float = 0.0  # from replicas ready to the last shard committed

    def fail(self, rel: str, reason: str) -> None:
        log.error("shard failed: %s: %s", rel, reason)
        self.failed.append({"shard": rel, "error": reason})

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
    counts = report.counts
    rate = counts.documents / max(report.seconds, 1e-9)
    windows = (
        f" ({counts.windows} windows; split: {counts.split})"
        if spec.long_documents != "truncate"
        else ""
    )
    part = spec.part
    of_part = f"part {part}: {report.shards} of {report.listed} shards; " if part else ""
    print(
        f"batchjob run: {of_part}{counts.documents} documents{windows}, {counts.errors} errors, "
        f"{len(report.done)} shards done, {len(report.failed)} failed, "
        f"{len(report.skipped)} skipped, {report.seconds:.1f}s, {rate:.1f} documents/s"
        + (f"; {report.cost}" if report.cost else ""),
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
        listed = len(shards)
        if spec.part is not None:  # every part checked the whole input above, alike
            shards = spec.part.select(shards)
            log.info("part %s: %d of %d shards", spec.part, len(shards), listed)
        artifact, placements = open_artifact(spec)
        options = spec_text_options(artifact, spec, UsageError)
        mark("artifact verified")
        keep = spec.output_format.keep_columns
        head = make_head(artifact, spec.output_format, calibrate=True)
        chunked = chunk_rows(head, options.long_documents)
        check_keep_columns(keep, task_names(head), "--keep-columns", chunked)
        if spec.part is not None and head.embedder is not None and head.embedder.needs_ranges:
            raise UsageError(
                f"--partition {spec.part} with --embedding-precision int8 needs "
                "--embedding-ranges: each part would take its own ranges from its first records"
            )
        done_before = await storage.prepare_output(spec.output, list_existing=spec.resume)
        report = Report(skipped=[s.rel for s in shards if s.output_rel in done_before])
        report.shards, report.listed = len(shards), listed
        if report.skipped:
            log.info("--resume: %d shard(s) already done", len(report.skipped))
            if (embedder := head.embedder) is not None and embedder.needs_ranges:
                await earlier_ranges(storage, spec.output, embedder)
            now = output_metadata(artifact, head, keep, options)
            for before in await earlier_output_formats(storage, spec.output):
                if changes := format_changes(before, now):
                    raise UsageError(
                        f"--resume: {spec.output} holds outputs written with other options "
                        f"({'; '.join(changes)}); resume with those, or write to another --output"
                    )
        todo = [s for s in shards if s.output_rel not in done_before]
        problems = output_problems(spec.output, todo)  # these fail; the others run
        for rel, why in problems.items():
            report.fail(rel, why)
        todo = [s for s in todo if s.rel not in problems]
        unfinished = "not finished: the run stopped"
        try:
            if todo:  # (an empty part, a resumed run with all done: no replicas to start)
                await _run(spec, artifact, placements, storage, todo, report, options, head)
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
            manifest = _manifest(spec, artifact, report, options)
            manifest["output_format"] = output_metadata(artifact, head, keep, options)
            if (part := spec.part) is not None:
                manifest["partition"] = part.describe(report.shards, report.listed)
            # One record per run or part (never overwritten), and _manifest.json their summary.
            await publish_run(storage, spec.output, _run_record(spec, report, manifest))
    return report


async def _run(
    spec: RunSpec,
    artifact: Artifact,
    placements: list[Placement],
    storage: Storage,
    shards: list[ShardRef],
    report: Report,
    options: TextOptions,
    head: Head,
) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: task.cancel() if task else None)
    progress = Progress(spec.progress, len(shards))
    try:
        async with contextlib.AsyncExitStack() as stack:
            engine, pool = await start_engine(
                stack,
                artifact,
                placements,
                start_timeout=spec.replica_start_timeout,
                max_batch_delay=MAX_BATCH_DELAY,
                sort_window=spec.sort_window,
                wait_for_replicas=False,
                head=head,
            )
            # Shards are read and tokenized while the replicas load: the first batches are
            # waiting when the first replica is ready. A replica that never comes up fails
            # the run, as it always has.
            job = _Job(spec, engine, storage, report, progress, options)
            work = asyncio.create_task(job.shards(shards))
            try:
                await pool.start()
            except BaseException:
                work.cancel()
                await asyncio.wait([work])
                if not work.cancelled():
                    work.exception()  # retrieved: what failed first is being raised
                raise
            ready = time.monotonic()
            try:
                await work
            except asyncio.CancelledError:
                # Interrupted: no shard waits for the batches in flight (they run again on
                # --resume), so the replicas stop now, even one still loading after a restart.
                await pool.close(timeout=0)
                raise
            finally:
                report.pipeline_seconds = time.monotonic() - ready
                report.engine, report.replica_restarts = engine.stats, pool.restarts
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        progress.close()


class _Job:
    """The shards of one run through one engine, `--max-shards-in-flight` at a time."""

    def __init__(
        self,
        spec: RunSpec,
        engine: Engine,
        storage: Storage,
        report: Report,
        progress: Progress,
        options: TextOptions,
    ) -> None:
        self.spec, self.engine, self.storage = spec, engine, storage
        self.report, self.progress, self.options = report, progress, options
        self.keep = spec.output_format.keep_columns
        self.fields = pair_fields(
            Fields(spec.text_field, spec.text_pair_field, spec.id_field, self.keep),
            spec.output_format.pairs,
        )
        self.schema = output_schema_source(engine, self.keep, options)

    async def shards(self, shards: list[ShardRef]) -> None:
        await first_records_ranges(
            self.engine,
            self.storage,
            shards,
            self.fields,
            self.spec.records_per_read,
            self.options,
        )
        in_flight = self.spec.max_shards_in_flight
        slots = asyncio.Semaphore(in_flight)
        async with (
            self.storage.prefetch(shards, in_flight) as opened,
            asyncio.TaskGroup() as tasks,
        ):
            async for shard in opened:
                await slots.acquire()
                tasks.create_task(self.shard(shard, slots))

    async def shard(self, shard: OpenShard, slots: asyncio.Semaphore) -> None:
        ref = shard.ref
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
                chunk_size=self.spec.records_per_read,
            )
            writer = await self.storage.writer(self.spec.output, ref.output_rel, self.schema)
            counts = await write_shard(
                self.engine,
                writer,
                reader,
                threaded=True,
                on_rows=lambda n: self.progress.add(documents=n),
                options=self.options,
                keep=self.keep,
            )
        except SHARD_ERRORS as e:
            self.report.fail(ref.rel, f"{type(e).__name__}: {e}")
            return
        finally:
            shard.close()
            slots.release()
        if counts.existing:
            log.warning(
                "shard %s: its output %s exists already: kept, not replaced (delete it to "
                "compute it again; --resume skips such shards before computing them)",
                ref.rel, ref.output_rel,
            )  # fmt: skip
        self.report.done.append(ref.rel)
        self.report.counts.add(counts)
        self.progress.add(shards=1)
        log.debug("shard done: %s (%d rows)", ref.rel, counts.documents)


def _run_record(spec: RunSpec, report: Report, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as this run's record: its id and wall-clock times, and with a price, its
    cost (the machine's time for the whole run)."""
    finished = time.time()
    started = finished - report.seconds
    record = {"run_id": new_id(started), "started": started, "finished": finished, **manifest}
    price = hourly_price(spec.price_per_hour, spec.instance_type)
    if price is not None:
        counts = report.counts
        spent = cost(price, report.seconds, counts.documents, report.engine.real_tokens)
        record["cost"] = {"usd_per_hour": price, "instance_type": spec.instance_type}
        record["cost"] |= spent.describe()
        report.cost = spent.line()
    return record


def _manifest(
    spec: RunSpec, artifact: Artifact, report: Report, options: TextOptions
) -> dict[str, Any]:
    counts = report.counts
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
        **options.describe(),
        "versions": artifact.versions,
        "shards": {"done": report.done, "skipped": report.skipped, "failed": report.failed},
        "counts": {
            "documents": counts.documents,
            "errors": counts.errors,
            "truncated": counts.truncated,
            "windows": counts.windows,
            "documents_split": counts.split,
            "batches": report.engine.batches,
            "real_tokens": report.engine.real_tokens,
            "compiled_tokens": report.engine.compiled_tokens,
            "replica_restarts": report.replica_restarts,
        },
        "timings": {
            "seconds": round(report.seconds, 3),
            "pipeline_seconds": round(report.pipeline_seconds, 3),
            "documents_per_second": round(counts.documents / max(report.seconds, 1e-9), 2),
        },
    }

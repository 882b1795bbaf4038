"""`batchjob submit`: a job's shards, listed once, sent to a queue by name, for a fleet of
`batchjob worker`s to do (each shard once: outputs are written once, as `run`'s are).

    list the input (or read --input-manifest) ─► the outputs already there ─► the job's
      submission record (every shard it expects, those sent) ─► job messages, 10 a call

Each message names its shards and the input root they are named from, so that a worker
writes the very keys `batchjob run --input <root>` would. Submitting the same job again (the
same input and output, or the same --job-id) sends only the shards whose outputs are
missing: those failed, lost, or still in progress (a second delivery of those is harmless).
Nothing is sent when something is wrong: a refusal is one line and exit 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from batchjob.errors import UsageError
from batchjob.job_records import new_id, submission_key
from batchjob.job_specs import SubmitSpec
from batchjob.paths import output_problems, overlap
from batchjob.record_store import put_record
from batchjob.s3 import S3Error, is_s3
from batchjob.shards import ShardRef
from batchjob.sqs import SqsQueue
from batchjob.storage import Storage

log = logging.getLogger("batchjob.submit")


@dataclass
class Submitted:
    job_id: str
    shards: int  # the job's, in all
    done: int  # with an output already
    sent: int  # shards sent now
    messages: int


def submit(spec: SubmitSpec) -> int:
    """Send the job's missing shards; 0 when sent (or none missing). UsageError: nothing sent."""
    result = asyncio.run(_submit(spec))
    print(
        f"batchjob submit: job {result.job_id}: {result.shards} shards, {result.done} done "
        f"already, {result.sent} sent in {result.messages} messages",
        flush=True,
    )
    return 0


def input_root(shards: list[ShardRef]) -> str:
    """The `s3://bucket/prefix/` every shard is named from (its path = root + its rel).
    UsageError when shards are not all on S3, or not all below one bucket's prefix."""
    roots = set()
    for ref in shards:
        if not is_s3(ref.path):
            raise UsageError(
                f"shard {ref.path}: submit sends S3 objects to workers, not local files"
            )
        roots.add(ref.path[: len(ref.path) - len(ref.rel)])
    root = roots.pop() if len(roots) == 1 else ""
    if not root.endswith("/") or not root[len("s3://") :].split("/")[0]:
        raise UsageError(
            "--input-manifest: the shards of one job must lie in one bucket (they are named "
            "by their path below a common prefix, as `batchjob run` names them)"
        )
    return root


def message_bodies(spec: SubmitSpec, root: str, todo: list[ShardRef], limit: int) -> list[str]:
    """The job messages: `--shards-per-message` shards each. UsageError for a body larger than
    the queue's MaximumMessageSize (`limit`)."""
    bodies = []
    for start in range(0, len(todo), spec.shards_per_message):
        part = todo[start : start + spec.shards_per_message]
        body = json.dumps(
            {
                "job_id": spec.job_id,
                "input": root,
                "shards": [ref.path for ref in part],
                "output": spec.output,
            },
            ensure_ascii=False,
        )
        if len(body.encode()) > limit:
            raise UsageError(
                f"--shards-per-message {spec.shards_per_message}: a message of {len(part)} "
                f"shards is {len(body.encode())} bytes, more than the queue's MaximumMessageSize "
                f"({limit}); give fewer"
            )
        bodies.append(body)
    return bodies


async def _submit(spec: SubmitSpec) -> Submitted:
    storage = Storage(connections=16, expected_bucket_owner=spec.expected_bucket_owner)
    async with storage, SqsQueue(spec.queue) as queue:
        if spec.input_manifest:
            shards = await storage.read_shard_list(spec.input_manifest)
        else:  # formats by extension only: that is how workers tell them
            shards = await storage.list_shards(spec.input, exclude=spec.output)
        root = input_root(shards)
        if why := overlap(spec.output, spec.input or None, shards):
            raise UsageError(f"{why}: its results would overwrite or shadow the input")
        if problems := output_problems(spec.output, shards):
            rel, why = next(iter(problems.items()))
            raise UsageError(f"shard {rel}: {why} ({len(problems)} such shard(s))")
        done = await storage.existing_outputs(spec.output)
        todo = [ref for ref in shards if ref.output_rel not in done]
        bodies = message_bodies(spec, root, todo, queue.maximum_message_size)
        # The record first: `status` knows what the job expects before any shard is done,
        # and an output that can't be written refuses the job before anything is sent.
        record = {
            "kind": "submission",
            "job_id": spec.job_id,
            "submitted": time.time(),
            "input": spec.input or None,
            "input_manifest": spec.input_manifest,
            "root": root,
            "output": spec.output,
            "queue": queue.url,
            "shards_per_message": spec.shards_per_message,
            "messages": len(bodies),
            "shards": [ref.rel for ref in shards],
            "sent": [ref.rel for ref in todo],
        }
        key = submission_key(spec.job_id, new_id())
        try:
            await put_record(storage, spec.output, key, record)
        except S3Error as e:
            if not e.client_fault:
                raise
            raise UsageError(f"--output {spec.output}: can't be written: {e}") from None
        await queue.send(bodies)
        log.info(
            "job %s: %d message(s) sent to %s; its record: %s",
            spec.job_id, len(bodies), queue.url, key,
        )  # fmt: skip
    return Submitted(spec.job_id, len(shards), len(shards) - len(todo), len(todo), len(bodies))

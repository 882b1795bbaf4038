"""`batchjob status`: where a submitted job (or everything run on an output) stands, from the
records under the output and the outputs themselves; read only.

    exit 0  complete: every shard expected has its output
    exit 3  work remains (in the queue, in progress, failed and to be delivered again)
    exit 1  nothing remains but shards that failed for good
    exit 2  a bad invocation: no such output, job or records

A CronJob polls it until it exits other than 3.
"""

from __future__ import annotations

import asyncio

from batchjob.errors import UsageError
from batchjob.job_records import RUNS, Status, job_prefix, job_status, render
from batchjob.job_specs import StatusSpec
from batchjob.record_store import job_ids, output_files, read_records, record_keys
from batchjob.s3 import S3Error
from batchjob.storage import Storage


def status(spec: StatusSpec) -> int:
    """Print the job's status; its exit code (0, 1 or 3)."""
    what, result = asyncio.run(_status(spec))
    for line in render(result, what, spec.failed_shown):
        print(line, flush=True)
    return result.exit_code


async def _status(spec: StatusSpec) -> tuple[str, Status]:
    async with Storage(connections=16, expected_bucket_owner=spec.expected_bucket_owner) as storage:
        try:
            return await _read(storage, spec)
        except S3Error as e:
            if e.client_fault:  # no such bucket, no access: nothing to poll
                raise UsageError(f"--output {spec.output}: {e}") from None
            raise


async def _read(storage: Storage, spec: StatusSpec) -> tuple[str, Status]:
    known = await job_ids(storage, spec.output)
    if spec.job_id is not None and spec.job_id not in known:
        jobs = ", ".join(known) or "none"
        raise UsageError(f"--job-id {spec.job_id}: no such job under {spec.output} (jobs: {jobs})")
    submissions, messages = [], []
    for job in [spec.job_id] if spec.job_id is not None else known:
        keys = await record_keys(storage, spec.output, job_prefix(job))
        records = await read_records(storage, spec.output, keys)
        submissions += [r for r in records if r.get("kind") == "submission"]
        messages += [r for r in records if r.get("kind") == "message"]
    runs = []
    if spec.job_id is None:
        runs = await read_records(
            storage, spec.output, await record_keys(storage, spec.output, RUNS)
        )
    if not submissions and not runs:
        raise UsageError(
            f"--output {spec.output}: no job submitted nor run recorded there "
            "(nothing under _batchjob/)"
        )
    outputs = await output_files(storage, spec.output)
    result = job_status(submissions, messages, runs, outputs, spec.price)
    what = f"job {spec.job_id}" if spec.job_id else f"{spec.output}"
    return what, result

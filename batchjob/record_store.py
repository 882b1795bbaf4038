"""Records under an output (job_records.py says which): written once each, at keys nobody else
writes, listed and read back; local paths and s3:// alike.

A record is written whole: locally a temp file linked to its name (which fails if the name
exists), on S3 one PUT (strong read-after-write: a listing after it shows it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from batchjob.errors import StorageError
from batchjob.job_records import JOBS, RUNS, misfit, run_key, summarize_runs
from batchjob.s3 import S3Error, S3Url, is_s3
from batchjob.sinks import manifest_bytes
from batchjob.storage import Storage, existing_local_outputs

log = logging.getLogger("batchjob.records")

RECORD_MAX_BYTES = 256 << 20  # a plan of a million shards is some tens of MB
SUMMARY_ROUNDS = 8  # a summary rewritten while other runs keep adding records: give up after


def _location(output: str, key: str) -> str:
    return str(S3Url.parse(output).join(key)) if is_s3(output) else os.path.join(output, key)


def _write_local_once(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)  # FileExistsError rather than replacing another's record
    finally:
        os.unlink(tmp)


async def put_record(storage: Storage, output: str, key: str, record: dict[str, Any]) -> None:
    """`<output>/<key>` ← the record. StorageError when it can't be written."""
    data = manifest_bytes(record)
    where = _location(output, key)
    if not is_s3(output):
        try:
            await asyncio.to_thread(_write_local_once, where, data)
        except OSError as e:
            raise StorageError(f"can't write {where}: {e.strerror or e}") from None
        return
    await (await storage.s3()).put_bytes(S3Url.parse(where), data, "application/json")


async def record_keys(storage: Storage, output: str, prefix: str) -> list[str]:
    """The keys of the records under `<output>/<prefix>`, relative to the output, sorted."""
    if not is_s3(output):
        root = os.path.join(output, prefix)

        def walk() -> list[str]:
            found = []
            for dirpath, _, names in os.walk(root):
                for name in names:
                    if name.endswith(".json"):
                        found.append(os.path.relpath(os.path.join(dirpath, name), output))
            return sorted(p.replace(os.sep, "/") for p in found)

        return await asyncio.to_thread(walk)
    url = S3Url.parse(output)
    base = S3Url(url.bucket, url.prefix)
    s3 = await storage.s3()
    keys = [o.key async for o in s3.list_objects(base.join(prefix)) if o.key.endswith(".json")]
    return sorted(key[len(base.key) :] for key in keys)


async def read_record(storage: Storage, output: str, key: str) -> dict[str, Any] | None:
    """A record; None (logged) when it is not a JSON object, or is gone."""
    where = _location(output, key)
    try:
        if is_s3(output):
            data = await (await storage.s3()).read_bytes(S3Url.parse(where), RECORD_MAX_BYTES)
        else:
            data = await asyncio.to_thread(_read_local, where)
        value = json.loads(data)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("%s: not a readable record (%s): skipped", where, e)
        return None
    except S3Error as e:
        if e.status == 404:
            return None
        raise
    if not isinstance(value, dict):
        log.warning("%s: not a JSON object: skipped", where)
        return None
    if why := misfit(key, value):
        log.warning("%s: not a record batchjob wrote (%s): skipped", where, why)
        return None
    return value


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def read_records(storage: Storage, output: str, keys: list[str]) -> list[dict[str, Any]]:
    limit = asyncio.Semaphore(16)

    async def one(key: str) -> dict[str, Any] | None:
        async with limit:
            return await read_record(storage, output, key)

    return [r for r in await asyncio.gather(*(one(k) for k in keys)) if r is not None]


async def earlier_output_formats(storage: Storage, output: str) -> list[dict[str, Any]]:
    """The output formats of the earlier runs on `output` that wrote shards."""
    records = await read_records(storage, output, await record_keys(storage, output, RUNS))
    return [
        r["output_format"]
        for r in records
        if isinstance(r.get("output_format"), dict) and (r.get("shards") or {}).get("done")
    ]


async def output_files(storage: Storage, output: str) -> set[str]:
    """The shard outputs under `output` (relative paths), read only: unlike
    `Storage.existing_outputs`, no temp file is cleaned up on the way."""
    if not is_s3(output):
        return await asyncio.to_thread(existing_local_outputs, output)
    return await storage.existing_outputs(output)


async def publish_run(storage: Storage, output: str, record: dict[str, Any]) -> dict[str, Any]:
    """The run's record, then `_manifest.json` as the summary of every run's record.

    Runs on one output may finish together: each rewrites the summary until a listing after
    its write shows no record it didn't include. The last summary written is then complete:
    whoever wrote it had listed after its write, and any record that listing missed was
    written later, by a run that then wrote its own summary later still. Returns the summary."""
    await put_record(storage, output, run_key(str(record["run_id"])), record)
    keys = await record_keys(storage, output, RUNS)
    summary = record
    for _ in range(SUMMARY_ROUNDS):
        records = await read_records(storage, output, keys)
        summary = summarize_runs(records or [record])
        await storage.write_manifest(output, summary)
        again = await record_keys(storage, output, RUNS)
        if again == keys:
            break
        keys = again
    else:
        log.warning("runs kept finishing on %s: _manifest.json may miss the latest", output)
    return summary


async def job_ids(storage: Storage, output: str) -> list[str]:
    """The jobs submitted to this output (from the keys of their records)."""
    keys = await record_keys(storage, output, JOBS)
    return sorted({key[len(JOBS) :].split("/", 1)[0] for key in keys})

"""`run`'s int8 ranges when none are given: the final embeddings of the job's first records
(inferred once more before the job starts), or, for `--resume`, the earlier run's.

"Final" means as they are written, before quantisation: cut to `--embedding-dim` and
renormalised, after `--long-documents mean` has put a record's windows together; with
`--long-documents chunk` each window's embedding counts, as each is a row.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pyarrow as pa

from batchjob.embeddings import Embedder, checked_ranges, recorded_ranges
from batchjob.engine import Engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.long_documents import TextOptions
from batchjob.records import Fields, Record, read_records
from batchjob.shards import ShardRef
from batchjob.storage import Storage

log = logging.getLogger("batchjob.run")

SHARD_ERRORS = (BatchJobError, OSError, EOFError, pa.ArrowException)


async def earlier_ranges(storage: Storage, output: str, embedder: Embedder) -> None:
    """--resume of an int8 job: the shards done before were quantised with the ranges their
    run recorded; the rest must be too."""
    earlier = await storage.earlier_manifest(output)
    ranges = recorded_ranges(earlier) if earlier is not None else None
    if ranges is None:
        raise UsageError(
            f"--resume with --embedding-precision int8: no int8 ranges in {output}/"
            "_manifest.json for the shards done before; give them with --embedding-ranges "
            "(one of those .parquet outputs holds them)"
        )
    where = f"{output}/_manifest.json"
    embedder.use_ranges(checked_ranges(ranges, embedder.dim, where), f"the earlier run ({where})")


async def first_records_ranges(
    engine: Engine,
    storage: Storage,
    shards: list[ShardRef],
    fields: Fields,
    records_per_read: int,
    options: TextOptions,
) -> None:
    """int8 without given ranges: the ranges of the job's first `records_per_read` records'
    final embeddings, the same for every shard. An unreadable shard here is left for its own
    turn, where it fails as it would have."""
    embedder = engine.head.embedder
    if embedder is None or not embedder.needs_ranges:
        return
    records: list[Record] = []
    for ref in shards:
        if len(records) >= records_per_read:
            break
        try:
            stream = await storage.open(ref)
            try:
                chunks = read_records(
                    stream, ref.format, ref.rel, fields, gzip=ref.gzip, chunk_size=records_per_read
                )
                first: list[Record] = await asyncio.to_thread(next, chunks, [])
            finally:
                stream.close()
        except SHARD_ERRORS:
            continue
        records += [r for r in first if r.error is None]
    if not records:
        return
    embedder.calibrating = True
    try:
        results = await engine.infer(records[:records_per_read], options)
    finally:
        embedder.calibrating = False
    vectors = []
    for result in results:
        if result.values is not None:
            vectors.append(result.values["embedding"])
        vectors += [values["embedding"] for _, values in result.chunks]
    if vectors:
        embedder.calibrate(np.stack(vectors))
        log.info("int8 ranges taken from %d embeddings of the job's first records", len(vectors))

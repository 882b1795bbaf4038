"""Parquet output: the schema, and shard files that appear whole or not at all.

A shard's rows are streamed into a temp file next to the target as they complete, in input
order, then renamed: a killed run leaves no partial `.parquet`, and a file that exists
means its shard is done.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchjob.tasks import task_fields

MANIFEST = "_manifest.json"
TMP_SUFFIX = ".tmp"


def output_schema(task: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string()),
            *task_fields(task),
            pa.field("truncated", pa.bool_()),
            pa.field("error", pa.string()),
        ]
    )


def output_rel(rel: str) -> str:
    """`a/b.jsonl.gz` → `a/b.parquet`: the input's relative path, its extensions replaced."""
    head, name = os.path.split(rel)
    if name.endswith(".gz"):
        name = name[:-3]
    stem, _ = os.path.splitext(name)
    return os.path.join(head, stem + ".parquet")


class ShardWriter:
    """Rows in input order → `<path>`, via `<path>.<unique>.tmp` and a rename on commit."""

    def __init__(self, path: str, schema: pa.Schema, unique: str) -> None:
        self.path = path
        self.schema = schema
        self.tmp = f"{path}.{unique}{TMP_SUFFIX}"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.rows = 0

    def write(self, columns: dict[str, list[Any]]) -> None:
        table = pa.table(columns, schema=self.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def write_manifest(output: str, manifest: dict[str, Any]) -> None:
    path = os.path.join(output, MANIFEST)
    tmp = path + TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)

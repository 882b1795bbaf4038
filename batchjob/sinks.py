"""Parquet output: the schema, and shard files that appear whole or not at all.

A shard's rows are streamed into a local temp file as they complete, in input order, then
published in one step: renamed into place locally, or uploaded whole to S3 with
`If-None-Match: *` (pyarrow's own S3 streams complete the upload even when the writer was
interrupted, leaving a truncated but valid file). A killed run leaves no partial
`.parquet`, and an output that exists means its shard is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import socket
import tempfile
from typing import Any, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from batchjob.s3 import S3, S3Url
from batchjob.tasks import task_fields

MANIFEST = "_manifest.json"
TMP_SUFFIX = ".tmp"


# `--long-documents chunk`: which window of its document a row is (`text[char_start:char_end]`).
CHUNK_FIELDS = (
    pa.field("chunk", pa.int32()),
    pa.field("char_start", pa.int64()),
    pa.field("char_end", pa.int64()),
)


def output_schema(task: str, chunked: bool = False) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string()),
            *(CHUNK_FIELDS if chunked else ()),
            *task_fields(task),
            pa.field("truncated", pa.bool_()),
            pa.field("error", pa.string()),
        ]
    )


class Row(NamedTuple):
    """One output row."""

    id: str
    values: dict[str, Any] | None  # the task's columns; None for an error row
    truncated: bool
    error: str | None
    span: tuple[int, int, int] | None = None  # chunked: (chunk, char_start, char_end)


def row_columns(
    task_names: list[str], rows: list[Row], chunked: bool = False
) -> dict[str, list[Any]]:
    """Rows → the output's columns (`output_schema`), for `OutputWriter.write`."""
    columns: dict[str, list[Any]] = {"id": [r.id for r in rows]}
    if chunked:
        for k, name in enumerate(("chunk", "char_start", "char_end")):
            columns[name] = [None if r.span is None else r.span[k] for r in rows]
    for name in task_names:
        columns[name] = [None if r.values is None else r.values[name] for r in rows]
    columns["truncated"] = [r.truncated for r in rows]
    columns["error"] = [r.error for r in rows]
    return columns


def output_rel(rel: str) -> str:
    """`a/b.jsonl.gz` → `a/b.parquet`: the input's relative path, its extensions replaced.
    String work only: an S3 key's `//` and `..` are kept as they are."""
    head, slash, name = rel.rpartition("/")
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem, _ = posixpath.splitext(name)
    return f"{head}{slash}{stem}.parquet"


def _owner() -> str:
    """Who writes a local temp file: host and pid, so that `--resume` can tell the temp files
    of runs that are gone (on this host) from those of runs still going."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_temp_files(output: str | None = None) -> list[str]:
    """Temp files of runs of this host whose process is gone: under a local `output`
    (`.<name>.<host>-<pid>.tmp`), or with None the system temp directory's, where S3
    outputs are staged (`batchjob-<host>-<pid>-*.parquet`; not recursive)."""
    host = re.escape(socket.gethostname())
    if output is None:
        pattern = re.compile(rf"^batchjob-{host}-(\d+)-.*\.parquet$")
        top = tempfile.gettempdir()
        walk: list[tuple[str, list[str], list[str]]] = [(top, [], os.listdir(top))]
    else:
        pattern = re.compile(rf"^\..+\.{host}-(\d+){re.escape(TMP_SUFFIX)}$")
        walk = list(os.walk(output))
    return [
        os.path.join(dirpath, name)
        for dirpath, _, filenames in walk
        for name in filenames
        if (match := pattern.match(name)) and not _alive(int(match.group(1)))
    ]


class OutputWriter(Protocol):
    """One shard's output: rows in input order, then published whole or thrown away."""

    def write(self, columns: dict[str, list[Any]]) -> None: ...

    async def commit(self) -> bool:
        """Publish the output: True; False when it already existed (another run wrote it)."""
        ...

    def abort(self) -> None: ...


class _ParquetTemp:
    """Rows → a Parquet file at `tmp`, row group by row group (memory stays bounded)."""

    def __init__(self, tmp: str, schema: pa.Schema) -> None:
        self.tmp = tmp
        self.schema = schema
        self._writer = pq.ParquetWriter(tmp, schema, compression="zstd")

    def write(self, columns: dict[str, list[Any]]) -> None:
        self._writer.write_table(pa.table(columns, schema=self.schema))

    def abort(self) -> None:
        # Also after a failed write (a full disk): closing may fail again; the file goes.
        with contextlib.suppress(OSError, pa.ArrowException):
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class ShardWriter(_ParquetTemp):
    """Rows in input order → `<path>`, via `.<name>.<host>-<pid>.tmp` and a rename on commit.

    The temp name starts with a dot, so dataset readers (pyarrow, Spark, Athena) skip it
    while the job runs, and also when a killed run left it behind.
    """

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.path = path
        head, name = os.path.split(path)
        os.makedirs(head or ".", exist_ok=True)
        super().__init__(os.path.join(head, f".{name}.{_owner()}{TMP_SUFFIX}"), schema)

    async def commit(self) -> bool:
        try:
            self._writer.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return True


class S3ShardWriter(_ParquetTemp):
    """Rows in input order → a local temp file → one conditional upload to `url` on commit."""

    def __init__(self, s3: S3, url: S3Url, schema: pa.Schema) -> None:
        self.s3 = s3
        self.url = url
        fd, tmp = tempfile.mkstemp(prefix=f"batchjob-{_owner()}-", suffix=".parquet")
        os.close(fd)
        super().__init__(tmp, schema)

    async def commit(self) -> bool:
        try:
            self._writer.close()
            return await self.s3.put_file_once(self.tmp, self.url)
        finally:
            self.abort()  # the temp file goes, published or not


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, default=str) + "\n").encode()


def write_manifest(output: str, manifest: dict[str, Any]) -> None:
    path = os.path.join(output, MANIFEST)
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(manifest_bytes(manifest))
    os.replace(tmp, path)

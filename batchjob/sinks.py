"""Parquet output: the schema, and shard files that appear whole or not at all.

A shard's rows are streamed into a local temp file as they complete, in input order, then
published in one step: renamed into place locally, or uploaded whole to S3 with
`If-None-Match: *` (pyarrow's own S3 streams complete the upload even when the writer was
interrupted, leaving a truncated but valid file). A killed run leaves no partial
`.parquet`, and an output that exists means its shard is done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import socket
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias

import pyarrow as pa
import pyarrow.parquet as pq

from batchjob.artifact import Artifact
from batchjob.errors import UsageError
from batchjob.long_documents import TextOptions
from batchjob.output_format import output_metadata
from batchjob.s3 import S3, S3Url
from batchjob.tasks import Fields, Head
from batchjob.token_classification import chunk_rows

MANIFEST = "_manifest.json"
TMP_SUFFIX = ".tmp"
METADATA_KEY = b"batchjob"  # the Parquet schema metadata: JSON, what a reader needs
# A schema, or what makes it when a file's first rows are written (metadata known by then).
SchemaSource = pa.Schema | Callable[[], pa.Schema]
Column: TypeAlias = "list[Any] | pa.Array[Any]"


# `--long-documents chunk`: which window of its document a row is (`text[char_start:char_end]`).
CHUNK_FIELDS = (
    pa.field("chunk", pa.int32()),
    pa.field("char_start", pa.int64()),
    pa.field("char_end", pa.int64()),
)
CHUNK_NAMES = tuple(f.name for f in CHUNK_FIELDS)


def output_schema(
    fields: Fields,
    keep: Sequence[str] = (),
    metadata: dict[str, Any] | None = None,
    chunked: bool = False,
) -> pa.Schema:
    """`id`, the kept columns (string here: a Parquet input's own type replaces it when the
    first rows are written), `chunk`, `char_start`, `char_end` when `chunked`, the task's
    columns, `truncated`, `error`; `metadata` as JSON under `batchjob`."""
    schema = pa.schema(
        [
            pa.field("id", pa.string()),
            *(pa.field(name, pa.string()) for name in keep),
            *(CHUNK_FIELDS if chunked else ()),
            *fields,
            pa.field("truncated", pa.bool_()),
            pa.field("error", pa.string()),
        ]
    )
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, default=str)})
    return schema


def task_names(head: Head) -> list[str]:
    """The names of the task's output columns."""
    return [f.name for f in head.fields()]


class _Engine(Protocol):
    @property
    def artifact(self) -> Artifact: ...
    @property
    def head(self) -> Head: ...


def output_schema_source(
    engine: _Engine, keep: Sequence[str], options: TextOptions
) -> Callable[[], pa.Schema]:
    """The output's schema as of when a file's first rows are written: its metadata then
    holds what the job settled at its start (int8 ranges). `options`: the text options
    the file's records are run with (chunk rows; the prompt the metadata records)."""

    def schema() -> pa.Schema:
        head = engine.head
        chunked = chunk_rows(head, options.long_documents)
        metadata = output_metadata(engine.artifact, head, keep, options)
        return output_schema(head.fields(), keep, metadata, chunked)

    return schema


def check_keep_columns(
    keep: Sequence[str], task_names: Sequence[str], where: str, chunked: bool = False
) -> None:
    """UsageError unless every kept column is a new output column, named once (`chunked`:
    the chunk rows' columns are taken too)."""
    taken = {"id", *task_names, "truncated", "error", *(CHUNK_NAMES if chunked else ())}
    for name in keep:
        if name in taken:
            raise UsageError(
                f"{where}: column {name!r} collides with an output column "
                f"({', '.join(sorted(taken))})"
            )
    if len(set(keep)) != len(keep):
        raise UsageError(f"{where}: a column is named twice: {','.join(keep)}")


class Row(NamedTuple):
    """One output row."""

    id: str
    values: dict[str, Any] | None  # the task's columns; None for an error row
    truncated: bool
    error: str | None
    span: tuple[int, int, int] | None = None  # chunked: (chunk, char_start, char_end)
    kept: tuple[Any, ...] | None = None  # the kept columns' values (Record.kept)


def kept_column(values: list[Any]) -> Column:
    """A kept column's values: Parquet's typed scalars → an array of their type (nulls
    typed alike), else the strings as they are."""
    kind = next((v.type for v in values if isinstance(v, pa.Scalar)), None)
    if kind is None:
        return values
    typed: pa.Array[Any] = pa.array(
        [pa.scalar(None, kind) if v is None else v for v in values], kind
    )
    return typed


def row_columns(
    task_names: list[str], rows: list[Row], chunked: bool = False, keep: Sequence[str] = ()
) -> dict[str, Column]:
    """Rows → the output's columns (`output_schema`), for `OutputWriter.write`."""
    columns: dict[str, Column] = {"id": [r.id for r in rows]}
    for i, name in enumerate(keep):
        columns[name] = kept_column([None if r.kept is None else r.kept[i] for r in rows])
    if chunked:
        for k, name in enumerate(CHUNK_NAMES):
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

    def write(self, columns: dict[str, Column]) -> None: ...

    async def commit(self) -> bool:
        """Publish the output: True; False when it already existed (another run wrote it)."""
        ...

    def abort(self) -> None: ...


def _array(values: Column, kind: pa.DataType) -> pa.Array[Any]:
    # A later row group's kept column may differ from the first's (all null: null type).
    return values.cast(kind) if isinstance(values, pa.Array) else pa.array(values, kind)


class _ParquetTemp:
    """Rows → a Parquet file at `tmp`, row group by row group (memory stays bounded).

    The file is opened at the first rows: its schema's metadata can hold what the first
    batch decided (int8 ranges), and a kept column takes the Arrow type its values have."""

    def __init__(self, tmp: str, schema: SchemaSource) -> None:
        self.tmp = tmp
        self._source = schema
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        open(tmp, "wb").close()  # the temp file exists from now: abort() and --resume see it

    def _open(self, columns: dict[str, Column] | None) -> pq.ParquetWriter:
        if self._writer is None:
            schema = self._source if isinstance(self._source, pa.Schema) else self._source()
            for i, field in enumerate(schema):
                given = (columns or {}).get(field.name)
                if isinstance(given, pa.Array) and given.type != field.type:
                    schema = schema.set(i, field.with_type(given.type))
            self.schema = schema
            self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        return self._writer

    def write(self, columns: dict[str, Column]) -> None:
        writer = self._open(columns)
        assert self.schema is not None
        arrays = [_array(columns[field.name], field.type) for field in self.schema]
        writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def _close(self) -> None:
        self._open(None).close()

    def abort(self) -> None:
        # Also after a failed write (a full disk): closing may fail again; the file goes.
        if self._writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class ShardWriter(_ParquetTemp):
    """Rows in input order → `<path>`, via `.<name>.<host>-<pid>.tmp` and a rename on commit.

    The temp name starts with a dot, so dataset readers (pyarrow, Spark, Athena) skip it
    while the job runs, and also when a killed run left it behind.
    """

    def __init__(self, path: str, schema: SchemaSource) -> None:
        self.path = path
        head, name = os.path.split(path)
        os.makedirs(head or ".", exist_ok=True)
        super().__init__(os.path.join(head, f".{name}.{_owner()}{TMP_SUFFIX}"), schema)

    async def commit(self) -> bool:
        """Publish, unless a file is there already (False): as on S3 (If-None-Match), an
        output is written once, and nothing that was there before is ever replaced."""
        try:
            self._close()
            return _publish_once(self.tmp, self.path)
        finally:
            self.abort()  # the temp name goes, published or not


def _publish_once(tmp: str, path: str) -> bool:
    try:
        os.link(tmp, path)  # atomic, and unlike a rename never replaces
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        # No hard links on this file system (some network ones): look, then rename.
        if os.path.lexists(path):
            return False
        os.rename(tmp, path)
    return True


class S3ShardWriter(_ParquetTemp):
    """Rows in input order → a local temp file → one conditional upload to `url` on commit."""

    def __init__(self, s3: S3, url: S3Url, schema: SchemaSource) -> None:
        self.s3 = s3
        self.url = url
        fd, tmp = tempfile.mkstemp(prefix=f"batchjob-{_owner()}-", suffix=".parquet")
        os.close(fd)
        super().__init__(tmp, schema)

    async def commit(self) -> bool:
        try:
            self._close()
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

"""Streaming readers: jsonl / csv / parquet / txt shards, optionally gzipped, into records.

`read_records` yields lists of at most `chunk_size` records in input order. Memory is bounded
by the chunk size plus one line (at most `MAX_LINE_BYTES`), never by the file size.

A record that can't be parsed becomes a `Record` with `error` set, never an exception and
never a silent drop. Every error record's id is `<rel>:<n>` (1-based line for jsonl and txt,
1-based data row for csv and parquet), and its message names the place and the field.
Only whole-shard failures raise: corrupt gzip data or an unreadable Parquet file
(`InputError`), and errors of the stream itself, which propagate unchanged.

Streams need only `.read(n)`. Parquet needs random access: a gzipped or non-seekable
Parquet stream is first copied to a spooled temporary file (in memory up to 64 MiB).
Lines end at b"\\n" (b"\\r\\n" works too); a UTF-8 BOM at the start of a file is ignored.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from gzip import BadGzipFile, GzipFile
from pathlib import PurePosixPath
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from batchjob.errors import HUGE_NUMBER, InputError, UsageError
from batchjob.pair_tasks import candidate_labels_of, group_text

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

FORMATS = ("jsonl", "csv", "parquet", "txt")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
    ".text": "txt",
}
# A longer line becomes an error record instead of an unbounded allocation.
MAX_LINE_BYTES = 16 << 20
# A CSV field may be as long as a line: the csv module's default, 128 KiB, would make an error
# row of a long document that JSON Lines takes. (A process-wide setting; raising it is safe.)
csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
_SURROGATE = re.compile("[\ud800-\udfff]")
_SPOOL_BYTES = 64 << 20
_GZIP_ERRORS = (BadGzipFile, EOFError, zlib.error)


@dataclass(frozen=True, slots=True)
class Fields:
    """Which fields (jsonl), columns (csv, parquet) hold the text, the optional pair and the id."""

    text: str = "text"
    text_pair: str | None = None  # when set, each record must also carry this field
    id: str = "id"
    keep: tuple[str, ...] = ()  # copied into the output (--keep-columns); missing: null
    candidate_labels: str | None = None  # zero-shot: each record's labels (a list of strings)
    group: str | None = None  # text-ranking: the record's group (`rank` within it)


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    text: str | None  # None only when error is set
    text_pair: str | None = None
    error: str | None = None  # set when the record could not be parsed: names problem and place
    # The values of Fields.keep, in its order: str or None from jsonl/csv, a typed pyarrow
    # Scalar from Parquet (its column's Arrow type goes to the output). None: no values.
    kept: tuple[Any, ...] | None = None
    candidate_labels: tuple[str, ...] | None = None  # Fields.candidate_labels' value
    group: str | None = None  # Fields.group's value as text; None: missing or null

    def __post_init__(self) -> None:
        # A lone surrogate (JSON's "\ud800" escape; a Python string) is not Unicode: the
        # tokenizer would refuse the whole batch it is in, and Parquet the whole shard. Every
        # source of records meets here: such a text makes the record an error row; an id or a
        # kept value is written with U+FFFD in the surrogate's place (the id with an error).
        problem = None
        for name in ("id", "text", "text_pair"):
            if (bad := _surrogate(getattr(self, name))) is None:
                continue
            problem = problem or (
                f"{name} holds a lone UTF-16 surrogate U+{ord(bad[0]):04X} at character "
                f"{bad.start()}: not valid Unicode"
            )
            if name == "id":
                object.__setattr__(self, "id", _replaced(self.id))
        if self.kept is not None and any(_surrogate(v) for v in self.kept):
            object.__setattr__(self, "kept", tuple(map(_replaced, self.kept)))
        if problem is not None and self.error is None:
            for field, new in (("text", None), ("text_pair", None), ("error", problem)):
                object.__setattr__(self, field, new)
        elif _surrogate(self.error):  # a message quoting a value of the input
            object.__setattr__(self, "error", _replaced(self.error))


def _surrogate(value: object) -> re.Match[str] | None:
    """The first lone surrogate of a string; None for anything else (ASCII: at once)."""
    return None if not isinstance(value, str) or value.isascii() else _SURROGATE.search(value)


def _replaced(value: Any) -> Any:
    """A string with U+FFFD for its lone surrogates; anything else as it is."""
    return _SURROGATE.sub("\ufffd", value) if _surrogate(value) else value


def is_gzip(name: str) -> bool:
    return name.lower().endswith(".gz")


def detect_format(name: str, fmt: str = "auto") -> str:
    """The format of file `name`: `fmt` when given, else from its extension (after .gz)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UsageError(f"unknown input format {fmt!r}: expected auto or one of {FORMATS}")
        return fmt
    base = name[:-3] if is_gzip(name) else name
    found = EXTENSIONS.get(PurePosixPath(base).suffix.lower())
    if found is None:
        supported = ", ".join(f"{ext}[.gz]" for ext in EXTENSIONS)
        raise UsageError(f"can't tell the format of {name!r}: supported extensions are {supported}")
    return found


def read_records(
    stream: BinaryIO,
    fmt: str,
    rel: str,
    fields: Fields,
    *,
    gzip: bool = False,
    chunk_size: int = 1024,
) -> Iterator[list[Record]]:
    """Chunks of the records of one shard; `rel` is its path relative to the input root."""
    # Not a generator itself, so that usage errors raise at the call, not at the first next().
    if fmt not in FORMATS:
        raise UsageError(f"unknown input format {fmt!r}: expected one of {FORMATS}")
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if fmt == "txt" and fields.text_pair is not None:
        raise UsageError(
            f"--text-pair-field can't be used with txt input: {rel} holds one text per line"
        )
    if fmt == "parquet":
        return _chunks(_parquet(stream, rel, fields, gzip, chunk_size), chunk_size)
    source: _Readline = GzipFile(fileobj=stream) if gzip else _buffered(stream)
    reader = {"jsonl": _jsonl, "csv": _csv, "txt": _txt}[fmt]
    return _chunks(reader(source, rel, fields), chunk_size)


class _Readline(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


class _Raw(io.RawIOBase):
    """Lets io.BufferedReader read an object that only has .read(n), such as an S3 body."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)


def _buffered(stream: BinaryIO) -> _Readline:
    if isinstance(stream, io.BufferedIOBase):
        return stream
    return io.BufferedReader(_Raw(stream))


class _Bad(Exception):
    """A problem with one record: it becomes that record's error."""


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _read(read: Callable[[int], bytes], size: int, rel: str) -> bytes:
    try:
        return read(size)
    except _GZIP_ERRORS as e:
        raise InputError(f"{rel}: corrupt gzip data: {e}") from e


def _lines(f: _Readline, rel: str) -> Iterator[tuple[int, bytes, str | None]]:
    """(1-based line number, line, problem or None) for every line, blank ones included."""
    n = 0
    while line := _read(f.readline, MAX_LINE_BYTES + 1, rel):
        n += 1
        if n == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := _read(f.readline, MAX_LINE_BYTES, rel)) and not rest.endswith(b"\n"):
                pass
            yield n, b"", f"line longer than {MAX_LINE_BYTES} bytes"
        else:
            yield n, line, None


def _decode(line: bytes) -> tuple[str, str | None]:
    """The line as text (invalid bytes replaced) and the UTF-8 problem, if any."""
    try:
        return line.decode(), None
    except UnicodeDecodeError as e:
        problem = f"invalid UTF-8 (byte 0x{line[e.start]:02x} at offset {e.start})"
        return line.decode(errors="replace"), problem


def _error(rel: str, unit: str, n: int, problem: object) -> Record:
    return Record(f"{rel}:{n}", None, error=f"{rel} {unit} {n}: {problem}")


def _id(value: object, name: str, fallback: str) -> str:
    """Strings as they are, integers as their decimal text, missing or null: the fallback.
    Anything else (a float, a bool, an object, a list) is refused: its text would not be
    the id the user knows (1.0 vs 1, True vs true)."""
    if value is None:
        return fallback
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = {bool: "a boolean", float: "a float", dict: "an object", list: "an array"}
    got = kind.get(type(value), type(value).__name__)
    raise _Bad(f"field {name!r} (the id) must be a string or an integer, got {got}")


def _parquet_id(value: object) -> object:
    """pandas stores integer ids with nulls as float64: 7.0 is 7, NaN is null."""
    if isinstance(value, float) and (math.isnan(value) or value.is_integer()):
        return None if math.isnan(value) else int(value)
    return value


def _text(values: Mapping[str, object], name: str, types: Mapping[str, str]) -> str:
    if name not in values:
        raise _Bad(f"missing field {name!r}")
    value = values[name]
    if value is None:
        raise _Bad(f"field {name!r} is null")
    if not isinstance(value, str):
        raise _Bad(f"field {name!r} must be a string, got {types.get(name, type(value).__name__)}")
    return value


def _record(
    values: Mapping[str, object],
    id_value: object,
    fields: Fields,
    where: tuple[str, str, int],
    types: Mapping[str, str] | None = None,
    kept_values: Mapping[str, object] | None = None,
) -> Record:
    """The record from one row's values; `where` is (rel, "line" or "row", n). The kept
    columns come from `kept_values` where given (Parquet's typed scalars), else `values`."""
    rel, unit, n = where
    source = values if kept_values is None else kept_values
    kept = tuple(_kept(source.get(name)) for name in fields.keep) if fields.keep else None
    try:
        text = _text(values, fields.text, types or {})
        pair = None if fields.text_pair is None else _text(values, fields.text_pair, types or {})
        record_id = _id(id_value, fields.id, f"{rel}:{n}")
    except _Bad as e:
        # Its kept values still go out: they tell the user which record failed.
        return dataclasses.replace(_error(rel, unit, n, e), kept=kept)
    labels = None
    if fields.candidate_labels is not None:
        try:
            labels = candidate_labels_of(values, fields.candidate_labels)
        except InputError as e:
            place = f"{rel} {unit} {n} (id {record_id})"
            return Record(record_id, None, error=f"{place}: {e}", kept=kept)
    group = None if fields.group is None else group_text(values.get(fields.group))
    record = Record(record_id, text, pair, kept=kept, candidate_labels=labels, group=group)
    if record.error is not None:  # not valid Unicode (Record.__post_init__): where it is
        place = f"{rel} {unit} {n} (id {record.id})"
        record = dataclasses.replace(record, error=f"{place}: {record.error}")
    return record


def row_record(
    values: Mapping[str, object],
    fields: Fields,
    record_id: str,
    types: Mapping[str, str],
    kept: tuple[Any, ...] | None = None,
) -> Record:
    """The record of one row of a table that is not a file (a Ray Data batch): its text
    checked as a file's row's (`types`: the columns' Arrow types, for the message); an error
    names the problem alone, the row being its own place."""
    try:
        text = _text(values, fields.text, types)
        pair = None if fields.text_pair is None else _text(values, fields.text_pair, types)
    except _Bad as e:
        return Record(record_id, None, error=str(e), kept=kept)
    return Record(record_id, text, pair, kept=kept)


def _kept(value: object) -> object:
    """A kept column's value: strings and Parquet's typed scalars as they are, null as null,
    any other JSON value as its JSON text (the output's column is a string column)."""
    if value is None or isinstance(value, str | pa.Scalar):
        return value
    return json.dumps(value, ensure_ascii=False)


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON: {e.msg} (col {e.colno})") from None
    except RecursionError:
        raise _Bad("invalid JSON: nested too deeply") from None
    except ValueError:
        raise _Bad(f"invalid JSON: {HUGE_NUMBER}") from None
    if not isinstance(value, dict):
        raise _Bad(f"expected a JSON object, got {type(value).__name__}")
    return value


def _jsonl(f: _Readline, rel: str, fields: Fields) -> Iterator[Record]:
    for n, raw, problem in _lines(f, rel):
        text, bad = _decode(raw)
        if problem or bad:
            yield _error(rel, "line", n, problem or bad)
        elif text.strip():
            try:
                obj = _json_object(text)
            except _Bad as e:
                yield _error(rel, "line", n, e)
            else:
                yield _record(obj, obj.get(fields.id), fields, (rel, "line", n))


def records_from_objects(values: list[Any], rel: str, fields: Fields) -> list[Record]:
    """Records from JSON values already parsed (inline documents of a queue message)."""
    records = []
    for n, value in enumerate(values, 1):
        if not isinstance(value, dict):
            problem = f"expected a JSON object, got {type(value).__name__}"
            records.append(_error(rel, "document", n, problem))
        else:
            records.append(_record(value, value.get(fields.id), fields, (rel, "document", n)))
    return records


def _txt(f: _Readline, rel: str, fields: Fields) -> Iterator[Record]:
    for n, raw, problem in _lines(f, rel):
        text, bad = _decode(raw)
        if problem or bad:
            yield _error(rel, "line", n, problem or bad)
        elif text.strip():
            yield Record(f"{rel}:{n}", text.removesuffix("\n").removesuffix("\r"))


def _columns(names: list[str]) -> str:
    shown = ", ".join(names[:10])
    return f"columns: {shown}, ..." if len(names) > 10 else f"columns: {shown}"


_AFTER_BARE_CR = re.compile(r"(?<=\r)(?!\n)(?!$)")


def _csv(f: _Readline, rel: str, fields: Fields) -> Iterator[Record]:
    # Lines are decoded one by one (not through a TextIOWrapper) so that invalid UTF-8
    # spoils only the row it is in; `problems` collects them until the row comes out.
    problems: list[str] = []

    def lines() -> Iterator[str]:
        for _, raw, problem in _lines(f, rel):
            text, bad = _decode(raw)
            if problem or bad:
                problems.append(problem or bad or "")
            # Lines end at a bare CR too (classic Mac and some spreadsheet exports), as in a
            # file opened with newline="": the reader joins a quoted field's lines again.
            yield from _AFTER_BARE_CR.split(text) if "\r" in text else [text]

    reader = csv.reader(lines(), strict=True)
    header: list[str] = []
    header_problem: str | None = None
    try:
        while not header:  # blank lines before the header are not rows
            header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        header_problem = f"unreadable CSV header: {e}"
    if problems:
        header_problem = f"unreadable CSV header: {problems[0]}"
        problems.clear()
    for name in (fields.text, fields.text_pair):
        if header_problem is None and name is not None and name not in header:
            header_problem = f"missing column {name!r} ({_columns(header)})"

    n = 0
    while True:
        problem: str | None = None
        try:
            row = next(reader)
        except StopIteration:
            if header_problem is not None and n == 0:  # no row would tell it: the header does
                yield _error(rel, "line", 1, header_problem)
            return
        except csv.Error as e:
            row, problem = [], f"malformed CSV: {e}"
        n += 1
        problem = problem or (problems[0] if problems else None)
        problems.clear()
        if problem is None and not row:
            continue
        problem = problem or header_problem
        if problem is None and len(row) != len(header):
            problem = f"expected {len(header)} fields, got {len(row)}"
        if problem is not None:
            yield _error(rel, "row", n, problem)
            continue
        values = dict(zip(header, row, strict=True))
        yield _record(values, values.get(fields.id) or None, fields, (rel, "row", n))


def _parquet(
    stream: BinaryIO, rel: str, fields: Fields, gzipped: bool, chunk_size: int
) -> Iterator[Record]:
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        source: IO[bytes] = stream
        seekable = getattr(stream, "seekable", None)
        if gzipped or seekable is None or not seekable():
            src = GzipFile(fileobj=stream) if gzipped else stream
            while block := _read(src.read, 1 << 20, rel):
                spool.write(block)
            spool.seek(0)
            source = spool
        try:
            yield from _parquet_records(pq.ParquetFile(source), rel, fields, chunk_size)
        except pa.ArrowInvalid as e:
            raise InputError(f"{rel}: not a readable Parquet file: {e}") from e


def _parquet_records(
    pf: pq.ParquetFile, rel: str, fields: Fields, chunk_size: int
) -> Iterator[Record]:
    schema = pf.schema_arrow
    names = list(schema.names)
    for name in (fields.text, fields.text_pair):
        if name is not None and name not in names:
            problem = f"missing column {name!r} ({_columns(names)})"
            for i in range(pf.metadata.num_rows):
                yield _error(rel, "row", i + 1, problem)
            return
    wanted = (fields.id, fields.text, fields.text_pair, fields.candidate_labels, fields.group)
    columns = list(dict.fromkeys(c for c in wanted if c is not None and c in names))
    types = {c: str(schema.field(c).type) for c in columns}
    kept = [c for c in dict.fromkeys(fields.keep) if c in names]
    n = 0
    read = list(dict.fromkeys([*columns, *kept]))
    for batch in pf.iter_batches(batch_size=chunk_size, columns=read):
        data = batch.select(columns).to_pydict()
        arrays = {c: batch.column(c) for c in kept}
        for i in range(batch.num_rows):
            n += 1
            values = {c: data[c][i] for c in columns}
            record_id = _parquet_id(values.get(fields.id))
            # Typed scalars: the output's column keeps the input's Arrow type.
            scalars = {c: arrays[c][i] for c in kept}
            yield _record(values, record_id, fields, (rel, "row", n), types, scalars)

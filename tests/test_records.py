"""Tests for the streaming record readers: every format, gzip, errors as records, memory."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tracemalloc
from pathlib import Path
from typing import BinaryIO, cast

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchjob import records
from batchjob.errors import InputError, UsageError
from batchjob.records import FORMATS, Fields, Record, detect_format, is_gzip, read_records

DEFAULT = Fields()


def _read(
    data: bytes | object,
    fmt: str,
    rel: str = "a/b.x",
    fields: Fields = DEFAULT,
    *,
    gz: bool = False,
    chunk_size: int = 1024,
) -> list[Record]:
    if isinstance(data, bytes):
        data = io.BytesIO(gzip.compress(data) if gz else data)
    chunks = read_records(cast(BinaryIO, data), fmt, rel, fields, gzip=gz, chunk_size=chunk_size)
    return [r for chunk in chunks for r in chunk]


def _jsonl(*lines: object) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def _parquet(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=3)
    return out.getvalue()


class ReadOnly:
    """A stream with nothing but read(), like an S3 body: not seekable, no readline."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


# --- detect_format ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("x.jsonl", "jsonl"),
        ("dir/x.json", "jsonl"),
        ("x.ndjson.gz", "jsonl"),
        ("s3://bucket/p/x.CSV", "csv"),
        ("x.csv.gz", "csv"),
        ("x.parquet", "parquet"),
        ("x.pq.gz", "parquet"),
        ("x.txt", "txt"),
        ("x.text.GZ", "txt"),
    ],
)
def test_detect_format_by_extension(name: str, fmt: str) -> None:
    assert detect_format(name) == fmt


@pytest.mark.parametrize("name", ["x.tsv", "x.gz", "x", "x.jsonl.bz2"])
def test_detect_format_unknown_extension(name: str) -> None:
    with pytest.raises(UsageError, match=r"can't tell the format of .*\.jsonl.*\.parquet") as e:
        detect_format(name)
    assert repr(name) in str(e.value)


def test_detect_format_explicit_wins_and_is_checked() -> None:
    assert detect_format("data.bin", "csv") == "csv"
    assert detect_format("x.jsonl", "txt") == "txt"
    with pytest.raises(UsageError, match="unknown input format 'xml'"):
        detect_format("x.jsonl", "xml")


def test_is_gzip() -> None:
    assert is_gzip("a/b.jsonl.gz")
    assert is_gzip("B.CSV.GZ")
    assert not is_gzip("b.jsonl")
    assert not is_gzip("b.tgz")


def test_read_records_checks_arguments_at_call_time() -> None:
    stream = io.BytesIO(b"")
    with pytest.raises(UsageError, match="unknown input format 'xml'"):
        read_records(stream, "xml", "a", Fields())
    with pytest.raises(UsageError, match="chunk_size must be ≥ 1, got 0"):
        read_records(stream, "jsonl", "a", Fields(), chunk_size=0)
    with pytest.raises(UsageError, match=r"--text-pair-field can't be used with txt input: a\.txt"):
        read_records(stream, "txt", "a.txt", Fields(text_pair="q"))


# --- jsonl ------------------------------------------------------------------------------


def test_jsonl_ids_from_field_or_place() -> None:
    data = _jsonl(
        {"id": "x1", "text": "hello"},
        {"id": 12, "text": "int id"},
        {"text": "no id"},
        {"id": None, "text": "null id", "extra": [1, 2]},
    )
    assert _read(data, "jsonl", "a/b.jsonl") == [
        Record("x1", "hello"),
        Record("12", "int id"),
        Record("a/b.jsonl:3", "no id"),
        Record("a/b.jsonl:4", "null id"),
    ]


def test_jsonl_blank_lines_skipped_but_counted() -> None:
    data = b'\n  \n{"text": "a"}\r\n\t\n{"text": ""}\n\n'
    assert _read(data, "jsonl", "b.jsonl") == [Record("b.jsonl:3", "a"), Record("b.jsonl:5", "")]


def test_jsonl_bom_and_line_separators_inside_text() -> None:
    line = json.dumps({"text": "one\u2028two\x85three\rfour"}, ensure_ascii=False).encode()
    data = b"\xef\xbb\xbf" + line + b"\n"
    assert _read(data, "jsonl") == [Record("a/b.x:1", "one\u2028two\x85three\rfour")]


def test_jsonl_custom_fields_and_text_pair() -> None:
    fields = Fields(text="q", text_pair="p", id="key")
    data = _jsonl({"key": 7, "q": "question", "p": "passage", "text": "ignored"})
    assert _read(data, "jsonl", fields=fields) == [Record("7", "question", "passage")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"\xff\xfe not utf-8", "invalid UTF-8 (byte 0xff at offset 0)"),
        (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes (col 2)"),
        (b"oops", "invalid JSON: Expecting value (col 1)"),
        (b'{"text": "a"} trailing', "invalid JSON: Extra data (col 15)"),
        (b'["text"]', "expected a JSON object, got list"),
        (b"42", "expected a JSON object, got int"),
        (b'{"id": "x"}', "missing field 'text'"),
        (b'{"text": 3}', "field 'text' must be a string, got int"),
        (b'{"text": ["a"]}', "field 'text' must be a string, got list"),
        (b'{"text": null}', "field 'text' is null"),
        (b"[" * 100_000, "invalid JSON: nested too deeply"),
        (b'{"text": ' + b"9" * 5000 + b"}", "invalid JSON: a number of more than 4300 digits"),
    ],
)
def test_jsonl_bad_line_becomes_error_record(line: bytes, message: str) -> None:
    data = _jsonl({"id": 1, "text": "before"}, b"", line, {"id": 2, "text": "after"})
    got = _read(data, "jsonl", "a/b.jsonl")
    assert got == [
        Record("1", "before"),
        Record("a/b.jsonl:3", None, error=f"a/b.jsonl line 3: {message}"),
        Record("2", "after"),
    ]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"text": "a"}, "missing field 'pair'"),
        ({"text": "a", "pair": 1.5}, "field 'pair' must be a string, got float"),
        ({"text": "a", "pair": None}, "field 'pair' is null"),
    ],
)
def test_jsonl_bad_text_pair(obj: dict[str, object], message: str) -> None:
    data = _jsonl(obj, {"text": "b", "pair": "c"})
    assert _read(data, "jsonl", "p.jsonl", Fields(text_pair="pair")) == [
        Record("p.jsonl:1", None, error=f"p.jsonl line 1: {message}"),
        Record("p.jsonl:2", "b", "c"),
    ]


def test_jsonl_error_record_id_is_the_place_even_with_an_id_field() -> None:
    [got] = _read(_jsonl({"id": "x", "text": 1}), "jsonl", "r.jsonl")
    assert got.id == "r.jsonl:1"


def test_jsonl_gzip() -> None:
    data = _jsonl({"id": "a", "text": "x"}, {"text": "y"})
    assert _read(data, "jsonl", "d/f.jsonl.gz", gz=True) == [
        Record("a", "x"),
        Record("d/f.jsonl.gz:2", "y"),
    ]


def test_jsonl_too_long_line_is_an_error_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 50)
    data = _jsonl({"text": "x" * 200}, {"text": "y" * 30})
    assert _read(data, "jsonl", "l.jsonl") == [
        Record("l.jsonl:1", None, error="l.jsonl line 1: line longer than 50 bytes"),
        Record("l.jsonl:2", "y" * 30),
    ]


def test_a_lone_surrogate_makes_an_error_record_not_a_failed_batch() -> None:
    """JSON's "\\ud800" escape decodes to a str the tokenizer refuses (with the whole batch)."""
    data = b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "x\\ud800"}\n{"text": "y"}\n'
    ok, bad, last = _read(data, "jsonl", "s.jsonl")
    assert (ok, last) == (Record("a", "ok"), Record("s.jsonl:3", "y"))
    assert bad == Record(
        "b",
        None,
        error="s.jsonl line 2 (id b): text holds a lone UTF-16 surrogate U+D800 at character 1: "
        "not valid Unicode",
    )
    assert Record("r", "fine", "p\udfff").error == (
        "text_pair holds a lone UTF-16 surrogate U+DFFF at character 1: not valid Unicode"
    )


def test_stream_with_only_read() -> None:
    data = _jsonl(*({"text": f"t{i}"} for i in range(3000)))
    got = _read(ReadOnly(data), "jsonl")
    assert [r.text for r in got] == [f"t{i}" for i in range(3000)]


def test_corrupt_gzip_raises_input_error() -> None:
    whole = gzip.compress(_jsonl(*({"text": f"t{i}"} for i in range(10_000))))
    chunks = read_records(io.BytesIO(whole[:-1000]), "jsonl", "c.jsonl.gz", Fields(), gzip=True)
    with pytest.raises(InputError, match=r"c\.jsonl\.gz: corrupt gzip data"):
        list(chunks)
    with pytest.raises(InputError, match=r"c\.jsonl\.gz: corrupt gzip data"):
        list(read_records(io.BytesIO(b"not gzip"), "jsonl", "c.jsonl.gz", Fields(), gzip=True))


@given(st.lists(st.text()))
def test_jsonl_round_trip(texts: list[str]) -> None:
    data = b"".join(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts)
    assert [r.text for r in _read(data, "jsonl", chunk_size=3)] == texts


# --- csv --------------------------------------------------------------------------------


def test_csv_ids_quoting_and_empty_text() -> None:
    data = b'id,text,lang\r\na1,hello,en\r\n,"multi\r\nline, with ""quotes""",en\r\n7,,fr\r\n'
    assert _read(data, "csv", "s/t.csv") == [
        Record("a1", "hello"),
        Record("s/t.csv:2", 'multi\r\nline, with "quotes"'),
        Record("7", ""),
    ]


def test_csv_blank_rows_skipped_but_counted_and_bom() -> None:
    data = b"\xef\xbb\xbftext\n\nx\n\ny\n"
    assert _read(data, "csv", "t.csv") == [Record("t.csv:2", "x"), Record("t.csv:4", "y")]


def test_csv_text_pair_and_custom_columns() -> None:
    data = b"key,q,p\n1,what,because\n"
    fields = Fields(text="q", text_pair="p", id="key")
    assert _read(data, "csv", fields=fields) == [Record("1", "what", "because")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (b"x,only-two", "expected 3 fields, got 2"),
        (b"x,a,b,c", "expected 3 fields, got 4"),
        (b'x,"bad"quote,en', "malformed CSV: ',' expected after '\"'"),
        (b"x,caf\xe9,fr", "invalid UTF-8 (byte 0xe9 at offset 5)"),
    ],
)
def test_csv_bad_row_becomes_error_record(row: bytes, message: str) -> None:
    data = b"id,text,lang\n1,before,en\n" + row + b"\n2,after,en\n"
    assert _read(data, "csv", "a/b.csv") == [
        Record("1", "before"),
        Record("a/b.csv:2", None, error=f"a/b.csv row 2: {message}"),
        Record("2", "after"),
    ]


def test_csv_unterminated_quote_at_end() -> None:
    data = b'text\nok\n"never closed\nmore\n'
    assert _read(data, "csv", "u.csv") == [
        Record("u.csv:1", "ok"),
        Record("u.csv:2", None, error="u.csv row 2: malformed CSV: unexpected end of data"),
    ]


def test_csv_missing_text_column_makes_every_row_an_error() -> None:
    data = b"id,body\n1,a\n\n2,b\n"
    message = "missing column 'text' (columns: id, body)"
    assert _read(data, "csv", "m.csv") == [
        Record("m.csv:1", None, error=f"m.csv row 1: {message}"),
        Record("m.csv:3", None, error=f"m.csv row 3: {message}"),
    ]
    [got] = _read(b"text\nx\n", "csv", "m.csv", Fields(text_pair="p"))
    assert got.error == "m.csv row 1: missing column 'p' (columns: text)"


def test_csv_unreadable_header() -> None:
    got = _read(b"id,te\xffxt\n1,a\n", "csv", "h.csv")
    assert got == [
        Record(
            "h.csv:1",
            None,
            error="h.csv row 1: unreadable CSV header: invalid UTF-8 (byte 0xff at offset 5)",
        )
    ]


def test_csv_with_bare_cr_line_endings() -> None:
    """Classic Mac line endings (and a bare CR inside a quoted field of a CRLF file)."""
    assert _read(b"id,text\r1,hello\r2,world\r", "csv", "m.csv") == [
        Record("1", "hello"),
        Record("2", "world"),
    ]
    assert _read(b'id,text\r\n1,"a\rb"\r\n2,c\r\n', "csv") == [
        Record("1", "a\rb"),
        Record("2", "c"),
    ]


def test_csv_unreadable_header_without_rows_is_still_reported() -> None:
    [got] = _read(b'id,"te\n', "csv", "h.csv")
    assert got.error == "h.csv line 1: unreadable CSV header: unexpected end of data"


def test_csv_empty_or_header_only() -> None:
    assert _read(b"", "csv") == []
    assert _read(b"id,text\n", "csv") == []


def test_csv_gzip() -> None:
    data = b"text,id\nx,\ny,9\n"
    assert _read(data, "csv", "c.csv.gz", gz=True) == [Record("c.csv.gz:1", "x"), Record("9", "y")]


@given(st.lists(st.text()))
def test_csv_round_trip(texts: list[str]) -> None:
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(["id", "text"])
    writer.writerows([i, t] for i, t in enumerate(texts))
    got = _read(out.getvalue().encode(), "csv", chunk_size=4)
    assert [(r.id, r.text) for r in got] == [(str(i), t) for i, t in enumerate(texts)]


# --- parquet ----------------------------------------------------------------------------


def test_parquet_ids_and_text_pair() -> None:
    table = pa.table(
        {
            "id": [10, None, 30, 40],
            "text": ["a", "b", "", "d"],
            "pair": ["p1", "p2", "p3", "p4"],
            "other": [1.0, 2.0, 3.0, 4.0],
        }
    )
    got = _read(_parquet(table), "parquet", "d/f.parquet", Fields(text_pair="pair"))
    assert got == [
        Record("10", "a", "p1"),
        Record("d/f.parquet:2", "b", "p2"),
        Record("30", "", "p3"),
        Record("40", "d", "p4"),
    ]


def test_parquet_without_id_column_and_float_ids() -> None:
    got = _read(_parquet(pa.table({"text": ["a", "b"]})), "parquet", "f.pq")
    assert [r.id for r in got] == ["f.pq:1", "f.pq:2"]
    # pandas' integer ids with nulls (float64): 1.0 is 1, NaN is null; 2.5 is no id.
    table = pa.table({"id": [1.0, None, 2.5, float("nan")], "text": ["a", "b", "c", "d"]})
    got = _read(_parquet(table), "parquet", "f.pq")
    assert [r.id for r in got] == ["1", "f.pq:2", "f.pq:3", "f.pq:4"]
    assert got[2].error == (
        "f.pq row 3: field 'id' (the id) must be a string or an integer, got a float"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"a-7"', "a-7"),
        ("7", "7"),
        ("-12345678901234567890", "-12345678901234567890"),
        ("null", "x.jsonl:1"),
        (None, "x.jsonl:1"),
        ('""', ""),
    ],
    ids=["string", "int", "big-int", "null", "missing", "empty-string"],
)
def test_jsonl_ids_kept_or_fallback(value: str | None, expected: str) -> None:
    line = '{"text": "t"' + ("" if value is None else f', "id": {value}') + "}\n"
    (record,) = _read(line.encode(), "jsonl", "x.jsonl")
    assert (record.id, record.error) == (expected, None)


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("1.0", "a float"),
        ("2.5", "a float"),
        ("true", "a boolean"),
        ('{"a": 1}', "an object"),
        ("[1]", "an array"),
    ],
)
def test_jsonl_ids_of_other_types_are_error_rows(value: str, got: str) -> None:
    data = f'{{"text": "t", "id": {value}}}\n{{"text": "u", "id": "ok"}}\n'.encode()
    bad, good = _read(data, "jsonl", "x.jsonl")
    assert bad == Record(
        "x.jsonl:1",
        None,
        error=f"x.jsonl line 1: field 'id' (the id) must be a string or an integer, got {got}",
    )
    assert good == Record("ok", "u")


def test_parquet_null_text_and_pair() -> None:
    table = pa.table({"text": ["a", None, "c"], "p": ["x", "y", None]})
    got = _read(_parquet(table), "parquet", "n.parquet", Fields(text_pair="p"))
    assert got == [
        Record("n.parquet:1", "a", "x"),
        Record("n.parquet:2", None, error="n.parquet row 2: field 'text' is null"),
        Record("n.parquet:3", None, error="n.parquet row 3: field 'p' is null"),
    ]


def test_parquet_non_string_text_column() -> None:
    table = pa.table({"id": ["x", "y"], "text": pa.array([1, None], pa.int64())})
    assert _read(_parquet(table), "parquet", "i.parquet") == [
        Record(
            "i.parquet:1", None, error="i.parquet row 1: field 'text' must be a string, got int64"
        ),
        Record("i.parquet:2", None, error="i.parquet row 2: field 'text' is null"),
    ]


def test_parquet_large_string_and_dictionary_text() -> None:
    table = pa.table(
        {
            "a": pa.array(["x", "y"], pa.large_string()),
            "b": pa.array(["u", "v"]).dictionary_encode(),
        }
    )
    got = _read(_parquet(table), "parquet", fields=Fields(text="a", text_pair="b"))
    assert [(r.text, r.text_pair) for r in got] == [("x", "u"), ("y", "v")]


def test_parquet_missing_text_column_makes_every_row_an_error() -> None:
    table = pa.table({"id": list(range(5)), "body": list("abcde")})
    got = _read(_parquet(table), "parquet", "m.parquet")
    message = "missing column 'text' (columns: id, body)"
    assert got == [
        Record(f"m.parquet:{n}", None, error=f"m.parquet row {n}: {message}") for n in range(1, 6)
    ]


def test_parquet_gzip_and_non_seekable_stream() -> None:
    data = _parquet(pa.table({"text": ["a", "b"]}))
    assert [r.text for r in _read(data, "parquet", "g.parquet.gz", gz=True)] == ["a", "b"]
    assert [r.text for r in _read(ReadOnly(data), "parquet")] == ["a", "b"]


def test_parquet_unreadable_file_raises_input_error() -> None:
    with pytest.raises(InputError, match=r"x\.parquet: not a readable Parquet file"):
        _read(b"this is not parquet", "parquet", "x.parquet")


# --- txt --------------------------------------------------------------------------------


def test_txt_lines_are_documents() -> None:
    data = b"first doc\r\n\n   \n  indented, trailing space \nno newline at end"
    assert _read(data, "txt", "t/x.txt") == [
        Record("t/x.txt:1", "first doc"),
        Record("t/x.txt:4", "  indented, trailing space "),
        Record("t/x.txt:5", "no newline at end"),
    ]


def test_txt_invalid_utf8_line_and_gzip() -> None:
    data = b"ok\nbad \xc3\x28 line\nalso ok\n"
    assert _read(data, "txt", "x.txt.gz", gz=True) == [
        Record("x.txt.gz:1", "ok"),
        Record("x.txt.gz:2", None, error="x.txt.gz line 2: invalid UTF-8 (byte 0xc3 at offset 4)"),
        Record("x.txt.gz:3", "also ok"),
    ]


# --- chunking and memory ----------------------------------------------------------------


FIVE = {
    "jsonl": _jsonl(*({"text": str(i)} for i in range(5))),
    "csv": b"text\n0\n1\n2\n3\n4\n",
    "parquet": _parquet(pa.table({"text": [str(i) for i in range(5)]})),
    "txt": b"0\n1\n2\n3\n4\n",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunking(fmt: str) -> None:
    chunks = list(read_records(io.BytesIO(FIVE[fmt]), fmt, "r", Fields(), chunk_size=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [r.text for c in chunks for r in c] == ["0", "1", "2", "3", "4"]


def test_large_gzip_jsonl_reads_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl.gz"
    n, words = 100_000, "some words to make a document of realistic length " * 2
    size = 0
    with gzip.open(path, "wb", compresslevel=1) as f:
        for i in range(n):
            size += f.write(b'{"id": %d, "text": "doc %d: %s"}\n' % (i, i, words.encode()))
    count = 0
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            for chunk in read_records(f, "jsonl", "big.jsonl.gz", Fields(), gzip=True):
                count += len(chunk)
                last = chunk[-1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert last == Record(str(n - 1), f"doc {n - 1}: {words}")
    assert peak < size / 10, f"peak {peak} bytes for {size} bytes of input"

"""`POST /invocations`: request bodies → records, and results → response bodies.

Requests (Content-Type):
- `application/jsonlines` (Batch Transform's MultiRecord with SplitType=Line): one record per
  line, a JSON object holding the text field (`inputs` by default) or a JSON string. A line
  that can't be parsed becomes an error record, answered `{"error": "..."}` on its line.
- `application/json`: the Hugging Face inference toolkit's `{"inputs": str | [str],
  "parameters": {...}}`, answered as the toolkit answers it.
- `text/csv`: a header naming the text field, or a single column without a header (what
  SplitType=Line sends: the header would reach only the first mini-batch).

Responses (Accept): `application/jsonlines` (one object per record: the kept columns, then
the task's columns and `truncated`, or `error`), or `application/json` (the toolkit's answer to
a toolkit request, else the same objects as one JSON array). Nothing here touches the network
or the model.

Kept columns (--keep-columns, BATCHJOB_KEEP_COLUMNS) come from jsonlines objects as the JSON
values they are, and from CSV columns as strings; missing, they are null. A toolkit request's
inputs are bare texts: there is nothing to keep.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from batchjob.errors import HUGE_NUMBER, InputError
from batchjob.records import Fields, Record, read_records
from batchjob.results import Result

JSONLINES = "application/jsonlines"
JSON = "application/json"
CSV = "text/csv"
_JSONLINES_ALIASES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")
REQUEST_TYPES = {**dict.fromkeys(_JSONLINES_ALIASES, JSONLINES), JSON: JSON, CSV: CSV}
RESPONSE_TYPES = {**dict.fromkeys(_JSONLINES_ALIASES, JSONLINES), JSON: JSON}
# Toolkit parameters that change nothing here: inputs are always truncated to the compiled
# length (a fixed-shape graph can take no more).
_IGNORED_PARAMETERS = ("truncation",)


class RequestError(InputError):
    """A request that can't be answered as a whole; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Toolkit:
    """How the toolkit (transformers' pipeline) shapes the answer to a JSON request."""

    single: bool  # `inputs` was one input, not a list
    pair: bool  # ... and that input was a {"text", "text_pair"} object
    top_k_given: bool  # the pipeline's answer changes shape as soon as top_k is passed
    top_k: int | None  # None: every label


@dataclass(frozen=True, slots=True)
class Parsed:
    records: list[Record]
    toolkit: Toolkit | None = None  # set for application/json requests


def request_type(content_type: str) -> str:
    kind = REQUEST_TYPES.get(content_type.lower())
    if kind is None:
        raise RequestError(
            f"unsupported Content-Type {content_type!r}: send application/jsonlines, "
            "application/json or text/csv",
            status=415,
        )
    return kind


def response_type(accept: str | None, request: str) -> str:
    """The first acceptable type of the Accept header; jsonlines unless JSON was sent."""
    default = JSON if request == JSON else JSONLINES
    if not accept:
        return default
    for part in accept.split(","):
        mime = part.split(";")[0].strip().lower()
        if mime in ("*/*", "application/*", ""):
            return default
        if mime in RESPONSE_TYPES:
            return RESPONSE_TYPES[mime]
    raise RequestError(
        f"unsupported Accept {accept!r}: ask for application/jsonlines or application/json",
        status=406,
    )


def parse(kind: str, body: bytes, text_field: str, task: str, keep: tuple[str, ...] = ()) -> Parsed:
    if kind == JSON:
        return _parse_toolkit(body, task)
    if kind == CSV:
        return Parsed(_parse_csv(body, text_field, keep))
    return Parsed(_parse_jsonlines(body, text_field, keep))


# -- application/jsonlines -------------------------------------------------------------------


def _parse_jsonlines(body: bytes, text_field: str, keep: tuple[str, ...] = ()) -> list[Record]:
    records = []
    for n, raw in enumerate(body.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        if raw.strip():  # blank lines are not records, as in `run`
            record = jsonlines_record(raw, n, text_field, keep)
            records.append(record)
    return records


def _kept(value: object, keep: tuple[str, ...]) -> tuple[Any, ...] | None:
    if not keep:
        return None
    source = value if isinstance(value, dict) else {}
    return tuple(source.get(name) for name in keep)


def _error(n: int, problem: str) -> Record:
    return Record(str(n), None, error=f"line {n}: {problem}")


def jsonlines_record(raw: bytes, n: int, text_field: str, keep: tuple[str, ...] = ()) -> Record:
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        return _error(n, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return _error(n, f"invalid JSON: {e.msg} (col {e.colno})")
    except RecursionError:
        return _error(n, "invalid JSON: nested too deeply")
    except ValueError:
        return _error(n, f"invalid JSON: {HUGE_NUMBER}")
    kept = _kept(value, keep)
    if isinstance(value, dict):
        if text_field not in value:
            return replace(_error(n, f"missing field {text_field!r}"), kept=kept)
        value = value[text_field]
    elif not isinstance(value, str):
        return _error(n, f"expected a JSON object or string, got {value_kind(value)}")
    try:
        text, pair = _input(value, f"field {text_field!r}")
    except RequestError as e:
        return replace(_error(n, str(e)), kept=kept)
    return Record(str(n), text, pair, kept=kept)


def value_kind(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _input(value: object, where: str) -> tuple[str, str | None]:
    """One input: a string, or the pipeline's {"text": ..., "text_pair": ...} for pairs."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        pair = value.get("text_pair")
        if pair is None or isinstance(pair, str):
            return value["text"], pair
        raise RequestError(f"{where}: text_pair must be a string, got {value_kind(pair)}")
    raise RequestError(
        f"{where} must be a string or {{'text', 'text_pair'}}, got {value_kind(value)}"
    )


# -- text/csv ---------------------------------------------------------------------------------


def csv_first_row(body: bytes) -> list[str]:
    """The first non-blank row's fields, to tell a header (lines may end in LF, CRLF or a bare
    CR); [] if it is no CSV row (the rows' own errors come from the reader)."""
    first_line = re.split(rb"[\r\n]+", body.lstrip(b"\r\n"), maxsplit=1)[0]
    try:
        return next(csv.reader([first_line.decode(errors="replace")]), [])
    except csv.Error:  # e.g. a field past csv.field_size_limit()
        return []


def _parse_csv(body: bytes, text_field: str, keep: tuple[str, ...] = ()) -> list[Record]:
    body = body.removeprefix(b"\xef\xbb\xbf")
    first = csv_first_row(body)
    # Without the text field in the first row, every row is one text (no header): prepend
    # one so the `run` reader applies, with its row numbers and per-row errors.
    if text_field not in first:
        body = text_field.encode() + b"\n" + body
    records = []
    chunks = read_records(io.BytesIO(body), "csv", "request", Fields(text_field, keep=keep))
    for chunk in chunks:
        records.extend(chunk)
    return records


# -- application/json (the Hugging Face inference toolkit) ------------------------------------


def toolkit_body(body: bytes) -> dict[str, Any]:
    """A toolkit request's `{"inputs": ..., "parameters": {...}}`, parameters an object."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"invalid JSON body: {e}") from None
    except RecursionError:
        raise RequestError("invalid JSON body: nested too deeply") from None
    except ValueError:
        raise RequestError(f"invalid JSON body: {HUGE_NUMBER}") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise RequestError('expected a JSON object {"inputs": ..., "parameters": {...}}')
    parameters = {} if data.get("parameters") is None else data["parameters"]
    if not isinstance(parameters, dict):
        raise RequestError(f"parameters must be an object, got {value_kind(parameters)}")
    data["parameters"] = parameters
    return data


def _parse_toolkit(body: bytes, task: str) -> Parsed:
    data = toolkit_body(body)
    parameters = data["parameters"]
    top_k = parameters.get("top_k")
    unknown = sorted(set(parameters) - {"top_k", *_IGNORED_PARAMETERS})
    if unknown:
        raise RequestError(f"unsupported parameters: {', '.join(unknown)} (supported: top_k)")
    if "top_k" in parameters:
        if task != "text-classification":
            raise RequestError(f"parameters.top_k applies to text-classification, not {task}")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise RequestError(f"parameters.top_k must be an integer ≥ 1 or null, got {top_k!r}")
    inputs = data["inputs"]
    single = not isinstance(inputs, list)
    values = [inputs] if single else inputs
    records = []
    for i, value in enumerate(values):
        where = "inputs" if single else f"inputs[{i}]"
        text, pair = _input(value, where)
        if pair is not None and task == "token-classification":
            raise RequestError(f"{where}: token-classification takes a string, not a text pair")
        records.append(Record(str(i), text, pair))
    toolkit = Toolkit(single, single and isinstance(inputs, dict), "top_k" in parameters, top_k)
    return Parsed(records, toolkit)


# -- responses --------------------------------------------------------------------------------


def record_object(
    result: Result, keep: Sequence[str] = (), kept: Sequence[Any] | None = None
) -> dict[str, Any]:
    """One record's answer: its kept columns, then the task's columns (as in the Parquet
    output), or its error. With `--long-documents chunk`: `chunks`, one object per window
    (its span, its columns), the kept columns once, at the record's level."""
    out: dict[str, Any] = dict(zip(keep, kept or [None] * len(keep), strict=True))
    if result.chunks:
        chunks = [
            {
                "chunk": span.chunk,
                "char_start": span.char_start,
                "char_end": span.char_end,
                **_plain(values),
            }
            for span, values in result.chunks
        ]
        return {**out, "chunks": chunks, "truncated": False}
    if result.error is not None or result.values is None:
        return {**out, "error": result.error or "no result"}
    return {**out, **_plain(result.values), "truncated": result.truncated}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str) else np.asarray(v).tolist() for k, v in values.items()}


def _toolkit_answer(
    results: Sequence[Result], toolkit: Toolkit, task: str, labels: Sequence[str]
) -> Any:
    per_input: list[Any] = []
    for result in results:
        if result.chunks:  # --long-documents chunk: the answer of each window, in order
            windows = [Result(values) for _, values in result.chunks]
            each = Toolkit(False, False, toolkit.top_k_given, toolkit.top_k)
            per_input.append(_toolkit_answer(windows, each, task, labels))
            continue
        values = result.values or {}
        if task == "token-classification":  # the pipeline's entity dicts, as they are
            per_input.append(values.get("entities", []))
        elif task != "text-classification":
            per_input.append(np.asarray(values["embedding"]).tolist())
        elif not toolkit.top_k_given:
            per_input.append({"label": values["label"], "score": float(values["score"])})
        else:
            scores = np.asarray(values["scores"]).tolist()
            # A stable sort, as the pipeline's: equal scores keep label order.
            order = sorted(range(len(scores)), key=lambda i: -scores[i])
            k = len(scores) if toolkit.top_k is None else toolkit.top_k
            per_input.append([{"label": labels[i], "score": scores[i]} for i in order[:k]])
    if not toolkit.single:
        return per_input
    # The pipeline wraps a single string's answer in a list unless top_k was passed (which
    # already gives a list); a single text pair's answer stays a bare object.
    if task == "text-classification" and (toolkit.top_k_given or toolkit.pair):
        return per_input[0]
    if task == "token-classification":  # a string's entities: one list, not wrapped
        return per_input[0]
    return per_input


def encode(
    kind: str,
    parsed: Parsed,
    results: Sequence[Result],
    task: str,
    labels: Sequence[str],
    keep: Sequence[str] = (),
) -> bytes:
    """The response body. JSON Lines without a final newline: with AssembleWith=Line,
    SageMaker adds one after every response."""
    if kind == JSON and parsed.toolkit is not None:
        answer = _toolkit_answer(results, parsed.toolkit, task, labels)
        return json.dumps(answer, ensure_ascii=False).encode()
    kept = [record.kept for record in parsed.records]
    objects = [record_object(r, keep, k) for r, k in zip(results, kept, strict=True)]
    if kind == JSON:
        return json.dumps(objects, ensure_ascii=False).encode()
    return "\n".join(json.dumps(o, ensure_ascii=False) for o in objects).encode()

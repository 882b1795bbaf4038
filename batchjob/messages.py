"""What an SQS message asks the worker to do: pure parsing, no I/O.

Three kinds of body, told apart by their fields:

- an S3 event notification (`{"Records": [{"s3": {"bucket": {"name"}, "object": {"key"}}}]}`),
  also wrapped in an SNS notification (`{"Type": "Notification", "Message": "<the event>"}`).
  Keys arrive URL-encoded with `+` for a space (`unquote_plus`). The `s3:TestEvent` S3 sends
  when notifications are configured, and events other than ObjectCreated, ask for nothing;
- a job: `{"input": "s3://b/key-or-prefix", "output": "s3://b/prefix/"}` (output optional);
- inline documents: `{"id": "...", "documents": [{"id": ..., "text": ...}, ...]}`;
- a submitted job's shards (`batchjob submit`): `{"job_id": "...", "input": "s3://b/p/",
  "shards": ["s3://b/p/a.jsonl", ...], "output": "s3://o/"}`: each shard lies under `input`
  and is named by its path below it, as `batchjob run --input s3://b/p/` names it, so both
  write the same output keys. At most MAX_SHARDS_PER_MESSAGE shards.

A job, shards or inline message may also set how its texts are run, instead of the worker's flags:
`"long_documents"` (truncate, chunk, mean), `"chunk_overlap"` (tokens), and `"prompt"` or
`"prompt_name"` (either replaces the worker's prompt). Their types are checked here; their
values against the model, by the executor.

Job, shards and inline messages may also carry `"keep_columns": ["url", "lang"]` (or
`"url,lang"`): the input columns copied into their outputs, instead of the worker's
--keep-columns.
"""

from __future__ import annotations

import json
import re
from dataclasses import KW_ONLY, dataclass
from typing import Any
from urllib.parse import unquote_plus

from batchjob.config import LONG_DOCUMENTS
from batchjob.errors import HUGE_NUMBER, InputError, UsageError
from batchjob.job_specs import MAX_SHARDS_PER_MESSAGE
from batchjob.output_format import parse_keep_columns
from batchjob.s3 import SCHEME, S3Url, is_s3

# An inline message's id names its output file: one path component, no surprises.
_INLINE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,254}")


class MessageError(InputError):
    """A body the worker can't act on: the message fails (and reaches the DLQ in time)."""


@dataclass(frozen=True, slots=True)
class ObjectWork:
    """One S3 object: its results go to `<output>/<key without extension>.parquet`."""

    url: S3Url


@dataclass(frozen=True, slots=True)
class TextRequest:
    """What a message asks of how its texts are run (None: the worker's flag)."""

    long_documents: str | None = None
    chunk_overlap: int | None = None
    prompt: str | None = None
    prompt_name: str | None = None


@dataclass(frozen=True, slots=True)
class JobWork:
    """A job message's input, an object or a prefix (which, only S3 can tell)."""

    input: str
    output: str | None = None
    _: KW_ONLY  # what a message asks beside its input: by name, never by position
    text: TextRequest = TextRequest()
    keep_columns: tuple[str, ...] | None = None  # None: the worker's --keep-columns


@dataclass(frozen=True, slots=True)
class InlineWork:
    """Documents in the message itself: results go to `<output>/inline/<id>.parquet`."""

    id: str
    documents: list[Any]
    _: KW_ONLY
    text: TextRequest = TextRequest()
    keep_columns: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ShardsWork:
    """Shards a submitted job sends by name: `shards` are (URI, path below `input`) pairs."""

    job_id: str
    input: str
    shards: tuple[tuple[str, str], ...]
    output: str
    _: KW_ONLY
    text: TextRequest = TextRequest()
    keep_columns: tuple[str, ...] | None = None


Work = ObjectWork | JobWork | InlineWork | ShardsWork


def parse_message(body: str, message_id: str) -> list[Work]:
    """The work a message body asks for: [] for a message that asks for nothing (the S3
    test event, an event that is not an object's creation). MessageError names the problem."""
    value = _json(body, "message body")
    if isinstance(value, dict) and value.get("Type") == "Notification" and "Message" in value:
        if not isinstance(value["Message"], str):
            raise MessageError("SNS notification: its Message is not a string")
        value = _json(value["Message"], "SNS notification's Message")
    if not isinstance(value, dict):
        raise MessageError(f"message body: expected a JSON object, got {type(value).__name__}")
    if value.get("Event") == "s3:TestEvent":
        return []
    if "Records" in value:
        return _s3_event(value["Records"])
    if "documents" in value:
        return [_inline(value, message_id)]
    if "shards" in value:
        return [_shards(value)]
    if "input" in value:
        return [_job(value)]
    fields = ", ".join(sorted(map(str, value))[:8]) or "none"
    raise MessageError(
        "message body: not an S3 event (Records), a job (input), inline documents "
        f"(documents) nor a job's shards (shards); its fields: {fields}"
    )


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} col {e.colno}"
        raise MessageError(f"{what}: not valid JSON: {e.msg} at {where}") from None
    except RecursionError:
        raise MessageError(f"{what}: not valid JSON: nested too deeply") from None
    except ValueError:
        raise MessageError(f"{what}: not valid JSON: {HUGE_NUMBER}") from None


def _s3_event(records: Any) -> list[Work]:
    if not isinstance(records, list):
        raise MessageError("S3 event: Records is not a list")
    work: list[Work] = []
    for n, record in enumerate(records):
        where = f"S3 event: Records[{n}]"
        if not isinstance(record, dict) or not isinstance(record.get("s3"), dict):
            raise MessageError(f"{where}: no s3 section")
        event = record.get("eventName", "")
        if isinstance(event, str) and event and not event.startswith("ObjectCreated"):
            continue  # a deletion, a restore, ...: nothing to compute
        bucket = _field(record["s3"], "bucket", "name")
        key = _field(record["s3"], "object", "key")
        if not isinstance(bucket, str) or not bucket:
            raise MessageError(f"{where}: no s3.bucket.name")
        if not isinstance(key, str) or not key:
            raise MessageError(f"{where}: no s3.object.key")
        if key.endswith("/"):
            continue  # a "folder" marker: nothing to read
        work.append(ObjectWork(S3Url(bucket, unquote_plus(key))))
    return work


def _field(section: dict[str, Any], name: str, inner: str) -> Any:
    value = section.get(name)
    return value.get(inner) if isinstance(value, dict) else None


def _s3_uri(value: Any, field: str, where: str = "job message") -> str:
    if not (isinstance(value, str) and is_s3(value) and value[len(SCHEME) :].split("/")[0]):
        raise MessageError(f"{where}: {field} must be an s3:// URI, got {value!r}")
    return value


def _keep_columns(value: dict[str, Any], what: str) -> tuple[str, ...] | None:
    if value.get("keep_columns") is None:
        return None
    try:
        return parse_keep_columns(value["keep_columns"], f"{what}: keep_columns")
    except UsageError as e:
        raise MessageError(str(e)) from None


def _job(value: dict[str, Any]) -> JobWork:
    output = value.get("output")
    return JobWork(
        _s3_uri(value["input"], "input"),
        None if output is None else _s3_uri(output, "output"),
        text=_text_request(value, "job message"),
        keep_columns=_keep_columns(value, "job message"),
    )


def _shards(value: dict[str, Any]) -> ShardsWork:
    where = "shards message"
    job_id = value.get("job_id")
    if not isinstance(job_id, str) or not _INLINE_ID.fullmatch(job_id):
        raise MessageError(
            f"{where}: job_id {job_id!r} must be letters, digits and ._=- (it names a directory)"
        )
    root = _s3_uri(value.get("input"), "input", where)
    if not root.endswith("/"):
        raise MessageError(f"{where}: input must be a prefix ending in /, got {root!r}")
    output = _s3_uri(value.get("output"), "output", where)
    shards = value["shards"]
    if not isinstance(shards, list) or not shards:
        raise MessageError(f"{where}: shards must be a non-empty list of s3:// URIs")
    if len(shards) > MAX_SHARDS_PER_MESSAGE:
        raise MessageError(
            f"{where}: {len(shards)} shards, more than the {MAX_SHARDS_PER_MESSAGE} a message "
            "may name"
        )
    pairs = []
    for n, uri in enumerate(shards):
        _s3_uri(uri, f"shards[{n}]", where)
        rel = uri[len(root) :]
        if not uri.startswith(root) or not rel or rel.endswith("/"):
            raise MessageError(f"{where}: shards[{n}] {uri} is not an object under input {root}")
        pairs.append((uri, rel))
    if len({uri for uri, _ in pairs}) < len(pairs):
        raise MessageError(f"{where}: a shard is named twice")
    return ShardsWork(
        job_id,
        root,
        tuple(pairs),
        output,
        text=_text_request(value, where),
        keep_columns=_keep_columns(value, where),
    )


def _text_request(value: dict[str, Any], where: str) -> TextRequest:
    mode = value.get("long_documents")
    if mode is not None and mode not in LONG_DOCUMENTS:
        choices = ", ".join(LONG_DOCUMENTS)
        raise MessageError(f"{where}: long_documents must be one of {choices}, got {mode!r}")
    overlap = value.get("chunk_overlap")
    if overlap is not None and (type(overlap) is not int or overlap < 0):
        raise MessageError(f"{where}: chunk_overlap must be an integer ≥ 0, got {overlap!r}")
    prompt, name = value.get("prompt"), value.get("prompt_name")
    if prompt is not None and not isinstance(prompt, str):
        raise MessageError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
    if name is not None and not (isinstance(name, str) and name):
        raise MessageError(f"{where}: prompt_name must be a non-empty string, got {name!r}")
    if prompt is not None and name is not None:
        raise MessageError(f"{where}: prompt and prompt_name exclude each other")
    return TextRequest(mode, overlap, prompt, name)


def _inline(value: dict[str, Any], message_id: str) -> InlineWork:
    documents = value["documents"]
    if not isinstance(documents, list):
        kind = type(documents).__name__
        raise MessageError(f"inline message: documents must be a list, got {kind}")
    inline_id = value.get("id", message_id)
    if not isinstance(inline_id, str) or not _INLINE_ID.fullmatch(inline_id):
        raise MessageError(
            f"inline message: id {inline_id!r} must be letters, digits and ._=- "
            "(it names the output file)"
        )
    return InlineWork(
        inline_id,
        documents,
        text=_text_request(value, "inline message"),
        keep_columns=_keep_columns(value, "inline message"),
    )

"""`POST /invocations` for zero-shot-classification and text-ranking (`pair_tasks.py`): the
Hugging Face inference toolkits' request and answer shapes, and JSON Lines / CSV as for the
other tasks.

zero-shot-classification (HF_TASK=zero-shot-classification), the pipeline's:
    {"inputs": "text" | ["text", ...], "parameters": {"candidate_labels": ["a", "b"] | "a,b",
     "multi_label": false, "hypothesis_template": "This example is {}."}}
    → {"sequence", "labels", "scores"} for one text, a list of them for a list. Parameters
    not given are the server's (--candidate-labels, --multi-label, --hypothesis-template).
    JSON Lines / CSV: a record's own labels in --candidate-labels-field (else the server's);
    each answer line holds `labels` and `scores`.

text-ranking (HF_TASK=text-ranking or sentence-ranking), the toolkit's SentenceRanking:
    {"inputs": [["query", "passage"], ...]} (or {"text", "text_pair"} objects) → {"scores": [...]}
    {"inputs": ["query", "passage"]} (one pair) → {"scores": 0.97}
    {"inputs": {"query": "q", "texts": ["p1", "p2"]}, "parameters": {"return_documents": true}}
    → [{"index": 1, "score": 0.97, "text": "p2"}, ...], best first (CrossEncoder.rank's)
    JSON Lines: the text field holds {"text": query, "text_pair": passage}, as for any text
    pair; each answer line holds `score`, and `rank` within the request's groups
    (--group-field, read from each line's object).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from batchjob.errors import InputError, UsageError
from batchjob.pair_tasks import (
    Ranking,
    ZeroShot,
    assign_ranks,
    candidate_labels_of,
    check_template,
    group_text,
)
from batchjob.records import Fields, Record, read_records
from batchjob.results import Result
from batchjob.serve_formats import (
    CSV,
    JSON,
    Parsed,
    RequestError,
    Toolkit,
    csv_first_row,
    jsonlines_record,
    record_object,
    toolkit_body,
    value_kind,
)


@dataclass(frozen=True, slots=True)
class PairRequest(Parsed):
    """A parsed request of a pair task; `zero_shot`: the head a toolkit request's parameters
    make (None: the server's)."""

    zero_shot: ZeroShot | None = None
    shape: str = "records"  # ranking toolkit answers: "pairs", "pair" or "query"
    return_documents: bool = False
    groups: tuple[str | None, ...] = ()  # jsonlines/csv ranking: each record's group


def parse_pairs(
    kind: str, body: bytes, text_field: str, head: ZeroShot | Ranking, keep: tuple[str, ...] = ()
) -> PairRequest:
    if kind == JSON:
        data = toolkit_body(body)
        if isinstance(head, ZeroShot):
            return _zero_shot_request(data, head)
        return _ranking_request(data)
    labels_field = head.labels_field if isinstance(head, ZeroShot) else None
    group_field = head.group_field if isinstance(head, Ranking) else None
    if kind == CSV:
        records = _csv_records(body, text_field, keep, labels_field, group_field)
    else:
        records = _jsonlines_records(body, text_field, keep, labels_field, group_field)
    return PairRequest(records, groups=tuple(r.group for r in records))


# -- JSON Lines and CSV -----------------------------------------------------------------------


def _jsonlines_records(
    body: bytes,
    text_field: str,
    keep: tuple[str, ...],
    labels_field: str | None,
    group_field: str | None,
) -> list[Record]:
    records = []
    for n, raw in enumerate(body.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        if not raw.strip():
            continue
        record = jsonlines_record(raw, n, text_field, keep)
        if record.error is None and (labels_field or group_field):
            value = json.loads(raw)  # parsed once already: valid
            if isinstance(value, dict):
                record = _with_fields(record, value, labels_field, group_field, f"line {n}")
        records.append(record)
    return records


def _with_fields(
    record: Record,
    values: dict[str, Any],
    labels_field: str | None,
    group_field: str | None,
    where: str,
) -> Record:
    group = None if group_field is None else group_text(values.get(group_field))
    if labels_field is None or labels_field not in values:  # none: the server's labels
        return replace(record, group=group)
    try:
        labels = candidate_labels_of(values, labels_field)
    except InputError as e:
        return Record(record.id, None, error=f"{where}: {e}", kept=record.kept)
    return replace(record, candidate_labels=labels, group=group)


def _csv_records(
    body: bytes,
    text_field: str,
    keep: tuple[str, ...],
    labels_field: str | None,
    group_field: str | None,
) -> list[Record]:
    body = body.removeprefix(b"\xef\xbb\xbf")
    first = csv_first_row(body)
    if text_field not in first:  # one text per row, no header (SplitType=Line)
        body = text_field.encode() + b"\n" + body
        labels_field = group_field = None
    fields = Fields(text_field, keep=keep, candidate_labels=None, group=group_field)
    if labels_field is not None and labels_field in first:
        fields = replace(fields, candidate_labels=labels_field)
    records: list[Record] = []
    for chunk in read_records(io.BytesIO(body), "csv", "request", fields):
        records.extend(chunk)
    return records


# -- the toolkits' JSON -----------------------------------------------------------------------


def _unknown(parameters: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(parameters) - {*known, "truncation"})
    if unknown:
        raise RequestError(
            f"unsupported parameters: {', '.join(unknown)} (supported: {', '.join(known)})"
        )


def _zero_shot_request(data: dict[str, Any], head: ZeroShot) -> PairRequest:
    parameters = data["parameters"]
    _unknown(parameters, ("candidate_labels", "multi_label", "hypothesis_template"))
    labels = head.candidate_labels
    if parameters.get("candidate_labels") is not None:
        labels = _request_labels(parameters["candidate_labels"])
    if not labels:
        raise RequestError("parameters.candidate_labels is required (the server has none)")
    multi = parameters.get("multi_label", head.multi_label)
    if not isinstance(multi, bool):
        raise RequestError(f"parameters.multi_label must be true or false, got {multi!r}")
    template = parameters.get("hypothesis_template", head.hypothesis_template)
    if not isinstance(template, str):
        raise RequestError(f"parameters.hypothesis_template must be a string, got {template!r}")
    try:
        check_template(template, "parameters.hypothesis_template")
    except UsageError as e:
        raise RequestError(str(e)) from None
    request_head = replace(
        head, multi_label=multi, candidate_labels=labels, hypothesis_template=template
    )
    inputs = data["inputs"]
    single = isinstance(inputs, str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("inputs must be a string or a non-empty list of strings")
    records = [Record(str(i), text) for i, text in enumerate(texts)]
    return PairRequest(records, Toolkit(single, False, False, None), zero_shot=request_head)


def _request_labels(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        labels = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        labels = list(value)
    else:
        raise RequestError(
            f"parameters.candidate_labels must be a list of strings, got {value_kind(value)}"
        )
    if not labels:
        raise RequestError("parameters.candidate_labels holds no labels")
    return tuple(labels)


def _ranking_request(data: dict[str, Any]) -> PairRequest:
    parameters = data["parameters"]
    _unknown(parameters, ("return_documents",))
    documents = parameters.get("return_documents", False)
    if not isinstance(documents, bool):
        raise RequestError(f"parameters.return_documents must be true or false, got {documents!r}")
    inputs = data["inputs"]
    toolkit = Toolkit(False, False, False, None)
    if isinstance(inputs, dict) and "query" in inputs:
        query, texts = inputs.get("query"), inputs.get("texts")
        if not isinstance(query, str):
            raise RequestError(f"inputs.query must be a string, got {value_kind(query)}")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not texts:
            raise RequestError("inputs.texts must be a non-empty list of strings")
        records = [Record(str(i), query, text) for i, text in enumerate(texts)]
        return PairRequest(records, toolkit, shape="query", return_documents=documents)
    if documents:
        raise RequestError('parameters.return_documents goes with {"query", "texts"} inputs')
    if _is_pair(inputs):
        return PairRequest([Record("0", *_pair(inputs, "inputs"))], toolkit, shape="pair")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError('inputs must be [query, passage], a list of them, or {"query", "texts"}')
    records = [Record(str(i), *_pair(value, f"inputs[{i}]")) for i, value in enumerate(inputs)]
    return PairRequest(records, toolkit, shape="pairs")


def _is_pair(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _pair(value: object, where: str) -> tuple[str, str]:
    if _is_pair(value):
        assert isinstance(value, list)
        return value[0], value[1]
    if isinstance(value, dict):
        text, pair = value.get("text"), value.get("text_pair")
        if isinstance(text, str) and isinstance(pair, str):
            return text, pair
    raise RequestError(
        f'{where} must be [query, passage] or {{"text", "text_pair"}}, got {value_kind(value)}'
    )


# -- answers ----------------------------------------------------------------------------------


def encode_pairs(
    kind: str,
    parsed: PairRequest,
    results: Sequence[Result],
    keep: Sequence[str] = (),
) -> bytes:
    """The response body (JSON Lines without a final newline, as serve_formats.encode)."""
    if kind == JSON and parsed.toolkit is not None:
        answer = _toolkit_answer(parsed, results)
        return json.dumps(answer, ensure_ascii=False).encode()
    if parsed.groups and any(g is not None for g in parsed.groups):
        assign_ranks([r.values for r in results], parsed.groups)
    kept = [record.kept for record in parsed.records]
    objects = [record_object(r, keep, k) for r, k in zip(results, kept, strict=True)]
    if kind == JSON:
        return json.dumps(objects, ensure_ascii=False).encode()
    return "\n".join(json.dumps(o, ensure_ascii=False) for o in objects).encode()


def _toolkit_answer(parsed: PairRequest, results: Sequence[Result]) -> Any:
    for result in results:  # the toolkit answers a request whole, or not at all
        if result.error is not None or result.values is None:
            raise RequestError(result.error or "no result")
    values = [r.values or {} for r in results]
    if parsed.zero_shot is not None:
        answers = [
            {
                "sequence": record.text,
                "labels": list(v["labels"]),
                "scores": np.asarray(v["scores"]).tolist(),
            }
            for record, v in zip(parsed.records, values, strict=True)
        ]
        assert parsed.toolkit is not None
        return answers[0] if parsed.toolkit.single else answers
    scores = [float(v["score"]) for v in values]
    if parsed.shape == "pair":
        return {"scores": scores[0]}
    if parsed.shape == "pairs":
        return {"scores": scores}
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties by index
    ranked: list[dict[str, Any]] = []
    for i in order:
        item: dict[str, Any] = {"index": i, "score": scores[i]}
        if parsed.return_documents:
            item["text"] = parsed.records[i].text_pair
        ranked.append(item)
    return ranked

"""`POST /invocations` bodies → records and results → bodies, without a server or a model:
each content type, each Accept, the toolkit's answer shapes, and the errors' statuses."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from batchjob.engine import Result
from batchjob.records import Record
from batchjob.serve_formats import (
    CSV,
    JSON,
    JSONLINES,
    RequestError,
    encode,
    parse,
    request_type,
    response_type,
)

LABELS = ("negative", "positive")
CLS = "text-classification"


def classified(*scores: tuple[float, float]) -> list[Result]:
    return [
        Result(
            {
                "label": LABELS[int(np.argmax(s))],
                "score": np.float32(max(s)),
                "scores": np.array(s, np.float32),
            }
        )
        for s in scores
    ]


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/jsonlines", JSONLINES),
        ("application/x-jsonlines", JSONLINES),
        ("Application/JSONLines", JSONLINES),
        ("application/json", JSON),
        ("text/csv", CSV),
    ],
)
def test_request_types(content_type: str, kind: str) -> None:
    assert request_type(content_type) == kind


def test_unknown_request_type_is_415() -> None:
    with pytest.raises(RequestError, match="unsupported Content-Type 'text/plain'") as info:
        request_type("text/plain")
    assert info.value.status == 415


@pytest.mark.parametrize(
    ("accept", "sent", "answer"),
    [
        (None, JSONLINES, JSONLINES),
        (None, JSON, JSON),
        ("*/*", CSV, JSONLINES),
        ("text/html;q=0.9, application/json", JSONLINES, JSON),
        ("application/x-jsonlines", JSON, JSONLINES),
    ],
)
def test_response_types(accept: str | None, sent: str, answer: str) -> None:
    assert response_type(accept, sent) == answer


def test_unacceptable_accept_is_406() -> None:
    with pytest.raises(RequestError) as info:
        response_type("text/csv", JSONLINES)
    assert info.value.status == 406


def test_jsonlines_records_and_per_line_errors() -> None:
    body = (
        b'\xef\xbb\xbf{"inputs": "first"}\n'
        b'"a bare string"\n'
        b"\n"
        b'{"inputs": {"text": "q", "text_pair": "p"}}\n'
        b"not json\n"
        b'{"other": 1}\n'
        b"[1, 2]\n"
        b'{"inputs": "caf\xe9"}\n'
        b'{"inputs": ' + b"9" * 5000 + b"}\n"
        b'{"inputs": "lone \\udc00"}\n'
    )
    records = parse(JSONLINES, body, "inputs", CLS).records
    assert records[:3] == [
        Record("1", "first"),
        Record("2", "a bare string"),
        Record("4", "q", "p"),
    ]
    errors = [r.error for r in records[3:]]
    assert errors == [
        "line 5: invalid JSON: Expecting value (col 1)",
        "line 6: missing field 'inputs'",
        "line 7: expected a JSON object or string, got array",
        "line 8: invalid UTF-8 (byte 0xe9 at offset 15)",
        "line 9: invalid JSON: a number of more than 4300 digits",
        "text holds a lone UTF-16 surrogate U+DC00 at character 5: not valid Unicode",
    ]
    assert records[-1].id == "10"


def test_csv_with_and_without_a_header() -> None:
    with_header = parse(CSV, b'inputs,other\nhello,1\n"a, b",2\n', "inputs", CLS).records
    assert [r.text for r in with_header] == ["hello", "a, b"]
    without = parse(CSV, b"hello\nworld\n", "inputs", CLS).records
    assert [r.text for r in without] == ["hello", "world"]
    broken = parse(CSV, b'inputs\n"unclosed\n', "inputs", CLS).records
    assert broken[0].error is not None
    # Lines ending in a bare CR (classic Mac), with and without a header.
    assert [r.text for r in parse(CSV, b"inputs\rhello\rworld\r", "inputs", CLS).records] == [
        "hello",
        "world",
    ]
    assert [r.text for r in parse(CSV, b"hello\rworld", "inputs", CLS).records] == [
        "hello",
        "world",
    ]
    # A long document in a CSV field (past the csv module's default limit, 128 KiB).
    [long] = parse(CSV, b"inputs\n" + b"x" * 200_000 + b"\n", "inputs", CLS).records
    assert long.text == "x" * 200_000


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "invalid JSON body"),
        (b'{"text": "x"}', 'expected a JSON object {"inputs"'),
        (b'{"inputs": "x", "parameters": 3}', "parameters must be an object"),
        (b'{"inputs": "x", "parameters": {"max_length": 4}}', "unsupported parameters: max_length"),
        (b'{"inputs": "x", "parameters": {"top_k": 0}}', "top_k must be an integer ≥ 1"),
        (b'{"inputs": 7}', "inputs must be a string"),
        (b'{"inputs": ' + b"9" * 5000 + b"}", "invalid JSON body: a number of more than 4300"),
        (b'{"inputs": "x", "parameters": []}', "parameters must be an object, got array"),
        (b'{"inputs": "x", "parameters": false}', "parameters must be an object, got boolean"),
        (b'{"inputs": "x", "parameters": {"top_k": true}}', "top_k must be an integer ≥ 1"),
    ],
)
def test_malformed_toolkit_requests_are_400(body: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message) as info:
        parse(JSON, body, "inputs", CLS)
    assert info.value.status == 400


def test_top_k_is_for_classification_only() -> None:
    with pytest.raises(RequestError, match="top_k applies to text-classification"):
        parse(JSON, b'{"inputs": "x", "parameters": {"top_k": 1}}', "inputs", "feature-extraction")


def answer(body: dict[str, Any], results: list[Result], task: str = CLS) -> Any:
    parsed = parse(JSON, json.dumps(body).encode(), "inputs", task)
    assert len(parsed.records) == len(results)
    return json.loads(encode(JSON, parsed, results, task, LABELS))


def test_toolkit_answers_have_the_pipelines_shapes() -> None:
    one = classified((0.2, 0.8))
    assert answer({"inputs": "x"}, one) == [{"label": "positive", "score": pytest.approx(0.8)}]
    two = classified((0.2, 0.8), (0.9, 0.1))
    assert [a["label"] for a in answer({"inputs": ["x", "y"]}, two)] == ["positive", "negative"]
    # top_k changes the shape: a list of the k best per input, best first.
    got = answer({"inputs": "x", "parameters": {"top_k": None}}, one)
    assert [a["label"] for a in got] == ["positive", "negative"]
    got = answer({"inputs": ["x", "y"], "parameters": {"top_k": 1}}, two)
    assert [[a["label"] for a in per] for per in got] == [["positive"], ["negative"]]
    # A single pair's answer is a bare object.
    pair = answer({"inputs": {"text": "q", "text_pair": "p"}}, one)
    assert pair == {"label": "positive", "score": pytest.approx(0.8)}


def test_feature_extraction_answers_vectors() -> None:
    vector = np.array([0.6, 0.8], np.float32)
    got = answer({"inputs": ["x"]}, [Result({"embedding": vector})], "feature-extraction")
    assert got == [pytest.approx([0.6, 0.8])]


def test_jsonlines_answers_one_object_a_line_errors_in_place() -> None:
    parsed = parse(JSONLINES, b'{"inputs": "x"}\nbad\n', "inputs", CLS)
    results = [*classified((0.2, 0.8)), Result(None, error=parsed.records[1].error)]
    body = encode(JSONLINES, parsed, results, CLS, LABELS)
    assert not body.endswith(b"\n")  # SageMaker's AssembleWith=Line adds one
    first, second = (json.loads(line) for line in body.split(b"\n"))
    assert first["label"] == "positive"
    assert first["truncated"] is False
    assert second == {"error": "line 2: invalid JSON: Expecting value (col 1)"}
    as_array = json.loads(encode(JSON, parsed, results, CLS, LABELS))
    assert [list(o) for o in as_array] == [list(first), ["error"]]

"""Message bodies → work: S3 events (also wrapped by SNS), jobs, inline documents, and the
errors that name what is wrong with a body."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from batchjob.messages import (
    InlineWork,
    JobWork,
    MessageError,
    ObjectWork,
    ShardsWork,
    TextRequest,
    parse_message,
)
from batchjob.s3 import S3Url


def s3_event(*keys: str, event: str = "ObjectCreated:Put", bucket: str = "bkt") -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": event,
                "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}},
            }
            for key in keys
        ]
    }


def parse(body: Any, message_id: str = "m-1") -> list[Any]:
    return parse_message(body if isinstance(body, str) else json.dumps(body), message_id)


def test_s3_event_keys_are_url_decoded_with_plus_for_space() -> None:
    # S3 encodes "dir/a b+c.jsonl" as "dir/a+b%2Bc.jsonl" (quote_plus).
    work = parse(s3_event("dir/a+b%2Bc.jsonl", "x%C3%A9.csv.gz"))
    assert work == [
        ObjectWork(S3Url("bkt", "dir/a b+c.jsonl")),
        ObjectWork(S3Url("bkt", "xé.csv.gz")),
    ]


def test_s3_event_wrapped_in_sns() -> None:
    body = {"Type": "Notification", "TopicArn": "arn:t", "Message": json.dumps(s3_event("k.txt"))}
    assert parse(body) == [ObjectWork(S3Url("bkt", "k.txt"))]


def test_test_event_and_other_event_kinds_ask_for_nothing() -> None:
    assert parse({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt"}) == []
    sns = {"Type": "Notification", "Message": json.dumps({"Event": "s3:TestEvent"})}
    assert parse(sns) == []
    assert parse(s3_event("gone.jsonl", event="ObjectRemoved:Delete")) == []


def test_job_messages() -> None:
    assert parse({"input": "s3://b/in/"}) == [JobWork("s3://b/in/")]
    assert parse({"input": "s3://b/a.jsonl", "output": "s3://o/p/"}) == [
        JobWork("s3://b/a.jsonl", "s3://o/p/")
    ]


def test_job_and_inline_messages_may_set_long_documents_and_the_prompt() -> None:
    text = {"long_documents": "chunk", "chunk_overlap": 16, "prompt_name": "query"}
    assert parse({"input": "s3://b/in/", **text}) == [
        JobWork("s3://b/in/", text=TextRequest("chunk", 16, None, "query"))
    ]
    assert parse({"id": "x", "documents": [], "prompt": "q: ", "long_documents": "mean"}) == [
        InlineWork("x", [], text=TextRequest("mean", None, "q: ", None))
    ]


def test_inline_documents_take_their_id_or_the_message_id() -> None:
    docs = [{"id": 1, "text": "a"}, "bad"]
    assert parse({"id": "batch-1", "documents": docs}) == [InlineWork("batch-1", docs)]
    assert parse({"documents": []}, message_id="0f9e-77") == [InlineWork("0f9e-77", [])]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("not json", "message body: not valid JSON: Expecting value at line 1 col 1"),
        ("[1, 2]", "message body: expected a JSON object, got list"),
        ('{"input": ' + "9" * 5000 + "}", "message body: not valid JSON: a number of more than"),
        (
            {"hello": 1},
            "not an S3 event (Records), a job (input), inline documents (documents) nor a "
            "job's shards (shards)",
        ),
        ({"Type": "Notification", "Message": "{oops"}, "SNS notification's Message: not valid"),
        ({"Records": "x"}, "S3 event: Records is not a list"),
        ({"Records": [{"s3": {"object": {"key": "k"}}}]}, "Records[0]: no s3.bucket.name"),
        ({"Records": [{"s3": {"bucket": {"name": "b"}}}]}, "Records[0]: no s3.object.key"),
        ({"Records": [{"eventName": "ObjectCreated:Put"}]}, "Records[0]: no s3 section"),
        ({"input": "/etc/passwd"}, "job message: input must be an s3:// URI, got '/etc/passwd'"),
        ({"input": "s3://"}, "job message: input must be an s3:// URI"),
        ({"input": "s3://b/k", "output": 3}, "job message: output must be an s3:// URI, got 3"),
        ({"documents": {"text": "x"}}, "inline message: documents must be a list, got dict"),
        ({"id": "../up", "documents": []}, "inline message: id '../up' must be letters"),
        ({"id": 7, "documents": []}, "inline message: id 7 must be letters"),
        (
            {"input": "s3://b/k", "long_documents": "split"},
            "job message: long_documents must be one of truncate, chunk, mean, got 'split'",
        ),
        (
            {"documents": [], "chunk_overlap": True},
            "inline message: chunk_overlap must be an integer ≥ 0, got True",
        ),
        ({"input": "s3://b/k", "chunk_overlap": -1}, "chunk_overlap must be an integer ≥ 0"),
        ({"input": "s3://b/k", "prompt": 3}, "job message: prompt must be a string, got int"),
        ({"input": "s3://b/k", "prompt_name": ""}, "prompt_name must be a non-empty string"),
        (
            {"input": "s3://b/k", "prompt": "q: ", "prompt_name": "query"},
            "job message: prompt and prompt_name exclude each other",
        ),
    ],
)
def test_bad_bodies_are_message_errors_naming_the_problem(body: Any, error: str) -> None:
    with pytest.raises(MessageError, match=re.escape(error)):
        parse(body)


def shards_body(*shards: object, **fields: object) -> dict[str, Any]:
    body: dict[str, Any] = {"job_id": "job-1", "input": "s3://b/in/", "output": "s3://o/out/"}
    return {**body, "shards": list(shards), **fields}


def test_shards_messages_name_each_shard_below_the_input() -> None:
    body = shards_body("s3://b/in/a.jsonl", "s3://b/in/sub/b.csv.gz", keep_columns="url")
    assert parse(body) == [
        ShardsWork(
            "job-1",
            "s3://b/in/",
            (("s3://b/in/a.jsonl", "a.jsonl"), ("s3://b/in/sub/b.csv.gz", "sub/b.csv.gz")),
            "s3://o/out/",
            keep_columns=("url",),
        )
    ]
    # The bucket's root as the input: a shard is named by its whole key.
    assert parse(shards_body("s3://b/k.txt", input="s3://b/"))[0].shards == (
        ("s3://b/k.txt", "k.txt"),
    )


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (shards_body(), "shards message: shards must be a non-empty list of s3:// URIs"),
        ({**shards_body(), "shards": "s3://b/in/a.jsonl"}, "shards must be a non-empty list"),
        (shards_body("/etc/passwd"), "shards message: shards[0] must be an s3:// URI, got '/etc"),
        (shards_body("s3://b/in/a", 7), "shards message: shards[1] must be an s3:// URI, got 7"),
        (
            shards_body("s3://b/other/a.jsonl"),
            "shards message: shards[0] s3://b/other/a.jsonl is not an object under input s3://b/in/",
        ),
        (shards_body("s3://c/in/a.jsonl"), "shards[0] s3://c/in/a.jsonl is not an object under"),
        (shards_body("s3://b/in/"), "shards[0] s3://b/in/ is not an object under input"),
        (shards_body("s3://b/in/d/"), "shards[0] s3://b/in/d/ is not an object under input"),
        (shards_body("s3://b/in/a", "s3://b/in/a"), "shards message: a shard is named twice"),
        (
            shards_body(*(f"s3://b/in/{i}.jsonl" for i in range(101))),
            "shards message: 101 shards, more than the 100 a message may name",
        ),
        (shards_body("s3://b/in/a", input="s3://b/in"), "input must be a prefix ending in /"),
        (shards_body("s3://b/in/a", input=None), "shards message: input must be an s3:// URI"),
        (shards_body("s3://b/in/a", output="out/"), "shards message: output must be an s3:// URI"),
        (shards_body("s3://b/in/a", job_id="../x"), "shards message: job_id '../x' must be"),
        (shards_body("s3://b/in/a", job_id=3), "shards message: job_id 3 must be letters"),
        (
            shards_body("s3://b/in/a", long_documents="all"),
            "shards message: long_documents must be one of truncate, chunk, mean",
        ),
    ],
)
def test_bad_shards_messages_are_refused_naming_the_problem(body: Any, error: str) -> None:
    with pytest.raises(MessageError, match=re.escape(error)):
        parse(body)

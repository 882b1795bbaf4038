"""A message's work, in-process: S3 objects, prefixes and inline documents through a real
engine (over a stand-in pool: no replica processes) into outputs on moto's S3, behind a
recording proxy. What is allowed, what exists already, what fails alone."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq
import pytest

from batchjob.artifact import Artifact
from batchjob.config import CompileSpec, WorkerSpec
from batchjob.engine import Engine
from batchjob.errors import BatchJobError
from batchjob.executor import Executor, message_line
from batchjob.messages import InlineWork, JobWork, MessageError, ObjectWork, TextRequest
from batchjob.pipeline import Counts
from batchjob.s3 import S3Url
from batchjob.storage import Storage
from tests.conftest import CompileFn
from tests.replica_fakes import StandInPool
from tests.s3_server import Bucket, FaultProxy

T = TypeVar("T")


@pytest.fixture(scope="module")
def classifier(compiled: CompileFn, classifier_dir: Path) -> Artifact:
    return compiled(classifier_dir)


def do(
    artifact: Artifact, bucket: Bucket, work: Callable[[Executor], Awaitable[T]], **spec: Any
) -> T:
    """`work(executor)` with an executor whose --output is out/ and --allow-input in/."""
    spec.setdefault("allow_input", (bucket.uri("in/"),))
    worker = WorkerSpec(
        queue="q", output=bucket.uri("out/"), compile=CompileSpec(model=artifact.path), **spec
    )

    async def main() -> T:
        async with Storage() as storage, Engine(artifact, StandInPool()) as engine:
            return await work(Executor(worker, storage, engine))

    return asyncio.run(main())


def ids(bucket: Bucket, key: str) -> list[str]:
    column: list[str] = pq.read_table(io.BytesIO(bucket.get(key))).column("id").to_pylist()
    return column


def doc(i: str) -> bytes:
    return f'{{"id": "{i}", "text": "document {i}"}}\n'.encode()


def test_an_object_then_its_redelivery(
    classifier: Artifact, bucket: Bucket, proxy: FaultProxy
) -> None:
    bucket.put("in/sub/a.jsonl", doc("a1") + doc("a2") + b"not json\n")
    work = [ObjectWork(S3Url(bucket.name, "in/sub/a.jsonl"))]
    counts = do(classifier, bucket, lambda e: e.do(work))
    assert counts == Counts(outputs=1, documents=3, errors=1, windows=2)
    assert ids(bucket, "out/in/sub/a.parquet") == ["a1", "a2", "in/sub/a.jsonl:3"]
    gets = len(proxy.seen("GET", "/in/sub/a.jsonl"))
    again = do(classifier, bucket, lambda e: e.do(work))
    assert again == Counts(existing=1)
    assert len(proxy.seen("GET", "/in/sub/a.jsonl")) == gets, "a redelivery reads nothing"
    line = message_line("in/sub/a.jsonl → out/", counts)
    assert line == "in/sub/a.jsonl → out/: 1 output(s) written, 3 documents, 1 error rows"


def test_a_prefix_job_skips_what_is_done_and_fails_only_the_bad_shards(
    classifier: Artifact, bucket: Bucket
) -> None:
    bucket.put_many(
        {
            "in/p/done.jsonl": doc("d"),
            "in/p/good.jsonl": doc("g"),
            "in/p/bad.jsonl.gz": b"not gzip",
            "in/p/twin.jsonl": doc("t1"),
            "in/p/twin.csv": b"text\nx\n",  # both would be out/twin.parquet
            "out/done.parquet": b"already there",
        }
    )
    job = JobWork(bucket.uri("in/p/"))
    with pytest.raises(BatchJobError) as info:
        do(classifier, bucket, lambda e: e.do([job]))
    message = str(info.value)
    assert message.startswith("3 of 4 shards failed (1 written): ")
    assert "bad.jsonl.gz: " in message
    assert "corrupt gzip" in message
    assert "twin.csv: its output s3://" in message
    assert sorted(bucket.keys("out/")) == ["out/done.parquet", "out/good.parquet"]
    assert ids(bucket, "out/good.parquet") == ["g"]


def test_inline_documents(classifier: Artifact, bucket: Bucket) -> None:
    work = InlineWork("batch-1", [{"id": "x", "text": "hello"}, {"text": 3}])
    counts = do(classifier, bucket, lambda e: e.do([work]))
    assert counts == Counts(outputs=1, documents=2, errors=1, windows=1)
    assert ids(bucket, "out/inline/batch-1.parquet") == ["x", "inline/batch-1:2"]


def test_a_message_sets_long_documents_and_the_prompt(classifier: Artifact, bucket: Bucket) -> None:
    """Inline documents in windows: a row per window, and the prompt in every window."""
    long = " ".join(["word"] * 100)  # 100 tokens: windows of 32 - 2 - 2 (the prompt)
    request = TextRequest("chunk", 4, "q: ", None)
    work = InlineWork(
        "batch-2", [{"id": "long", "text": long}, {"id": "s", "text": "hi"}], text=request
    )
    counts = do(classifier, bucket, lambda e: e.do([work]))
    table = pq.read_table(io.BytesIO(bucket.get("out/inline/batch-2.parquet"))).to_pylist()
    assert [(r["id"], r["chunk"]) for r in table][-2:] == [("long", len(table) - 2), ("s", 0)]
    assert (counts.documents, counts.windows, counts.split) == (2, len(table), 1)
    assert table[0]["char_start"] == 0
    assert table[-2]["char_end"] == len(long)
    line = message_line("inline", counts)
    assert line.endswith(f"2 documents ({len(table)} windows, 1 split), 0 error rows")


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (TextRequest(prompt_name="nope"), "prompt_name 'nope': the model has no such prompt"),
        (TextRequest("chunk", 30), "chunk_overlap must be ≥ 0 and less than a window's 30"),
    ],
)
def test_a_message_asking_for_what_the_model_cannot_do_fails(
    classifier: Artifact, bucket: Bucket, request_: TextRequest, message: str
) -> None:
    work = InlineWork("batch-3", [{"id": "a", "text": "hi"}], text=request_)
    with pytest.raises(MessageError, match=message):
        do(classifier, bucket, lambda e: e.do([work]))
    assert bucket.keys("out/", internal=True) == []


@pytest.mark.parametrize(
    ("work", "message"),
    [
        (ObjectWork(S3Url("{b}", "private/x.jsonl")), "object s3://{b}/private/x.jsonl is not"),
        (JobWork("s3://{b}/private/"), "job input s3://{b}/private/ is not under --allow-input"),
        (JobWork("s3://{b}/in/x.jsonl", "s3://{b}/else/"), "job output s3://{b}/else/ is not"),
        (JobWork("s3://{b}/in/", "s3://{b}/out/"), None),  # allowed: the control
    ],
)
def test_what_a_message_may_name(
    work: Any, message: str | None, classifier: Artifact, bucket: Bucket, proxy: FaultProxy
) -> None:
    bucket.put_many({"private/x.jsonl": doc("p"), "in/x.jsonl": doc("i")})
    if isinstance(work, ObjectWork):
        work = ObjectWork(S3Url(bucket.name, work.url.key))
    else:
        output = work.output and work.output.format(b=bucket.name)
        work = JobWork(work.input.format(b=bucket.name), output)
    if message is None:
        assert do(classifier, bucket, lambda e: e.do([work])).outputs == 1
        return
    with pytest.raises(MessageError, match=message.format(b=bucket.name)):
        do(classifier, bucket, lambda e: e.do([work]))
    assert not [r for r in proxy.s3_requests() if "/private/" in r.path], "nothing read"
    assert bucket.keys("out/", internal=True) == []


def test_any_input_when_allowed_explicitly(classifier: Artifact, bucket: Bucket) -> None:
    bucket.put("private/x.jsonl", doc("p"))
    work = [ObjectWork(S3Url(bucket.name, "private/x.jsonl"))]
    counts = do(classifier, bucket, lambda e: e.do(work), allow_input=(), allow_any_input=True)
    assert counts.outputs == 1


def test_a_job_over_its_own_input_is_refused(classifier: Artifact, bucket: Bucket) -> None:
    bucket.put("out/sub/x.jsonl", doc("x"))
    job = JobWork(bucket.uri("out/sub/"), bucket.uri("out/"))
    with pytest.raises(MessageError, match="lies inside --output"):
        do(classifier, bucket, lambda e: e.do([job]), allow_input=(bucket.uri("out/"),))
    assert bucket.keys("out/") == ["out/sub/x.jsonl"]


def test_a_message_keeps_columns_on_each_window_row(classifier: Artifact, bucket: Bucket) -> None:
    long = " ".join(["word"] * 100)
    docs = [{"id": "long", "text": long, "url": "u1"}, {"id": "s", "text": "hi", "url": "u2"}]
    request = TextRequest("chunk", 4, "q: ", None)
    work = InlineWork("batch-4", docs, text=request, keep_columns=("url",))
    do(classifier, bucket, lambda e: e.do([work]))
    table = pq.read_table(io.BytesIO(bucket.get("out/inline/batch-4.parquet")))
    assert table.column_names[:5] == ["id", "url", "chunk", "char_start", "char_end"]
    rows = table.to_pylist()
    assert len(rows) > 2
    assert [r["url"] for r in rows] == ["u1"] * (len(rows) - 1) + ["u2"]
    # With chunk rows, a kept column may not take a chunk column's name.
    clash = InlineWork("batch-5", docs, text=request, keep_columns=("chunk",))
    with pytest.raises(MessageError, match="column 'chunk' collides with an output column"):
        do(classifier, bucket, lambda e: e.do([clash]))

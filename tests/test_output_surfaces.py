"""Issue 13 §4 in `worker` and `serve`: job messages carry `keep_columns`, serve takes the
output settings from BATCHJOB_* variables (Batch Transform passes only the environment) and
its JSON answers carry the kept columns as `run`'s Parquet rows do."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjob.artifact import Artifact
from batchjob.config import CompileSpec, WorkerSpec
from batchjob.embeddings import EmbeddingSpec
from batchjob.engine import Engine, Result
from batchjob.errors import UsageError
from batchjob.executor import Executor
from batchjob.messages import InlineWork, JobWork, MessageError, parse_message
from batchjob.output_format import OutputFormat
from batchjob.serve_config import serve_spec
from batchjob.serve_formats import CSV, JSON, JSONLINES, encode, parse
from batchjob.storage import Storage
from tests.conftest import CompileFn
from tests.replica_fakes import StandInPool
from tests.s3_server import Bucket

# -- worker ----------------------------------------------------------------------------------


def test_job_and_inline_messages_carry_keep_columns() -> None:
    body = {"input": "s3://b/in/", "keep_columns": ["url", "lang"]}
    assert parse_message(json.dumps(body), "m") == [
        JobWork("s3://b/in/", keep_columns=("url", "lang"))
    ]
    body = {"input": "s3://b/in/a.jsonl", "keep_columns": "url"}
    assert parse_message(json.dumps(body), "m") == [
        JobWork("s3://b/in/a.jsonl", keep_columns=("url",))
    ]
    inline = {"id": "x", "documents": [], "keep_columns": ["n"]}
    assert parse_message(json.dumps(inline), "m") == [InlineWork("x", [], keep_columns=("n",))]
    assert parse_message('{"input": "s3://b/in/"}', "m") == [JobWork("s3://b/in/")]


@pytest.mark.parametrize(
    ("keep", "error"),
    [
        (7, "job message: keep_columns must be column names"),
        (["a", 1], "job message: keep_columns must be column names"),
        (["a", "a"], "named twice"),
        ("a,,b", "empty column name"),
    ],
)
def test_bad_keep_columns_fail_the_message(keep: Any, error: str) -> None:
    body = json.dumps({"input": "s3://b/in/", "keep_columns": keep})
    with pytest.raises(MessageError, match=error):
        parse_message(body, "m")


@pytest.fixture(scope="module")
def classifier(compiled: CompileFn, classifier_dir: Path) -> Artifact:
    return compiled(classifier_dir)


def execute(artifact: Artifact, bucket: Bucket, works: list[Any], keep: tuple[str, ...]) -> Any:
    worker = WorkerSpec(
        queue="q",
        output=bucket.uri("out/"),
        compile=CompileSpec(model=artifact.path),
        allow_input=(bucket.uri("in/"),),
        output_format=OutputFormat(keep),
    )

    async def main() -> Any:
        async with Storage() as storage, Engine(artifact, StandInPool()) as engine:
            return await Executor(worker, storage, engine).do(works)

    return asyncio.run(main())


def rows(bucket: Bucket, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(bucket.get(key)))


def test_worker_keeps_the_messages_columns_else_its_own(
    classifier: Artifact, bucket: Bucket
) -> None:
    bucket.put(
        "in/a.jsonl",
        b'{"id": "a1", "text": "one", "url": "u1", "lang": "en"}\n'
        b'{"id": "a2", "text": "two", "url": "u2"}\n',
    )
    job = JobWork(bucket.uri("in/a.jsonl"), bucket.uri("out/job/"), keep_columns=("url", "lang"))
    execute(classifier, bucket, [job], keep=("lang",))
    table = rows(bucket, "out/job/in/a.parquet")
    assert table.column_names[:3] == ["id", "url", "lang"]
    assert table.select(["url", "lang"]).to_pylist() == [
        {"url": "u1", "lang": "en"},
        {"url": "u2", "lang": None},
    ]
    # No keep_columns in the message: the worker's --keep-columns.
    inline = InlineWork("i1", [{"text": "x", "lang": "fr", "url": "u"}])
    execute(classifier, bucket, [inline], keep=("lang",))
    table = rows(bucket, "out/inline/i1.parquet")
    assert table.column_names[:2] == ["id", "lang"]
    assert table.column("lang").to_pylist() == ["fr"]
    metadata = json.loads(table.schema.metadata[b"batchjob"])
    assert metadata["keep_columns"] == ["lang"]


def test_a_colliding_keep_column_fails_the_message_before_work(
    classifier: Artifact, bucket: Bucket
) -> None:
    bucket.put("in/b.jsonl", b'{"text": "one"}\n')
    job = JobWork(bucket.uri("in/b.jsonl"), keep_columns=("url", "score"))
    with pytest.raises(MessageError, match="'score' collides with an output column"):
        execute(classifier, bucket, [job], keep=())
    assert bucket.keys("out/") == []


# -- serve -----------------------------------------------------------------------------------


def test_serve_reads_the_output_settings_from_the_environment() -> None:
    environ = {
        "BATCHJOB_KEEP_COLUMNS": "url,lang",
        "BATCHJOB_EMBEDDING_DIM": "64",
        "BATCHJOB_EMBEDDING_PRECISION": "binary",
    }
    spec = serve_spec({"model": "m"}, environ)
    assert spec.output_format == OutputFormat(
        ("url", "lang"), EmbeddingSpec(dim=64, precision="binary")
    )
    # A flag wins over its variable.
    spec = serve_spec({"model": "m", "keep_columns": "k"}, environ)
    assert spec.output_format.keep_columns == ("k",)
    with pytest.raises(UsageError, match="BATCHJOB_EMBEDDING_DIM must be an integer"):
        serve_spec({"model": "m"}, {"BATCHJOB_EMBEDDING_DIM": "big"})
    with pytest.raises(UsageError, match="--embedding-precision must be one of"):
        serve_spec({"model": "m"}, {"BATCHJOB_EMBEDDING_PRECISION": "int4"})


def test_jsonlines_answers_carry_the_kept_columns_first() -> None:
    keep = ("url", "meta")
    body = (
        b'{"inputs": "a", "url": "u1", "meta": {"k": [1]}}\n'
        b'{"inputs": "b"}\n'
        b'{"url": "u3"}\n'
        b'"bare text"\n'
    )
    parsed = parse(JSONLINES, body, "inputs", "text-classification", keep)
    assert [r.kept for r in parsed.records] == [
        ("u1", {"k": [1]}),  # JSON in, the same JSON out
        (None, None),
        ("u3", None),  # an error record keeps its columns
        (None, None),
    ]
    result = Result({"label": "x", "score": np.float32(0.5), "scores": np.array([0.5])})
    error = Result(None, error="line 3: missing field 'inputs'")
    results = [result, result, error, result]
    lines = [
        json.loads(line) for line in encode(JSONLINES, parsed, results, "t", [], keep).split(b"\n")
    ]
    assert list(lines[0]) == ["url", "meta", "label", "score", "scores", "truncated"]
    assert lines[0]["meta"] == {"k": [1]}
    assert lines[2] == {"url": "u3", "meta": None, "error": "line 3: missing field 'inputs'"}
    as_array = json.loads(encode(JSON, parsed, results, "t", [], keep))
    assert as_array == lines


def test_csv_kept_columns_are_strings() -> None:
    parsed = parse(CSV, b"inputs,url,n\nhello,u1,7\nbye,,8\n", "inputs", "t", ("n", "gone"))
    assert [r.kept for r in parsed.records] == [("7", None), ("8", None)]


def test_integer_embeddings_answer_as_integers() -> None:
    parsed = parse(JSONLINES, b'{"inputs": "a"}\n', "inputs", "feature-extraction")
    vector = np.array([-128, 0, 127], dtype=np.int8)
    line = json.loads(encode(JSONLINES, parsed, [Result({"embedding": vector})], "f", []))
    assert line == {"embedding": [-128, 0, 127], "truncated": False}


def test_serve_answers_with_the_environments_output_settings(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    from tests.serve_process import JSONLINES as JSONL
    from tests.serve_process import Server, jsonlines

    artifact = compiled(embedder_dir)
    env = {
        "BATCHJOB_KEEP_COLUMNS": "url",
        "BATCHJOB_EMBEDDING_DIM": "16",
        "BATCHJOB_EMBEDDING_PRECISION": "binary",
    }
    srv = Server(["--model", artifact.path, "--port", "0"], env, tmp_path)
    try:
        srv.wait_ready()
        lines = srv.post(jsonlines([{"inputs": "a text", "url": "u1"}, {"inputs": "b"}]), JSONL)
        assert [line["url"] for line in lines] == ["u1", None]
        assert [len(line["embedding"]) for line in lines] == [2, 2]  # 16 bits, 2 bytes
        assert all(0 <= v <= 255 for line in lines for v in line["embedding"])
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"BATCHJOB_KEEP_COLUMNS": "embedding"}, "'embedding' collides with an output column"),
        ({"BATCHJOB_EMBEDDING_DIM": "64"}, "--embedding-dim 64 is above the model's dimension"),
        ({"BATCHJOB_EMBEDDING_PRECISION": "int8"}, "int8 needs --embedding-ranges FILE"),
    ],
)
def test_serve_refuses_impossible_output_settings_with_one_line(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    from tests.serve_process import Server

    artifact = compiled(embedder_dir)
    srv = Server(["--model", artifact.path, "--port", "0"], env, tmp_path)
    srv.proc.wait(120)  # on its own: the refusal comes once the artifact is open
    assert srv.stop() == 2
    errors = [line for line in srv.log if "error:" in line]
    assert len(errors) == 1, srv.log
    assert needle in errors[0]

"""Token classification through `run` (Parquet: the `entities` column, truncation, windows
merged with --long-documents chunk), `worker` (inline documents from SQS) and `serve` (the
inference toolkit's shapes, HF_TASK=ner), against transformers' pipeline."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchjob.batching import Shape
from batchjob.long_documents import TextOptions, plan_units
from batchjob.output_format import OutputFormat
from batchjob.records import Record
from batchjob.tokens import RecordTokenizer
from tests.conftest import (
    CompileFn,
    assert_usage_error,
    invoke,
    long_text,
    run_job,
    write_jsonl,
)
from tests.ner_models import NER_TEXTS, assert_same_entities, bert_ner
from tests.s3_server import Bucket
from tests.serve_process import JSONLINES, Server, jsonlines
from tests.sqs_queues import Queues, run_worker

__all__ = ["bert_ner"]  # the fixture
SHAPES = (Shape(16, 4), Shape(64, 2))


@functools.cache
def _pipeline(model: Path, max_length: int = 64) -> Any:
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(model, model_max_length=max_length)
    return pipeline("token-classification", model=str(model), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ner_artifact(bert_ner: Path, compiled: CompileFn) -> str:
    return compiled(bert_ner, shapes=SHAPES).path


def test_run_writes_the_entities_column(bert_ner: Path, ner_artifact: str, tmp_path: Path) -> None:
    texts = [*NER_TEXTS, long_text(80, seed=3)]  # the last is past 64 tokens
    rows: list[dict[str, Any]] = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]
    write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    with (tmp_path / "in" / "a.jsonl").open("a") as f:
        f.write("{not json\n")
    fmt = OutputFormat(aggregation="first")
    assert run_job(ner_artifact, tmp_path / "in", tmp_path / "out", output_format=fmt) == 0
    table = pq.read_table(tmp_path / "out" / "a.parquet")
    assert table.column_names == ["id", "entities", "truncated", "error"]
    struct = table.schema.field("entities").type.value_type
    assert [f.name for f in struct] == ["entity_group", "score", "word", "start", "end"]
    out = table.to_pylist()
    assert [r["truncated"] for r in out] == [False] * len(NER_TEXTS) + [True, False]
    assert out[-1]["error"].startswith("a.jsonl line 7: invalid JSON")
    assert out[-1]["entities"] is None
    pipe = _pipeline(bert_ner)
    for text, row in zip(texts, out, strict=False):
        assert_same_entities(row["entities"], pipe(text, aggregation_strategy="first"))
    metadata = json.loads(table.schema.metadata[b"batchjob"])
    assert metadata["task"] == "token-classification"
    assert metadata["aggregation"] == "first"


def test_chunk_merges_the_windows_entities_into_a_row_per_document(
    bert_ner: Path, ner_artifact: str, tmp_path: Path
) -> None:
    texts = [long_text(150, seed=5), "short: one window", long_text(90, seed=6)]
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts])
    code = run_job(
        ner_artifact, tmp_path / "in", tmp_path / "out", long_documents="chunk", chunk_overlap=8
    )
    assert code == 0
    table = pq.read_table(tmp_path / "out" / "a.parquet")
    assert table.column_names == ["id", "entities", "truncated", "error"]  # no window columns
    out = table.to_pylist()
    assert len(out) == len(texts)
    # What each window answers alone (the pipeline on its slice of the text), at its place
    # in the document, merged as the pipeline merges its own overlapping chunks.
    pipe = _pipeline(bert_ner, max_length=512)
    tokenizer = RecordTokenizer(str(Path(ner_artifact) / "tokenizer"), 64)
    options = TextOptions("chunk", chunk_overlap=8)
    units = list(plan_units(tokenizer, [Record(str(i), t) for i, t in enumerate(texts)], options))
    assert len(units) > len(texts) + 4  # long documents: several windows each
    for i, (text, row) in enumerate(zip(texts, out, strict=True)):
        found = []
        for unit in (u for u in units if u.record == i):
            window = text[unit.char_start : unit.char_end]  # type: ignore[union-attr]
            for entity in pipe(window, aggregation_strategy="simple"):
                start = int(entity["start"]) + unit.char_start  # type: ignore[union-attr]
                end = int(entity["end"]) + unit.char_start  # type: ignore[union-attr]
                found.append(entity | {"start": start, "end": end})
        expected = pipe.aggregate_overlapping_entities(found)
        assert_same_entities(row["entities"], expected)
        assert row["truncated"] is False
        for entity in row["entities"]:  # offsets into the whole text
            assert text[entity["start"] : entity["end"]].strip()
    assert max(e["end"] for e in out[0]["entities"]) > len(texts[0]) // 2


def test_mean_and_options_of_other_tasks_are_refused(
    ner_artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "hello"}])
    base = ["run", "--model", ner_artifact, "--input", str(tmp_path / "in")]
    base += ["--output", str(tmp_path / "out"), "--replicas", "1"]
    code, out, err = invoke([*base, "--long-documents", "mean"], capsys)
    assert_usage_error(code, out, err, ("--long-documents mean", "token-classification"))
    code, out, err = invoke([*base, "--prompt", "query: "], capsys)
    assert_usage_error(code, out, err, ("--prompt", "token-classification takes no prompt"))
    code, out, err = invoke([*base, "--aggregation", "longest"], capsys)
    assert_usage_error(code, out, err, ("--aggregation must be one of",))
    code, out, err = invoke([*base, "--multi-label"], capsys)
    assert_usage_error(code, out, err, ("--multi-label", "token-classification"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.fixture(scope="module")
def server(ner_artifact: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"HF_TASK": "ner", "BATCHJOB_AGGREGATION": "average"}
    srv = Server(["--model", ner_artifact, "--port", "0"], env, tmp_path_factory.mktemp("srv"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def test_serve_answers_as_the_inference_toolkit(server: Server, bert_ner: Path) -> None:
    pipe = _pipeline(bert_ner)
    text = NER_TEXTS[0]
    answer = server.post(json.dumps({"inputs": text}).encode(), "application/json")
    assert_same_entities(answer, pipe(text, aggregation_strategy="average"))
    body = json.dumps({"inputs": NER_TEXTS}).encode()
    answers = server.post(body, "application/json")
    assert len(answers) == len(NER_TEXTS)
    for text, answer in zip(NER_TEXTS, answers, strict=True):
        assert_same_entities(answer, pipe(text, aggregation_strategy="average"))
    lines = server.post(jsonlines([{"inputs": t} for t in NER_TEXTS[:2]]), JSONLINES)
    for text, line in zip(NER_TEXTS[:2], lines, strict=True):
        assert line.keys() == {"entities", "truncated"}
        assert_same_entities(line["entities"], pipe(text, aggregation_strategy="average"))
    pair = {"inputs": {"text": "a question", "text_pair": "its answer"}}
    line = server.post(jsonlines([pair]), JSONLINES)[0]
    assert "not a text pair" in line["error"]
    status, _, refused = server.request(
        "POST", "/invocations", json.dumps(pair).encode(), {"Content-Type": "application/json"}
    )
    assert status == 400
    assert json.loads(refused) == {
        "error": "inputs: token-classification takes a string, not a text pair"
    }


def test_worker_writes_the_entities_of_inline_documents(
    bert_ner: Path,
    ner_artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = queues.make()
    documents = [{"id": f"d{i}", "text": t} for i, t in enumerate(NER_TEXTS)]
    queue.send({"id": "ner-1", "documents": documents})
    flags = ("--aggregation", "max", "--exit-when-idle", "2")
    worker = run_worker(ner_artifact, queue, bucket.uri("out/"), caplog, capsys, *flags)
    assert worker.code == 0, worker.log()
    rows = pq.read_table(io.BytesIO(bucket.get("out/inline/ner-1.parquet"))).to_pylist()
    assert [r["id"] for r in rows] == [d["id"] for d in documents]
    pipe = _pipeline(bert_ner)
    for text, row in zip(NER_TEXTS, rows, strict=True):
        assert_same_entities(row["entities"], pipe(text, aggregation_strategy="max"))

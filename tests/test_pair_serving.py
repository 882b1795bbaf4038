"""zero-shot-classification and text-ranking through `serve` (the toolkits' request and
answer shapes, HF_TASK) and the `worker` (flags, a record's own labels), against the
pipeline and CrossEncoder."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchjob.config import worker_spec
from batchjob.engine_start import start_engine
from batchjob.errors import UsageError
from batchjob.executor import Executor
from batchjob.messages import InlineWork
from batchjob.output_format import make_head
from batchjob.pair_tasks import TEXT_RANKING, ZERO_SHOT, Ranking, ZeroShot
from batchjob.replica_process import plan_placements
from batchjob.results import Result
from batchjob.serve_config import serve_spec
from batchjob.serve_formats import JSON, JSONLINES, RequestError
from batchjob.serve_pairs import encode_pairs, parse_pairs
from batchjob.storage import Storage
from tests.conftest import CompileFn
from tests.pair_models import BUCKETS, TOPICS
from tests.s3_server import Bucket

HEAD = ZeroShot(2, 0, candidate_labels=("a", "b"))


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


# -- request and answer shapes (no server) ----------------------------------------------------


def test_a_zero_shot_request_sets_its_own_head() -> None:
    asked = parse_pairs(
        JSON,
        body(
            {
                "inputs": ["one", "two"],
                "parameters": {
                    "candidate_labels": "x, y,z",
                    "multi_label": True,
                    "hypothesis_template": "About {}.",
                },
            }
        ),
        "inputs",
        HEAD,
    )
    assert [r.text for r in asked.records] == ["one", "two"]
    assert asked.zero_shot is not None
    assert asked.zero_shot.candidate_labels == ("x", "y", "z")
    assert (asked.zero_shot.multi_label, asked.zero_shot.hypothesis_template) == (True, "About {}.")
    results = [Result({"labels": ["y", "x"], "scores": np.array([0.75, 0.25], np.float32)})] * 2
    answer = json.loads(encode_pairs(JSON, asked, results))
    assert answer[0] == {"sequence": "one", "labels": ["y", "x"], "scores": [0.75, 0.25]}
    single = parse_pairs(JSON, body({"inputs": "one"}), "inputs", HEAD)
    assert single.zero_shot is not None
    assert single.zero_shot.candidate_labels == ("a", "b")
    assert json.loads(encode_pairs(JSON, single, results[:1]))["sequence"] == "one"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"inputs": "x", "parameters": {"candidate_labels": []}}, "holds no labels"),
        ({"inputs": "x", "parameters": {"hypothesis_template": "no slot"}}, "has no {}"),
        ({"inputs": "x", "parameters": {"top_k": 2}}, "unsupported parameters: top_k"),
        ({"inputs": [1]}, "inputs must be a string"),
    ],
)
def test_bad_zero_shot_requests_are_400(request_: Any, message: str) -> None:
    with pytest.raises(RequestError, match=message) as info:
        parse_pairs(JSON, body(request_), "inputs", HEAD)
    assert info.value.status == 400


def test_ranking_request_shapes() -> None:
    head = Ranking()
    scores = [Result({"score": np.float32(s)}) for s in (0.25, 0.75, 0.25)]
    pairs = parse_pairs(JSON, body({"inputs": [["q", "a"], ["q", "b"], ["q", "c"]]}), "i", head)
    assert [(r.text, r.text_pair) for r in pairs.records] == [("q", "a"), ("q", "b"), ("q", "c")]
    assert json.loads(encode_pairs(JSON, pairs, scores)) == {"scores": [0.25, 0.75, 0.25]}
    one = parse_pairs(JSON, body({"inputs": ["q", "a"]}), "i", head)
    assert json.loads(encode_pairs(JSON, one, scores[:1])) == {"scores": 0.25}
    query = {"inputs": {"query": "q", "texts": ["a", "b", "c"]}}
    asked = parse_pairs(JSON, body({**query, "parameters": {"return_documents": True}}), "i", head)
    assert json.loads(encode_pairs(JSON, asked, scores)) == [
        {"index": 1, "score": 0.75, "text": "b"},
        {"index": 0, "score": 0.25, "text": "a"},
        {"index": 2, "score": 0.25, "text": "c"},
    ]
    with pytest.raises(RequestError, match=r"inputs\[0\] must be \[query, passage\]"):
        parse_pairs(JSON, body({"inputs": [["q"]]}), "i", head)


def test_jsonlines_ranks_within_the_request_groups() -> None:
    head = Ranking(group_field="qid")
    lines = [
        {"inputs": {"text": "q1", "text_pair": "a"}, "qid": 1},
        {"inputs": {"text": "q1", "text_pair": "b"}, "qid": 1},
        {"inputs": {"text": "q2", "text_pair": "c"}, "qid": 2},
    ]
    asked = parse_pairs(JSONLINES, b"\n".join(body(line) for line in lines), "inputs", head)
    results = [Result({"score": np.float32(s), "rank": None}) for s in (0.25, 0.75, 0.5)]
    answer = [json.loads(line) for line in encode_pairs(JSONLINES, asked, results).split(b"\n")]
    assert [a["rank"] for a in answer] == [2, 1, 1]


def test_jsonlines_own_labels_and_a_bad_field_is_an_error_line() -> None:
    head = ZeroShot(2, 0, labels_field="labels")
    lines = [{"inputs": "t", "labels": ["x", "y"]}, {"inputs": "u"}, {"inputs": "v", "labels": 3}]
    asked = parse_pairs(JSONLINES, b"\n".join(body(line) for line in lines), "inputs", head)
    assert asked.records[0].candidate_labels == ("x", "y")
    assert asked.records[1].candidate_labels is None  # the server's labels, if any
    assert (
        asked.records[2].error
        == "line 3: field 'labels' must be a list of strings (the candidate labels)"
    )


def test_hf_task_values() -> None:
    for hf_task, task in (
        ("zero-shot-classification", ZERO_SHOT),
        ("sentence-ranking", TEXT_RANKING),
        ("text-ranking", TEXT_RANKING),
    ):
        spec = serve_spec({"model": "m"}, {"HF_TASK": hf_task})
        assert spec.compile.task == "text-classification"
        assert spec.output_format.pairs.task == task
    spec = serve_spec(
        {"model": "m"},
        {"HF_TASK": ZERO_SHOT, "BATCHJOB_CANDIDATE_LABELS": "a,b", "BATCHJOB_MULTI_LABEL": "1"},
    )
    assert spec.output_format.pairs.candidate_labels == ("a", "b")
    assert spec.output_format.multi_label
    with pytest.raises(UsageError, match="--long-documents chunk is not supported"):
        serve_spec(
            {"model": "m"}, {"HF_TASK": "sentence-ranking", "BATCHJOB_LONG_DOCUMENTS": "chunk"}
        )
    with pytest.raises(UsageError, match=r"has no \{\} where the label should go"):
        serve_spec({"model": "m"}, {"HF_TASK": ZERO_SHOT, "BATCHJOB_HYPOTHESIS_TEMPLATE": "x"})


# -- a real server ----------------------------------------------------------------------------


def test_serve_zero_shot_answers_as_the_pipeline(
    nli_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
) -> None:
    from transformers import pipeline

    from tests.serve_process import Server, jsonlines

    artifact = compiled(nli_dir, shapes=BUCKETS)
    env = {"HF_TASK": ZERO_SHOT, "BATCHJOB_CANDIDATE_LABELS": ",".join(TOPICS)}
    srv = Server(["--model", artifact.path, "--port", "0"], env, tmp_path)
    try:
        srv.wait_ready()
        classify = pipeline("zero-shot-classification", model=str(nli_dir))
        texts = ["the fox jumps", "parquet files on inferentia"]
        request = {"inputs": texts, "parameters": {"candidate_labels": ["red", "blue", "green"]}}
        answer = srv.post(body(request), JSON)
        want = classify(texts, candidate_labels=["red", "blue", "green"])
        for got, expected in zip(answer, want, strict=True):
            assert got["sequence"] == expected["sequence"]
            assert got["labels"] == expected["labels"]
            np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-4)
        lines = srv.post(jsonlines([{"inputs": t} for t in texts]), JSONLINES)
        want = classify(texts, candidate_labels=TOPICS, multi_label=False)
        assert [line["labels"] for line in lines] == [w["labels"] for w in want]
    finally:
        assert srv.stop() == 0


def test_serve_sentence_ranking_answers_as_cross_encoder(
    cross_encoder_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
) -> None:
    from sentence_transformers import CrossEncoder

    from tests.serve_process import Server

    artifact = compiled(cross_encoder_dir, shapes=BUCKETS)
    srv = Server(
        ["--model", artifact.path, "--port", "0"], {"HF_TASK": "sentence-ranking"}, tmp_path
    )
    try:
        srv.wait_ready()
        model = CrossEncoder(str(cross_encoder_dir))
        pairs = [["a query", "the quick brown fox"], ["a query", "parquet files"]]
        answer = srv.post(body({"inputs": pairs}), JSON)
        np.testing.assert_allclose(answer["scores"], model.predict(pairs), atol=1e-4)
        ranked = srv.post(
            body({"inputs": {"query": "a query", "texts": [p for _, p in pairs]}}), JSON
        )
        want = model.rank("a query", [p for _, p in pairs])
        assert [r["index"] for r in ranked] == [w["corpus_id"] for w in want]
    finally:
        assert srv.stop() == 0


# -- the worker -------------------------------------------------------------------------------


def test_worker_zero_shot_with_a_record_field(
    nli_dir: Path,
    compiled: CompileFn,
    bucket: Bucket,
) -> None:
    from transformers import pipeline

    artifact = compiled(nli_dir, shapes=BUCKETS)
    spec = worker_spec(
        {
            "queue": "q",
            "output": bucket.uri("out/"),
            "model": artifact.path,
            "allow_input": [bucket.uri("in/")],
            "task": ZERO_SHOT,
            "candidate_labels_field": "topics",
            "multi_label": True,
        }
    )
    head = make_head(artifact, spec.output_format, calibrate=False)  # as worker.work does
    docs = [
        {"id": "a", "text": "the lazy dog", "topics": ["animals", "cars"]},
        {"id": "b", "text": "buckets and padding", "topics": ["software"]},
        {"id": "c", "text": "no topics"},
    ]

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack, Storage() as storage:
            engine, _ = await start_engine(
                stack,
                artifact,
                plan_placements(1, 1, "cpu"),
                start_timeout=120,
                max_batch_delay=0.001,
                head=head,
            )
            await Executor(spec, storage, engine).do([InlineWork("z1", docs)])

    asyncio.run(main())
    rows = pq.read_table(io.BytesIO(bucket.get("out/inline/z1.parquet"))).to_pylist()
    classify = pipeline("zero-shot-classification", model=str(nli_dir))
    for row, doc in zip(rows[:2], docs, strict=False):
        want = classify(doc["text"], candidate_labels=doc["topics"], multi_label=True)
        assert row["labels"] == want["labels"]
        np.testing.assert_allclose(row["scores"], want["scores"], atol=1e-4)
    assert "missing field 'topics'" in (rows[2]["error"] or "")

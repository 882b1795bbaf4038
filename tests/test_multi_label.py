"""Issue 14 §4: multi-label classification. A model whose config says
`problem_type: multi_label_classification`, or any classifier given `--multi-label`, scores
with sigmoid and writes `labels` (every label scoring ≥ `--threshold`) next to `scores`, as
the pipeline's `function_to_apply="sigmoid", top_k=None`; single-label outputs keep their
schema. `run`, `worker` (flag or job file) and `serve` (BATCHJOB_* variables) all do it."""

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
import torch

from batchjob.artifact import Artifact
from batchjob.config import CompileSpec, WorkerSpec, worker_spec
from batchjob.engine import Engine
from batchjob.errors import UsageError
from batchjob.executor import Executor
from batchjob.messages import InlineWork
from batchjob.output_format import OutputFormat, make_head, output_format_from_env
from batchjob.serve_config import serve_spec
from batchjob.storage import Storage
from tests.conftest import (
    CompileFn,
    _save_tokenizer,
    _tiny_config,
    assert_usage_error,
    invoke,
    make_texts,
    run_job,
    write_jsonl,
)
from tests.replica_fakes import StandInPool
from tests.s3_server import Bucket

TOPICS = ("sports", "politics", "science", "music")


@pytest.fixture(scope="module")
def multi_label_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-label BERT classifier whose config says multi_label_classification."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    config = _tiny_config(
        num_labels=len(TOPICS),
        id2label=dict(enumerate(TOPICS)),
        label2id={label: i for i, label in enumerate(TOPICS)},
        problem_type="multi_label_classification",
    )
    path = tmp_path_factory.mktemp("multi_label")
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # logits of order 1, not 0.01: scores spread around the threshold
        model.classifier.weight.mul_(100)
    model.save_pretrained(path)
    _save_tokenizer(path)
    return path


def pipeline_scores(model_dir: Path, texts: list[str]) -> list[dict[str, float]]:
    """transformers' own answer: every label's sigmoid score, per text."""
    from transformers import pipeline

    classify = pipeline(
        "text-classification", model=str(model_dir), function_to_apply="sigmoid", top_k=None
    )
    return [{d["label"]: d["score"] for d in answer} for answer in classify(texts)]


def run_texts(artifact: Artifact, tmp_path: Path, texts: list[str], fmt: OutputFormat) -> Path:
    write_jsonl(
        tmp_path / "in" / "a.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    )
    assert run_job(artifact.path, tmp_path / "in", tmp_path / "out", output_format=fmt) == 0
    return tmp_path / "out" / "a.parquet"


def metadata(path: Path) -> dict[str, Any]:
    return dict(json.loads(pq.read_schema(path).metadata[b"batchjob"]))


def assert_matches_pipeline(
    rows: list[dict[str, Any]], expected: list[dict[str, float]], labels: tuple[str, ...], t: float
) -> None:
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        np.testing.assert_allclose(row["scores"], [want[name] for name in labels], atol=1e-4)
        assert row["labels"] == [name for name in labels if want[name] >= t]
        best = max(labels, key=lambda name: want[name])
        assert row["label"] == best
        assert row["score"] == pytest.approx(want[best], abs=1e-4)


# -- run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [None, 0.45])
def test_a_multi_label_config_writes_labels_as_the_sigmoid_pipeline(
    multi_label_dir: Path, compiled: CompileFn, tmp_path: Path, threshold: float | None
) -> None:
    texts = make_texts(12, seed=4, max_words=10)
    artifact = compiled(multi_label_dir)
    path = run_texts(artifact, tmp_path, texts, OutputFormat(threshold=threshold))
    table = pq.read_table(path)
    assert table.schema.field("labels").type == pa.list_(pa.string())
    t = 0.5 if threshold is None else threshold
    rows = sorted(table.to_pylist(), key=lambda r: int(r["id"]))
    assert_matches_pipeline(rows, pipeline_scores(multi_label_dir, texts), TOPICS, t)
    # Some labels chosen, not all: the threshold decides.
    assert 0 < sum(len(r["labels"]) for r in rows) < len(rows) * len(TOPICS)
    described = metadata(path)
    assert (described["multi_label"], described["threshold"]) == (True, t)
    assert described["function_to_apply"] == "sigmoid"
    assert described["labels"] == list(TOPICS)  # the order of `scores` and of `labels`
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["output_format"] == described


def test_multi_label_on_a_softmax_model_scores_with_sigmoid(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    from tests.conftest import LABELS

    texts = make_texts(8, seed=5, max_words=10)
    artifact = compiled(classifier_dir)
    assert artifact.function_to_apply == "softmax"
    path = run_texts(artifact, tmp_path, texts, OutputFormat(multi_label=True))
    rows = sorted(pq.read_table(path).to_pylist(), key=lambda r: int(r["id"]))
    assert_matches_pipeline(rows, pipeline_scores(classifier_dir, texts), LABELS, 0.5)
    assert metadata(path)["function_to_apply"] == "sigmoid"


def test_single_label_outputs_keep_their_schema(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    path = run_texts(compiled(classifier_dir), tmp_path, ["a text"], OutputFormat())
    assert pq.read_schema(path).names == ["id", "label", "score", "scores", "truncated", "error"]
    described = metadata(path)
    assert (described["multi_label"], described["function_to_apply"]) == (False, "softmax")
    assert "threshold" not in described


def test_threshold_edges(classifier_dir: Path, compiled: CompileFn) -> None:
    artifact = compiled(classifier_dir)  # labels negative, neutral, positive
    logits = np.array([[0.0, 2.0, -2.0], [-30.0, -30.0, -30.0]], dtype=np.float32)

    def labels(threshold: float) -> list[list[str]]:
        fmt = OutputFormat(multi_label=True, threshold=threshold)
        head = make_head(artifact, fmt, calibrate=False)
        return head.columns(logits)["labels"]

    assert labels(0.5) == [["negative", "neutral"], []]  # sigmoid(0) = 0.5 exactly: ≥ keeps it
    assert labels(0.0) == [["negative", "neutral", "positive"]] * 2  # every label
    assert labels(1.0) == [[], []]  # no finite logit reaches 1 in float32 below 17
    columns = make_head(artifact, OutputFormat(multi_label=True), calibrate=False).columns(logits)
    assert columns["label"] == ["neutral", "negative"]  # the top one, as before; ties: first


# -- refusals: exit 2, one line ----------------------------------------------------------------


def test_bad_multi_label_flags_exit_2_with_one_line(
    classifier_dir: Path,
    embedder_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "x"}])
    classifier, embedder = compiled(classifier_dir).path, compiled(embedder_dir).path

    def run(model: str, *flags: str) -> tuple[int, str, str]:
        argv = ["run", "--model", model, "--input", str(tmp_path / "in")]
        return invoke([*argv, "--output", str(tmp_path / "out"), *flags], capsys)

    for value in ("1.5", "-0.1"):
        needle = f"--threshold must be in [0, 1], got {float(value):g}"
        assert_usage_error(*run(classifier, "--multi-label", "--threshold", value), (needle,))
    assert_usage_error(*run(classifier, "--threshold", "0.3"), ("add --multi-label",))
    needle = "--multi-label and --threshold apply to text-classification, not feature-extraction"
    assert_usage_error(*run(embedder, "--multi-label"), (needle,))
    code, out, err = run(classifier, "--multi-label", "--threshold", "half")
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert "--threshold: invalid float value: 'half'" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_job_file_takes_multi_label_and_refuses_a_string(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchjob.job_files import load_job_file

    job = tmp_path / "job.yaml"
    job.write_text("multi_label: true\nthreshold: 0.25\n")
    fields = load_job_file(str(job), "worker")
    assert (fields["multi_label"], fields["threshold"]) == (True, 0.25)
    job.write_text('model: m\ninput: i\noutput: o\nmulti_label: "yes"\n')
    assert_usage_error(*invoke(["run", "--job", str(job)], capsys), ("multi_label",))


def test_serve_reads_multi_label_from_the_environment_a_flag_winning() -> None:
    env = {"BATCHJOB_MULTI_LABEL": "true", "BATCHJOB_THRESHOLD": "0.7"}
    spec = serve_spec({"model": "m"}, env)
    assert spec.output_format == OutputFormat(multi_label=True, threshold=0.7)
    spec = serve_spec({"model": "m", "threshold": 0.2}, env)
    assert spec.output_format.threshold == 0.2
    assert output_format_from_env({"BATCHJOB_MULTI_LABEL": "0"}) == {"multi_label": False}
    for variable, value, needle in (
        ("BATCHJOB_MULTI_LABEL", "maybe", "BATCHJOB_MULTI_LABEL must be true or false"),
        ("BATCHJOB_THRESHOLD", "high", "BATCHJOB_THRESHOLD must be a number, got 'high'"),
        ("BATCHJOB_THRESHOLD", "2", "--threshold must be in [0, 1], got 2"),
    ):
        with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            serve_spec({"model": "m"}, {variable: value})


# -- worker and serve ---------------------------------------------------------------------------


def test_the_worker_flag_writes_labels(
    classifier_dir: Path, compiled: CompileFn, bucket: Bucket
) -> None:
    artifact = compiled(classifier_dir)
    fields: dict[str, Any] = {
        "queue": "q",
        "output": bucket.uri("out/"),
        "model": artifact.path,
        "allow_input": [bucket.uri("in/")],
        "multi_label": True,
        "threshold": 0.6,
    }
    spec: WorkerSpec = worker_spec(fields)
    assert spec.compile == CompileSpec(model=artifact.path)
    head = make_head(artifact, spec.output_format, calibrate=False)  # as worker.work does

    async def main() -> Any:
        async with Storage() as storage, Engine(artifact, StandInPool(), head=head) as engine:
            work = InlineWork("i1", [{"id": "d", "text": "a text"}])
            return await Executor(spec, storage, engine).do([work])

    asyncio.run(main())
    table = pq.read_table(io.BytesIO(bucket.get("out/inline/i1.parquet")))
    row = table.to_pylist()[0]
    # The stand-in's logits are [x, 0, 0], x = the token ids' sum / 1e4 (0.5033): sigmoid
    # gives [0.62, 0.5, 0.5] (softmax would not), and only the first reaches 0.6.
    np.testing.assert_allclose(row["scores"], [1 / (1 + np.exp(-0.5033)), 0.5, 0.5], atol=1e-6)
    assert (row["labels"], row["label"]) == (["negative"], "negative")
    described = json.loads(table.schema.metadata[b"batchjob"])
    assert (described["multi_label"], described["threshold"]) == (True, 0.6)


def test_serve_answers_carry_labels(
    multi_label_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    from tests.serve_process import JSONLINES, Server, jsonlines

    artifact = compiled(multi_label_dir)
    srv = Server(["--model", artifact.path, "--port", "0"], {"BATCHJOB_THRESHOLD": "0.5"}, tmp_path)
    try:
        srv.wait_ready()
        texts = ["a text", "the quick brown fox"]
        lines = srv.post(jsonlines([{"inputs": t} for t in texts]), JSONLINES)
        expected = pipeline_scores(multi_label_dir, texts)
        assert_matches_pipeline(lines, expected, TOPICS, 0.5)
    finally:
        assert srv.stop() == 0

"""Issue 14 §2, §3: zero-shot-classification (an NLI model, a row per candidate label) and
text-ranking (a cross-encoder's score, `rank` within a group), against transformers'
`pipeline("zero-shot-classification")` and sentence-transformers' `CrossEncoder.predict`,
with buckets and with packing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchjob.artifact import Artifact
from batchjob.batching import Shape
from batchjob.config import CompileSpec, RunSpec
from batchjob.errors import UsageError
from batchjob.output_format import OutputFormat, output_format
from batchjob.pair_tasks import TEXT_RANKING, ZERO_SHOT, PairOptions, assign_ranks
from tests.conftest import (
    CompileFn,
    assert_usage_error,
    invoke,
    long_text,
    make_texts,
    run_job,
    write_jsonl,
)
from tests.pair_models import BUCKETS, PACKED, TOPICS


def zero_shot_pipeline(model: Path, texts: list[str], labels: list[str], multi: bool) -> Any:
    from transformers import pipeline

    classify = pipeline("zero-shot-classification", model=str(model))
    return classify(texts, candidate_labels=labels, multi_label=multi)


def rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def run_zero_shot(
    artifact: Artifact, tmp_path: Path, records: list[dict[str, Any]], pairs: PairOptions, **kw: Any
) -> list[dict[str, Any]]:
    write_jsonl(tmp_path / "in" / "a.jsonl", records)
    fmt = OutputFormat(pairs=pairs, multi_label=kw.pop("multi_label", False))
    assert run_job(artifact.path, tmp_path / "in", tmp_path / "out", output_format=fmt, **kw) == 0
    return rows(tmp_path / "out" / "a.parquet")


def assert_as_pipeline(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for row, answer in zip(got, want, strict=True):
        assert row["error"] is None
        assert row["labels"] == answer["labels"]  # sorted by score, as the pipeline sorts
        np.testing.assert_allclose(row["scores"], answer["scores"], atol=1e-4)


# -- zero-shot-classification -----------------------------------------------------------------


@pytest.mark.parametrize("shapes", [BUCKETS, PACKED], ids=["buckets", "packing"])
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_zero_shot_equals_the_pipeline(
    nli_dir: Path, compiled: CompileFn, tmp_path: Path, shapes: tuple[Shape, ...], multi: bool
) -> None:
    texts = make_texts(10, seed=7, max_words=25)
    artifact = compiled(nli_dir, shapes=shapes, packing=len(shapes) == 1)
    assert artifact.strategy == ("packing" if len(shapes) == 1 else "buckets")
    pairs = PairOptions(ZERO_SHOT, tuple(TOPICS))
    records = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    got = run_zero_shot(artifact, tmp_path, records, pairs, multi_label=multi)
    assert_as_pipeline(got, zero_shot_pipeline(nli_dir, texts, TOPICS, multi))
    assert not any(row["truncated"] for row in got)
    meta = json.loads(pq.read_schema(tmp_path / "out" / "a.parquet").metadata[b"batchjob"])
    assert meta["task"] == ZERO_SHOT
    assert meta["multi_label"] is multi
    assert meta["entailment_id"] == 2


def test_each_record_its_own_labels_and_bad_ones_are_error_rows(
    nli_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    texts = make_texts(4, seed=8, max_words=12)
    own = [["red", "green"], ["a"], ["x", "y", "z"], ["sports", "music", "art", "law"]]
    records: list[dict[str, Any]] = [
        {"id": f"r{i}", "text": t, "labels": labels}
        for i, (t, labels) in enumerate(zip(texts, own, strict=True))
    ]
    records += [
        {"id": "none", "text": "no labels"},
        {"id": "empty", "text": "empty", "labels": []},
        {"id": "mixed", "text": "numbers", "labels": ["a", 1]},
    ]
    pairs = PairOptions(ZERO_SHOT, candidate_labels_field="labels", hypothesis_template="It is {}")
    got = run_zero_shot(compiled(nli_dir, shapes=BUCKETS), tmp_path, records, pairs)
    from transformers import pipeline

    classify = pipeline("zero-shot-classification", model=str(nli_dir))
    for row, text, labels in zip(got, texts, own, strict=False):
        want = classify(text, candidate_labels=labels, hypothesis_template="It is {}")
        assert_as_pipeline([row], [want])
    errors = {row["id"]: row["error"] for row in got[4:]}
    assert "a.jsonl line 5 (id none): missing field 'labels'" in errors["none"]
    assert "(id empty): field 'labels' holds no candidate labels" in errors["empty"]
    assert "(id mixed): field 'labels' must be a list of strings" in errors["mixed"]
    assert all(row["labels"] is None for row in got[4:])


def test_a_long_premise_is_cut_not_the_hypothesis(
    nli_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    """only_first, as the pipeline: at the compiled length the premise is cut, the
    hypothesis whole (the pipeline run with the same max length)."""
    from transformers import AutoTokenizer, pipeline

    artifact = compiled(nli_dir, shapes=BUCKETS)
    texts = [long_text(70, seed=s) for s in range(3)]
    got = run_zero_shot(
        artifact, tmp_path, [{"text": t} for t in texts], PairOptions(ZERO_SHOT, tuple(TOPICS))
    )
    tokenizer = AutoTokenizer.from_pretrained(str(nli_dir), model_max_length=64)
    classify = pipeline("zero-shot-classification", model=str(nli_dir), tokenizer=tokenizer)
    assert_as_pipeline(got, classify(texts, candidate_labels=TOPICS))
    assert [row["truncated"] for row in got] == [True, True, True]


def test_zero_shot_refusals(nli_dir: Path, classifier_dir: Path, compiled: CompileFn) -> None:
    with pytest.raises(UsageError, match="has no \\{\\} where the label should go"):
        PairOptions(ZERO_SHOT, ("a",), hypothesis_template="This example is.")
    with pytest.raises(UsageError, match="apply to --task zero-shot-classification"):
        output_format({"candidate_labels": "a,b"})
    with pytest.raises(UsageError, match="--long-documents chunk is not supported"):
        RunSpec(
            model="m",
            input="i",
            output="o",
            compile=CompileSpec(model="m"),
            long_documents="chunk",
            output_format=OutputFormat(pairs=PairOptions(ZERO_SHOT, ("a",))),
        )
    from batchjob.output_format import make_head

    no_entailment = compiled(classifier_dir)
    fmt = OutputFormat(pairs=PairOptions(ZERO_SHOT, ("a",)))
    with pytest.raises(UsageError, match="negative, neutral, positive"):
        make_head(no_entailment, fmt, calibrate=False)


def test_cli_zero_shot_without_labels_exits_2(
    nli_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    argv = ["run", "--model", str(nli_dir), "--input", str(tmp_path / "in.jsonl")]
    argv += ["--output", str(tmp_path / "out"), "--task", ZERO_SHOT]
    assert_usage_error(*invoke(argv, capsys), ("--candidate-labels",))
    code, out, err = invoke(
        [*argv, "--candidate-labels", "a", "--hypothesis-template", "x"], capsys
    )
    assert_usage_error(code, out, err, ("--hypothesis-template", "has no {}"))


# -- text-ranking -----------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [BUCKETS, PACKED], ids=["buckets", "packing"])
def test_ranking_equals_cross_encoder_predict(
    cross_encoder_dir: Path, compiled: CompileFn, tmp_path: Path, shapes: tuple[Shape, ...]
) -> None:
    from sentence_transformers import CrossEncoder

    queries = make_texts(3, seed=10, max_words=6)
    passages = make_texts(12, seed=11, max_words=20)
    records = [
        {"id": f"{q}-{p}", "q": queries[q], "p": passages[p], "qid": q}
        for p in range(12)
        for q in (p % 3,)
    ]
    artifact = compiled(cross_encoder_dir, shapes=shapes, packing=len(shapes) == 1)
    write_jsonl(tmp_path / "in" / "a.jsonl", records)
    fmt = OutputFormat(pairs=PairOptions(TEXT_RANKING, group_field="qid"))
    code = run_job(
        artifact.path,
        tmp_path / "in",
        tmp_path / "out",
        output_format=fmt,
        text_field="q",
        text_pair_field="p",
    )
    assert code == 0
    got = rows(tmp_path / "out" / "a.parquet")
    want = CrossEncoder(str(cross_encoder_dir)).predict([(r["q"], r["p"]) for r in records])
    np.testing.assert_allclose([row["score"] for row in got], want, atol=1e-4)
    assert not np.allclose(want, want[0])  # scores that tell passages apart
    for q in range(3):
        mine = [i for i, r in enumerate(records) if r["qid"] == q]
        order = sorted(mine, key=lambda i: -want[i])
        assert [got[i]["rank"] for i in order] == list(range(1, len(mine) + 1))


def test_ranks_ties_keep_input_order_and_errors_get_none() -> None:
    values: list[dict[str, Any] | None] = [
        {"score": 0.5},
        {"score": 0.9},
        None,
        {"score": 0.5},
        {"score": 0.1},
        {"score": 0.7},
    ]
    assign_ranks(values, ["a", "a", "a", "a", "b", None])
    assert [None if v is None else v.get("rank") for v in values] == [2, 1, None, 3, 1, None]


def test_ranking_refusals(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchjob.output_format import make_head

    with pytest.raises(UsageError, match="num_labels=1"):
        make_head(
            compiled(classifier_dir), OutputFormat(pairs=PairOptions(TEXT_RANKING)), calibrate=False
        )
    with pytest.raises(UsageError, match="--group-field applies to --task text-ranking"):
        output_format({"group_field": "q"})
    write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    argv = ["run", "--model", str(classifier_dir), "--input", str(tmp_path / "in.jsonl")]
    argv += ["--output", str(tmp_path / "out"), "--task", TEXT_RANKING]
    assert_usage_error(*invoke(argv, capsys), ("--text-pair-field",))


def test_readers_take_labels_and_groups_from_csv_and_parquet(tmp_path: Path) -> None:
    import io

    import pyarrow as pa

    from batchjob.records import Fields, read_records

    fields = Fields(candidate_labels="labels", group="q")
    body = b'id,text,labels,q\na,hello,"x, y",1\nb,bye,"[""p"", ""q""]",2\nc,none,,3\n'
    (records,) = read_records(io.BytesIO(body), "csv", "r.csv", fields)
    assert [r.candidate_labels for r in records[:2]] == [("x", "y"), ("p", "q")]
    assert [r.group for r in records[:2]] == ["1", "2"]
    assert records[2].error == "r.csv row 3 (id c): field 'labels' holds no candidate labels"
    table = pa.table({"text": ["t1", "t2"], "labels": [["a", "b"], None], "q": [7, 7]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    buffer.seek(0)
    (records,) = read_records(buffer, "parquet", "r.parquet", fields)
    assert (records[0].candidate_labels, records[0].group) == (("a", "b"), "7")
    assert records[1].error == (
        "r.parquet row 2 (id r.parquet:2): field 'labels' must be a list of strings "
        "(the candidate labels)"
    )


def test_a_job_file_takes_the_pair_options(tmp_path: Path) -> None:
    from batchjob.config import run_spec
    from batchjob.job_files import load_job_file

    job = tmp_path / "job.yaml"
    job.write_text(
        "model: m\ninput: i\noutput: o\ntask: zero-shot-classification\n"
        "candidate_labels: [urgent, not urgent]\nhypothesis_template: 'It is {}.'\n"
        "multi_label: true\n"
    )
    spec = run_spec(load_job_file(str(job)))
    assert spec.compile.task == "text-classification"
    assert spec.output_format.pairs == PairOptions(
        ZERO_SHOT, ("urgent", "not urgent"), hypothesis_template="It is {}."
    )
    job.write_text("model: m\ninput: i\noutput: o\ntask: text-ranking\ngroup_field: 3\n")
    with pytest.raises(UsageError, match="group_field"):
        run_spec(load_job_file(str(job)))

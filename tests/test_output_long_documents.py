"""Issue 13 §2 and §4 together: long documents (chunk rows, the mean of windows) with kept
columns and embedding post-processing. The embedder (cut, renormalise, quantise) comes last,
to each row's final embedding; kept columns are repeated on every window row; the files
record the prompt and the long-document mode actually used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchjob.batching import Shape
from batchjob.embeddings import quantize
from batchjob.output_format import output_format
from batchjob.results import Result, Span
from batchjob.serve_formats import record_object
from tests.conftest import CompileFn, long_text, run_job, write_jsonl

TEXTS = ["short one", long_text(120, 1), long_text(40, 2), "", long_text(90, 3)]


def _run(artifact: str, src: Path, out: Path, **fields: Any) -> pa.Table:
    text = {k: fields.pop(k) for k in ("long_documents", "chunk_overlap", "prompt") if k in fields}
    assert run_job(artifact, src, out, output_format=output_format(fields), **text) == 0
    return pq.read_table(out / "docs.parquet")


def _input(tmp_path: Path) -> Path:
    rows: list[dict[str, object]] = [
        {"id": str(i), "text": t, "url": f"u{i}"} for i, t in enumerate(TEXTS)
    ]
    write_jsonl(tmp_path / "in" / "docs.jsonl", rows)
    return tmp_path / "in"


def test_chunk_rows_keep_columns_and_cut_each_windows_embedding(
    tmp_path: Path, compiled: CompileFn, embedder_dir: Path
) -> None:
    artifact = compiled(embedder_dir, shapes=(Shape(32, 4),)).path
    src = _input(tmp_path)
    text = {"long_documents": "chunk", "chunk_overlap": 6, "prompt": "q: "}
    plain = _run(artifact, src, tmp_path / "plain", **text)
    both = _run(artifact, src, tmp_path / "both", **text, keep_columns="url", embedding_dim=12)

    assert both.column_names == [
        *("id", "url", "chunk", "char_start", "char_end"),
        *("embedding", "truncated", "error"),
    ]
    assert both.schema.field("embedding").type == pa.list_(pa.float32(), 12)
    rows, plain_rows = both.to_pylist(), plain.to_pylist()
    assert len(rows) == len(plain_rows) > len(TEXTS)  # long ones split into windows
    assert sum(r["id"] == "1" for r in rows) > 1
    for row, ref in zip(rows, plain_rows, strict=True):
        assert row["url"] == f"u{row['id']}"  # the document's, on each of its windows
        spans = ("id", "chunk", "char_start", "char_end")
        assert [row[k] for k in spans] == [ref[k] for k in spans]
        cut = np.asarray(ref["embedding"][:12], dtype=np.float64)
        np.testing.assert_allclose(row["embedding"], cut / np.linalg.norm(cut), atol=1e-6)

    # The files say which prompt and mode made them (the resolved options, not the artifact's).
    described = json.loads(pq.read_schema(tmp_path / "both" / "docs.parquet").metadata[b"batchjob"])
    assert (described["prompt"], described["long_documents"]) == ("q: ", "chunk")
    assert described["keep_columns"] == ["url"]
    assert described["embedding"]["dim"] == 12
    manifest = json.loads((tmp_path / "both" / "_manifest.json").read_text())
    assert manifest["output_format"] == described


def test_mean_with_int8_quantises_the_mean_and_calibrates_on_it(
    tmp_path: Path, compiled: CompileFn, embedder_dir: Path
) -> None:
    artifact = compiled(embedder_dir, shapes=(Shape(32, 4),)).path
    src = _input(tmp_path)
    text = {"long_documents": "mean", "chunk_overlap": 6}
    floats = _run(artifact, src, tmp_path / "float", **text)
    ints = _run(artifact, src, tmp_path / "int8", **text, embedding_precision="int8")

    assert ints.schema.field("embedding").type == pa.list_(pa.int8(), 32)
    assert ints.column("id").to_pylist() == [str(i) for i in range(len(TEXTS))]  # a row each
    means = np.array(floats.column("embedding").to_pylist(), dtype=np.float32)
    described = json.loads(pq.read_schema(tmp_path / "int8" / "docs.parquet").metadata[b"batchjob"])
    assert described["long_documents"] == "mean"
    ranges = np.array(described["embedding"]["ranges"], dtype=np.float32)
    # Calibrated on the records' final (mean, normalised) embeddings, not on their windows'.
    np.testing.assert_allclose(ranges, [means.min(axis=0), means.max(axis=0)], atol=1e-6)
    got = np.array(ints.column("embedding").to_pylist(), dtype=int)
    expected = quantize(means, "int8", ranges).astype(int)
    assert np.abs(got - expected).max() <= 1  # a value on a bucket's edge may land one off


def test_a_chunked_answer_carries_kept_columns_first_at_the_record_level() -> None:
    windows = (
        (Span(0, 0, 5), {"embedding": np.ones(2, np.float32)}),
        (Span(1, 3, 9), {"embedding": np.zeros(2, np.float32)}),
    )
    answer = record_object(Result(None, chunks=windows), ("url", "lang"), ("u", "fr"))
    assert list(answer) == ["url", "lang", "chunks", "truncated"]
    assert answer["url"] == "u"
    assert answer["chunks"][1] == {
        "chunk": 1,
        "char_start": 3,
        "char_end": 9,
        "embedding": [0.0, 0.0],
    }


def test_job_files_take_both_sets_of_fields(tmp_path: Path) -> None:
    from batchjob.config import run_spec, worker_spec
    from batchjob.embeddings import EmbeddingSpec
    from batchjob.job_files import load_job_file

    both = "long-documents: mean\nprompt: 'q: '\nkeep-columns: [url]\nembedding-dim: 8\n"
    job = tmp_path / "run.yaml"
    job.write_text("model: m\ninput: i\noutput: o\nrecords-per-read: 64\n" + both)
    spec = run_spec(load_job_file(str(job), "run"))
    assert (spec.long_documents, spec.prompt, spec.records_per_read) == ("mean", "q: ", 64)
    assert spec.output_format.keep_columns == ("url",)
    assert spec.output_format.embedding == EmbeddingSpec(dim=8)
    job = tmp_path / "worker.yaml"
    job.write_text("model: m\nqueue: q\noutput: s3://b/o/\nallow-any-input: true\n" + both)
    worker = worker_spec(load_job_file(str(job), "worker"))
    assert (worker.long_documents, worker.prompt) == ("mean", "q: ")
    assert worker.output_format.keep_columns == ("url",)

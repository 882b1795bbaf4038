"""Issue 13 §4: outputs a user can load anywhere. Kept input columns, embeddings as
fixed-size vectors (read back by pyarrow, pandas and DuckDB), Matryoshka truncation and
precisions equal to sentence-transformers', and files that describe themselves."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjob.batching import Shape
from batchjob.config import RunSpec
from batchjob.embeddings import Embedder, EmbeddingSpec, quantize
from batchjob.errors import UsageError
from batchjob.output_format import OutputFormat, output_format, parse_keep_columns
from tests.conftest import (
    LABELS,
    CompileFn,
    assert_usage_error,
    invoke,
    make_texts,
    run_job,
    write_jsonl,
)

SHAPES = (Shape(16, 4), Shape(32, 2))


def metadata(path: Path) -> dict[str, Any]:
    schema_metadata = pq.read_schema(path).metadata
    data: dict[str, Any] = json.loads(schema_metadata[b"batchjob"])
    return data


def manifest(output: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((output / "_manifest.json").read_text())
    return data


def embed_run(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path, texts: list[str], **fields: Any
) -> Path:
    """`run` over `texts` (one jsonl shard) with these output flags → the output file."""
    artifact = compiled(embedder_dir, SHAPES)
    write_jsonl(
        tmp_path / "in" / "a.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    )
    out = tmp_path / "out"
    code = run_job(artifact.path, tmp_path / "in", out, output_format=output_format(fields))
    assert code == 0
    return out / "a.parquet"


def sentence_transformer(embedder_dir: Path, **kwargs: Any) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedder_dir), device="cpu", **kwargs)
    model.max_seq_length = SHAPES[-1].seq_len
    return model


# -- embeddings ------------------------------------------------------------------------------


def test_embeddings_are_fixed_size_vectors_every_reader_takes(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    texts = make_texts(20, seed=1)
    path = embed_run(embedder_dir, compiled, tmp_path, texts)
    table = pq.read_table(path)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    # pandas: one numpy vector of the model's dimension per row.
    frame = pd_read(path)
    assert [len(v) for v in frame["embedding"]] == [32] * len(texts)
    # What a reader needs is in the file and in the manifest, the same.
    described = metadata(path)
    assert described["task"] == "feature-extraction"
    embedding = described["embedding"]
    assert embedding["dim"] == embedding["model_dim"] == 32
    assert (embedding["pooling"], embedding["normalize"]) == ("mean", True)
    assert embedding["precision"] == "float32"
    assert embedding["type"] == "fixed_size_list<item: float>[32]"
    assert manifest(tmp_path / "out")["output_format"] == described


def pd_read(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path)


def test_duckdb_reads_the_vectors(embedder_dir: Path, compiled: CompileFn, tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    path = embed_run(embedder_dir, compiled, tmp_path, make_texts(12, seed=2))
    con = duckdb.connect()
    sizes = con.execute(f"SELECT len(embedding) FROM read_parquet('{path}')").fetchall()
    assert sizes == [(32,)] * 12
    # Parquet has no fixed-size list: read_parquet gives FLOAT[]. Through Arrow (pyarrow
    # restores the type from the file), DuckDB's own fixed-size ARRAY: what VSS indexes.
    con.register("vectors", pq.read_table(path))
    kind = con.execute("SELECT typeof(embedding) FROM vectors LIMIT 1").fetchone()
    assert kind == ("FLOAT[32]",)
    similarity = con.execute(
        "SELECT array_cosine_similarity(embedding, embedding) FROM vectors LIMIT 1"
    ).fetchone()
    assert similarity is not None
    assert similarity[0] == pytest.approx(1.0, abs=1e-5)


def test_embedding_type_list_keeps_the_variable_list(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    path = embed_run(embedder_dir, compiled, tmp_path, make_texts(5), embedding_type="list")
    assert pq.read_schema(path).field("embedding").type == pa.list_(pa.float32())


def test_embedding_dim_equals_sentence_transformers_truncate_dim(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    texts = make_texts(30, seed=4)
    path = embed_run(embedder_dir, compiled, tmp_path, texts, embedding_dim=8)
    assert pq.read_schema(path).field("embedding").type == pa.list_(pa.float32(), 8)
    got = np.array(pq.read_table(path).column("embedding").to_pylist(), dtype=np.float32)
    model = sentence_transformer(embedder_dir, truncate_dim=8)
    expected = model.encode(texts, normalize_embeddings=True)
    assert expected.shape == got.shape == (30, 8)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    described = metadata(path)["embedding"]
    assert (described["dim"], described["model_dim"]) == (8, 32)


def test_precisions_equal_quantize_embeddings() -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 20)).astype(np.float32)
    ranges = np.vstack((vectors.min(0) + 0.1, vectors.max(0) - 0.1)).astype(np.float32)
    np.testing.assert_array_equal(
        quantize(vectors, "int8", ranges), quantize_embeddings(vectors, "int8", ranges=ranges)
    )
    # batchjob's binary is sentence-transformers' ubinary: the packed bits as uint8.
    binary = quantize(vectors, "binary", None)
    assert binary.dtype == np.uint8
    assert binary.shape == (50, 3)
    np.testing.assert_array_equal(binary, quantize_embeddings(vectors, "ubinary"))
    assert quantize(vectors, "float16", None).dtype == np.float16


def test_int8_ranges_come_from_the_first_batch_and_can_be_given_again(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    texts = make_texts(40, seed=5)
    path = embed_run(embedder_dir, compiled, tmp_path, texts, embedding_precision="int8")
    assert pq.read_schema(path).field("embedding").type == pa.list_(pa.int8(), 32)
    described = metadata(path)["embedding"]
    assert described["ranges_from"] == "the job's first records"
    ranges = np.array(described["ranges"], dtype=np.float32)
    assert ranges.shape == (2, 32)
    assert (ranges[0] <= ranges[1]).all()
    got = np.array(pq.read_table(path).column("embedding").to_pylist(), dtype=np.int8)
    floats = sentence_transformer(embedder_dir).encode(texts)
    expected = quantize_embeddings(floats, "int8", ranges=ranges)
    # fp32 graph vs eager: a value on a bucket's edge may land one bucket off.
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert manifest(tmp_path / "out")["output_format"]["embedding"]["ranges"] == described["ranges"]

    # The manifest given back as --embedding-ranges: the same values, for another job.
    again = tmp_path / "again"
    again.mkdir()
    path2 = embed_run(
        embedder_dir,
        compiled,
        again,
        texts,
        embedding_precision="int8",
        embedding_ranges=str(tmp_path / "out" / "_manifest.json"),
    )
    assert metadata(path2)["embedding"]["ranges_from"] == "given"
    assert pq.read_table(path2).column("embedding").to_pylist() == got.tolist()


def test_binary_and_float16_outputs(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    texts = make_texts(10, seed=6)
    floats = sentence_transformer(embedder_dir).encode(texts)
    path = embed_run(embedder_dir, compiled, tmp_path, texts, embedding_precision="binary")
    assert pq.read_schema(path).field("embedding").type == pa.list_(pa.uint8(), 4)
    bits = np.unpackbits(np.array(pq.read_table(path).column("embedding").to_pylist(), np.uint8))
    expected_bits = (floats > 0).reshape(-1)
    # Only values within float noise of 0 may flip.
    flips = bits.astype(bool) != expected_bits
    assert np.abs(floats.reshape(-1)[flips]).max(initial=0) < 1e-4
    half = tmp_path / "half"
    half.mkdir()
    path = embed_run(embedder_dir, compiled, half, texts, embedding_precision="float16")
    assert pq.read_schema(path).field("embedding").type == pa.list_(pa.float16(), 32)
    got = np.array(pq.read_table(path).column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, floats, atol=2e-3)


def test_embedder_refuses_what_cannot_be() -> None:
    with pytest.raises(UsageError, match=r"--embedding-dim 64 is above the model's dimension"):
        Embedder(EmbeddingSpec(dim=64), model_dim=32, normalize=True)
    with pytest.raises(UsageError, match="needs --embedding-ranges"):
        Embedder(EmbeddingSpec(precision="int8"), model_dim=32, normalize=True, calibrate=False)
    with pytest.raises(UsageError, match="--embedding-precision must be one of"):
        EmbeddingSpec(precision="ubinary")
    with pytest.raises(UsageError, match="--embedding-type must be one of"):
        EmbeddingSpec(type="array")
    with pytest.raises(UsageError, match="goes with --embedding-precision int8"):
        EmbeddingSpec(ranges="r.json")


def test_bad_ranges_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text("[[0, 1], [1, 2]]")
    with pytest.raises(UsageError, match=r"r.json: expected \[\[min, ...\], \[max, ...\]\] of 4"):
        Embedder(EmbeddingSpec(precision="int8", ranges=str(bad)), model_dim=4, normalize=True)
    with pytest.raises(UsageError, match="can't read it"):
        Embedder(
            EmbeddingSpec(precision="int8", ranges=str(tmp_path / "none.json")),
            model_dim=4,
            normalize=True,
        )


# -- labels ----------------------------------------------------------------------------------


def test_classifier_files_name_their_labels(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in make_texts(6)])
    assert run_job(artifact.path, tmp_path / "in", tmp_path / "out") == 0
    described = metadata(tmp_path / "out" / "a.parquet")
    assert described["labels"] == list(LABELS)  # the order of `scores`
    assert described["function_to_apply"] == "softmax"
    assert "embedding" not in described
    assert manifest(tmp_path / "out")["output_format"]["labels"] == list(LABELS)


# -- kept columns ----------------------------------------------------------------------------


def keep_run(classifier_dir: Path, compiled: CompileFn, src: Path, out: Path, keep: str) -> int:
    artifact = compiled(classifier_dir)
    spec_format = OutputFormat(parse_keep_columns(keep))
    return run_job(artifact.path, src, out, output_format=spec_format)


def test_keep_columns_from_jsonl_and_csv_are_strings(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    write_jsonl(
        src / "a.jsonl",
        [
            {"id": "x1", "text": "one", "url": "https://a", "lang": "en"},
            {"id": "x2", "text": "two", "url": "https://b", "n": 7},
            {"id": "x3", "text": 5, "url": "https://c", "lang": None},  # an error row
            {"id": "x4", "text": "four", "url": {"nested": [1, "é"]}},
        ],
    )
    (src / "b.csv").write_text("id,text,url\nc1,hello,https://d\nc2,bye,\n")
    assert keep_run(classifier_dir, compiled, src, tmp_path / "out", "url,lang") == 0
    table = pq.read_table(tmp_path / "out" / "a.parquet")
    assert table.column_names[:3] == ["id", "url", "lang"]
    assert table.schema.field("url").type == pa.string()
    rows = table.to_pylist()
    assert [(r["url"], r["lang"]) for r in rows] == [
        ("https://a", "en"),
        ("https://b", None),  # missing: null, not an error
        ("https://c", None),
        ('{"nested": [1, "é"]}', None),  # not a string: its JSON text
    ]
    assert rows[1]["error"] is None
    assert rows[2]["error"] is not None
    csv_rows = pq.read_table(tmp_path / "out" / "b.parquet").to_pylist()
    assert [(r["url"], r["lang"]) for r in csv_rows] == [("https://d", None), ("", None)]
    assert metadata(tmp_path / "out" / "a.parquet")["keep_columns"] == ["url", "lang"]


def test_keep_columns_from_parquet_keep_their_arrow_types(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    when = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC)
    table = pa.table(
        {
            "text": ["a", "b", None],
            "n": pa.array([1, None, 3], pa.int16()),
            "meta": pa.array([{"k": 1}, {"k": 2}, None]),
            "at": pa.array([when, when, None], pa.timestamp("ms", tz="UTC")),
            "tags": pa.array([["x"], [], ["y", "z"]], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, src / "p.parquet")
    assert keep_run(classifier_dir, compiled, src, tmp_path / "out", "n,meta,at,tags,gone") == 0
    out = pq.read_table(tmp_path / "out" / "p.parquet")
    for name in ("n", "meta", "at", "tags"):
        assert out.schema.field(name).type == table.schema.field(name).type, name
    assert out.schema.field("gone").type == pa.string()
    rows = out.to_pylist()
    assert [r["n"] for r in rows] == [1, None, 3]
    assert [r["meta"] for r in rows] == [{"k": 1}, {"k": 2}, None]
    assert [r["at"] for r in rows] == [when, when, None]
    assert [r["tags"] for r in rows] == [["x"], [], ["y", "z"]]
    assert [r["gone"] for r in rows] == [None, None, None]
    assert rows[2]["error"] is not None  # its text was null: its kept values still came


def test_cli_refusals_are_one_line(
    classifier_dir: Path,
    embedder_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "x"}])
    base = ["run", "--input", str(tmp_path / "in"), "--replicas", "1", "--progress", "none"]
    classifier = compiled(classifier_dir).path
    embedder = compiled(embedder_dir, SHAPES).path
    cases = [
        (classifier, ["--keep-columns", "url,label"], ("--keep-columns", "'label'", "collides")),
        (classifier, ["--keep-columns", "error"], ("'error'", "collides")),
        (embedder, ["--keep-columns", "embedding"], ("'embedding'", "collides")),
        (embedder, ["--embedding-dim", "33"], ("--embedding-dim 33", "(32)")),
        (embedder, ["--embedding-precision", "int4"], ("--embedding-precision",)),
        (classifier, ["--embedding-dim", "8"], ("feature-extraction",)),
        (embedder, ["--keep-columns", "a,,b"], ("empty column name",)),
    ]
    for i, (model, flags, needles) in enumerate(cases):
        out = tmp_path / f"out{i}"
        argv = [*base, "--model", model, "--output", str(out), *flags]
        assert_usage_error(*invoke(argv, capsys), needles)
        assert not out.exists()  # refused before any work


def test_job_file_takes_the_output_fields(tmp_path: Path) -> None:
    from batchjob.config import run_spec
    from batchjob.job_files import load_job_file

    job = tmp_path / "job.yaml"
    job.write_text(
        "model: m\ninput: i\noutput: o\nkeep-columns: [url, lang]\n"
        "embedding-dim: 64\nembedding-precision: binary\n"
    )
    spec: RunSpec = run_spec(load_job_file(str(job)))
    assert spec.output_format.keep_columns == ("url", "lang")
    assert spec.output_format.embedding == EmbeddingSpec(dim=64, precision="binary")
    job.write_text("model: m\ninput: i\noutput: o\nembedding-dim: '64'\n")
    with pytest.raises(UsageError, match="embedding_dim must be an integer"):
        load_job_file(str(job))


def test_resume_of_an_int8_job_keeps_the_earlier_runs_ranges(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(embedder_dir, SHAPES)
    int8 = OutputFormat(embedding=EmbeddingSpec(precision="int8"))
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in make_texts(30, seed=8)])
    out = tmp_path / "out"
    assert run_job(artifact.path, tmp_path / "in", out, output_format=int8) == 0
    first = metadata(out / "a.parquet")["embedding"]["ranges"]
    # Another shard, of other texts: calibrated anew, its ranges would differ.
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": t} for t in make_texts(9, seed=99)])
    assert run_job(artifact.path, tmp_path / "in", out, output_format=int8, resume=True) == 0
    described = metadata(out / "b.parquet")["embedding"]
    assert described["ranges"] == first
    assert described["ranges_from"].startswith("the earlier run")
    # An earlier output's file holds them too: --embedding-ranges FILE.parquet.
    given = OutputFormat(embedding=EmbeddingSpec(precision="int8", ranges=str(out / "a.parquet")))
    assert run_job(artifact.path, tmp_path / "in", tmp_path / "again", output_format=given) == 0
    again = pq.read_table(tmp_path / "again" / "a.parquet").column("embedding").to_pylist()
    assert again == pq.read_table(out / "a.parquet").column("embedding").to_pylist()

    # No manifest (a run killed hard): refused, not quantised with other ranges.
    (out / "_manifest.json").unlink()
    write_jsonl(tmp_path / "in" / "c.jsonl", [{"text": "more"}])
    with pytest.raises(UsageError, match=r"no int8 ranges in .*give them with --embedding-ranges"):
        run_job(artifact.path, tmp_path / "in", out, output_format=int8, resume=True)
    assert not (out / "c.parquet").exists()

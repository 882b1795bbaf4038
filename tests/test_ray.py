"""Issue 15 §3: `batchjob.ray.Predictor` in Ray Data's `map_batches` on a local Ray: the
same results as `batchjob run` on the same documents, pyarrow and pandas batches, error rows
for bad records, every input column passed through, clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from batchjob.batching import Shape
from batchjob.errors import UsageError
from batchjob.ray import Predictor, actor_cpus
from tests.conftest import CompileFn, make_texts, run_job, write_jsonl

# Ray Data's own deprecations (its DataContext's setters, at ray.init) are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
N = 36  # documents: several Ray batches, several graph calls each


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module: 2 CPUs, no dashboard, nothing sent anywhere."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield
    finally:
        ray.shutdown()


def documents() -> list[dict[str, Any]]:
    """`N` documents with ids, some long enough to be truncated, and a null text."""
    rows: list[dict[str, Any]] = [
        {"id": f"d{i}", "text": t, "source": i * 10}
        for i, t in enumerate(make_texts(N, seed=3, max_words=60))
    ]
    rows[5]["text"] = None  # null: an error row
    return rows


def run_output(
    artifact: str, tmp_path: Path, rows: list[dict[str, Any]], **options: Any
) -> pa.Table:
    write_jsonl(tmp_path / "in" / "docs.jsonl", rows)
    assert run_job(artifact, tmp_path / "in", tmp_path / "out", **options) == 0
    return pq.read_table(tmp_path / "out" / "docs.parquet")


def ray_output(
    artifact: str, rows: list[dict[str, Any]], batch_format: str, **kwargs: Any
) -> pa.Table:
    """The rows through map_batches(Predictor): one Arrow table, in id order."""
    ds = ray.data.from_items(rows).map_batches(
        Predictor,
        fn_constructor_kwargs={"model": artifact, **kwargs},
        batch_format=batch_format,
        batch_size=10,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    order = sorted(range(table.num_rows), key=lambda i: int(table["id"][i].as_py()[1:]))
    # Through a Parquet file, as write_parquet writes it: the types as run's file has them.
    sink = pa.BufferOutputStream()
    pq.write_table(table.take(order), sink)
    return pq.read_table(pa.BufferReader(sink.getvalue()))


def assert_same_results(ours: pa.Table, run: pa.Table, columns: list[str]) -> None:
    # run's id for an error record is its place (file:line); ours is the input's own column.
    assert ours["id"].to_pylist() == [f"d{i}" for i in range(N)]
    assert run["id"].to_pylist() == [f"d{i}" for i in range(5)] + ["docs.jsonl:6"] + [
        f"d{i}" for i in range(6, N)
    ]
    for name in ("truncated", "error"):
        assert ours[name].type == run.schema.field(name).type
    assert ours["truncated"].to_pylist() == run["truncated"].to_pylist()
    errors = run["error"].to_pylist()
    assert errors == [None] * 5 + ["docs.jsonl line 6: field 'text' is null"] + [None] * (N - 6)
    # run names the place (file and line); a Ray row is its own place.
    assert ours["error"].to_pylist()[5] == "field 'text' is null"
    assert run["truncated"].to_pylist().count(True) > 0
    for name in columns:
        assert ours[name].type == run.schema.field(name).type, name
        mine, theirs = ours[name].to_pylist(), run[name].to_pylist()
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if errors[i] is not None:
                assert a is None
                assert b is None
            elif isinstance(b, str) or (isinstance(b, list) and all(isinstance(x, str) for x in b)):
                assert a == b, (name, i)
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)


def test_classification_equals_run_pyarrow(
    local_ray: None, classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir).path  # buckets 16 and 32: several graph calls a batch
    rows = documents()
    ours = ray_output(artifact, rows, "pyarrow")
    assert_same_results(ours, run_output(artifact, tmp_path, rows), ["label", "score", "scores"])
    # Every input column comes back as it went in.
    assert ours["source"].to_pylist() == [r["source"] for r in rows]
    assert ours["text"].to_pylist()[:3] == [r["text"] for r in rows[:3]]


def test_embeddings_equal_run_pandas(
    local_ray: None, embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(embedder_dir, (Shape(32, 2),), packing=True).path  # sequence packing
    rows = documents()
    ours = ray_output(artifact, rows, "pandas")
    assert ours.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert_same_results(ours, run_output(artifact, tmp_path, rows), ["embedding"])


def test_embedding_options_and_multi_label_as_run(
    local_ray: None, classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    """Options by run's flag names: multi-label classification adds `labels`, as run does."""
    from batchjob.output_format import output_format

    artifact = compiled(classifier_dir).path
    rows = documents()
    ours = ray_output(artifact, rows, "pyarrow", multi_label=True, threshold=0.3)
    fmt = output_format({"multi_label": True, "threshold": 0.3})
    run = run_output(artifact, tmp_path, rows, output_format=fmt)
    assert_same_results(ours, run, ["label", "score", "scores", "labels"])


def test_actor_threads_are_its_cpus(local_ray: None) -> None:
    assert actor_cpus() is None  # the driver: not an actor
    assert ray.get(ray.remote(num_cpus=2)(actor_cpus).remote()) == 2


def test_chunk_rows_repeat_their_input_row(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    """long_documents="chunk": a row per window, each with its document's input columns; the
    windows as run writes them. (In this process: the Predictor needs no Ray to run.)"""
    artifact = compiled(embedder_dir).path
    rows = [{"id": "short", "text": "a short one"}, {"id": "long", "text": " ".join(["word"] * 90)}]
    run = run_output(artifact, tmp_path, rows, long_documents="chunk", chunk_overlap=4)
    predictor = Predictor(artifact, long_documents="chunk", chunk_overlap=4)
    try:
        ours = predictor(pa.Table.from_pylist(rows))
    finally:
        predictor.close()
    assert ours["id"].to_pylist() == run["id"].to_pylist()
    assert ours["id"].to_pylist()[:2] == ["short", "long"]
    assert len(ours) > 3
    for name in ("chunk", "char_start", "char_end"):
        assert ours[name].to_pylist() == run[name].to_pylist()
        assert ours[name].type == run.schema.field(name).type
    np.testing.assert_allclose(
        np.stack(ours["embedding"].to_numpy(zero_copy_only=False)),
        np.stack(run["embedding"].to_numpy(zero_copy_only=False)),
        atol=1e-5,
    )


def test_refusals(classifier_dir: Path, compiled: CompileFn) -> None:
    artifact = compiled(classifier_dir).path
    with pytest.raises(UsageError, match=r"unknown option keep_columns; it takes model, task"):
        Predictor(artifact, keep_columns="a")
    with pytest.raises(UsageError, match=r"long_documents must be one of"):
        Predictor(artifact, long_documents="split")
    with pytest.raises(UsageError, match=r"--embedding-\* options apply to feature-extraction"):
        Predictor(artifact, embedding_dim=8)
    predictor = Predictor(artifact)
    try:
        with pytest.raises(UsageError, match=r"column 'label' has the name of an output column"):
            predictor(pa.table({"text": ["a b"], "label": ["gold"]}))
        with pytest.raises(UsageError, match=r"batch_format='pyarrow'"):
            predictor({"text": np.array(["a b"])})  # type: ignore[arg-type]
        missing = predictor(pa.table({"body": ["a b", "c"]}))
        assert missing["error"].to_pylist() == ["missing column 'text' (columns: body)"] * 2
        assert predictor(pa.table({"text": pa.array([], pa.string())})).num_rows == 0
        numbers = predictor(pa.table({"text": [1, 2]}))
        assert numbers["error"].to_pylist() == ["field 'text' must be a string, got int64"] * 2
    finally:
        predictor.close()


def test_bad_pandas_records_are_error_rows(classifier_dir: Path, compiled: CompileFn) -> None:
    """A pandas object column of mixed values: each bad one an error row, never an exception."""
    import pandas as pd

    predictor = Predictor(compiled(classifier_dir).path)
    try:
        frame = pd.DataFrame({"text": ["fine text", float("nan"), 17, None, "also fine"]})
        out = predictor(frame)
        assert out["error"].tolist()[1:4] == [
            "field 'text' is null",
            "field 'text' must be a string, got int",
            "field 'text' is null",
        ]
        assert pd.isna(out["error"][0])
        assert pd.isna(out["error"][4])
        assert out["label"].notna().tolist() == [True, False, False, False, True]
        assert list(out.index) == list(frame.index)
    finally:
        predictor.close()


def test_batchjob_imports_without_ray() -> None:
    code = (
        "import sys; import batchjob.cli, batchjob.runner, batchjob.serving, batchjob.worker; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""`batchjob run` end to end: real replicas, real files, results checked against
Hugging Face `pipeline` and sentence-transformers record for record."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjob.batching import Shape
from batchjob.cli import main
from tests.conftest import CompileFn, make_texts, run_job, write_jsonl


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def manifest(output: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((output / "_manifest.json").read_text())
    return data


@pytest.mark.parametrize(
    ("shapes", "packing", "replicas"),
    [
        ((Shape(16, 4), Shape(32, 2)), False, 1),
        ((Shape(8, 3), Shape(16, 5), Shape(24, 1), Shape(32, 7)), False, 2),
        ((Shape(32, 6),), False, 2),
        ((Shape(32, 3),), True, 1),
        ((Shape(32, 5),), True, 2),
    ],
    ids=[
        "2-buckets-1-replica",
        "4-buckets-2-replicas",
        "single-shape-2-replicas",
        "packed-1-replica",
        "packed-2-replicas",
    ],
)
def test_classification_equals_pipeline(
    classifier_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
    shapes: tuple[Shape, ...],
    packing: bool,
    replicas: int,
) -> None:
    from transformers import pipeline

    artifact = compiled(classifier_dir, shapes, packing=packing)
    assert artifact.strategy == ("packing" if packing else "buckets")
    texts = make_texts(120, seed=len(shapes))
    write_jsonl(
        tmp_path / "in" / "part.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]
    )
    assert run_job(artifact.path, tmp_path / "in", tmp_path / "out", replicas=replicas) == 0

    rows = read_rows(tmp_path / "out" / "part.parquet")
    pipe = pipeline("text-classification", model=str(classifier_dir), device="cpu", top_k=None)
    expected = pipe(texts, truncation=True, max_length=artifact.max_length, batch_size=1)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(texts))]
    assert any(r["truncated"] for r in rows), "the corpus should exercise truncation"
    for row, want in zip(rows, expected, strict=True):
        by_label = {d["label"]: d["score"] for d in want}
        best = max(want, key=lambda d: d["score"])
        assert row["error"] is None
        assert row["label"] == best["label"]
        assert row["score"] == pytest.approx(best["score"], abs=1e-4)
        assert row["scores"] == pytest.approx(
            [by_label[label] for label in artifact.labels], abs=1e-4
        )


@pytest.mark.parametrize("packing", [False, True], ids=["buckets", "packed"])
def test_text_pairs_equal_pipeline(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path, packing: bool
) -> None:
    from transformers import pipeline

    shapes = (Shape(32, 4),) if packing else (Shape(16, 4), Shape(32, 2))
    artifact = compiled(classifier_dir, shapes, packing=packing)
    firsts, seconds = make_texts(30, seed=5), make_texts(30, seed=6)
    write_jsonl(
        tmp_path / "in" / "pairs.jsonl",
        [{"q": a, "p": b} for a, b in zip(firsts, seconds, strict=True)],
    )
    code = run_job(
        artifact.path,
        tmp_path / "in",
        tmp_path / "out",
        replicas=1,
        text_field="q",
        text_pair_field="p",
    )
    assert code == 0
    rows = read_rows(tmp_path / "out" / "pairs.parquet")
    pipe = pipeline("text-classification", model=str(classifier_dir), device="cpu")
    for i, (row, a, b) in enumerate(zip(rows, firsts, seconds, strict=True)):
        want = pipe({"text": a, "text_pair": b}, truncation=True, max_length=artifact.max_length)
        assert row["id"] == f"pairs.jsonl:{i + 1}"
        assert row["label"] == want["label"]
        assert row["score"] == pytest.approx(want["score"], abs=1e-4)


@pytest.mark.parametrize("packing", [False, True], ids=["buckets", "packed"])
def test_embeddings_equal_sentence_transformers(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path, packing: bool
) -> None:
    from sentence_transformers import SentenceTransformer

    shapes = (Shape(32, 3),) if packing else (Shape(8, 4), Shape(16, 3), Shape(32, 2))
    artifact = compiled(embedder_dir, shapes, packing=packing)
    texts = make_texts(80, seed=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.txt").write_text("\n".join(texts) + "\n")
    assert run_job(artifact.path, tmp_path / "in", tmp_path / "out", replicas=2) == 0

    rows = read_rows(tmp_path / "out" / "docs.parquet")
    model = SentenceTransformer(str(embedder_dir), device="cpu")
    model.max_seq_length = artifact.max_length
    expected = model.encode(texts, batch_size=16, normalize_embeddings=False)
    got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    assert [r["id"] for r in rows] == [f"docs.txt:{i + 1}" for i in range(len(texts))]
    cosine = (
        (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() >= 0.9999
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)


def test_bf16_close_to_fp32(classifier_dir: Path, compiled: CompileFn, tmp_path: Path) -> None:
    shapes = (Shape(16, 8), Shape(32, 4))
    texts = make_texts(300, seed=7)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts])
    results = {}
    for dtype in ("fp32", "bf16"):
        artifact = compiled(classifier_dir, shapes, dtype)
        assert run_job(artifact.path, tmp_path / "in", tmp_path / dtype, replicas=2) == 0
        results[dtype] = read_rows(tmp_path / dtype / "a.parquet")
    same = sum(
        a["label"] == b["label"] for a, b in zip(results["fp32"], results["bf16"], strict=True)
    )
    assert same / len(texts) >= 0.99


def test_every_format_and_bad_records(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir)
    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    (src / "a.jsonl").write_text(
        '{"id": "x1", "text": "fine"}\nnot json\n'
        '{"id": "x3", "text": 7}\n{"id": "x4", "text": "ok"}\n'
    )
    with gzip.open(src / "nested" / "b.csv.gz", "wt") as f:
        f.write('text,id\nhello there,c1\n"unbalanced,c2,extra\nbye,c3\n')
    pq.write_table(pa.table({"text": ["p one", None, "p three"]}), src / "c.parquet")
    (src / "d.txt").write_text("line one\n\nline three\n")
    (src / "empty.jsonl").write_text("")
    (src / "notes.md").write_text("skipped: not a shard format\n")
    assert run_job(artifact.path, src, tmp_path / "out", replicas=1) == 0

    out = tmp_path / "out"
    a = read_rows(out / "a.parquet")
    assert [r["id"] for r in a] == ["x1", "a.jsonl:2", "a.jsonl:3", "x4"]
    assert [r["error"] is None for r in a] == [True, False, False, True]
    assert "invalid JSON" in a[1]["error"]
    assert "line 2" in a[1]["error"]
    assert "'text'" in a[2]["error"]
    assert "int" in a[2]["error"]
    assert a[1]["label"] is None
    assert a[0]["label"] is not None
    b = read_rows(out / "nested" / "b.parquet")
    assert b[0]["id"] == "c1"
    assert b[0]["error"] is None
    assert b[1]["error"] is not None
    assert b[1]["id"].startswith("nested/b.csv.gz:")
    c = read_rows(out / "c.parquet")
    assert [r["id"] for r in c] == ["c.parquet:1", "c.parquet:2", "c.parquet:3"]
    assert "null" in c[1]["error"]
    assert [r["id"] for r in read_rows(out / "d.parquet")] == ["d.txt:1", "d.txt:3"]
    assert read_rows(out / "empty.parquet") == []
    assert pq.read_schema(out / "empty.parquet").names == [
        "id",
        "label",
        "score",
        "scores",
        "truncated",
        "error",
    ]
    m = manifest(out)
    assert sorted(m["shards"]["done"]) == sorted(
        ["a.jsonl", "c.parquet", "d.txt", "empty.jsonl", "nested/b.csv.gz"]
    )
    assert m["counts"]["documents"] == 4 + len(b) + 3 + 2
    assert m["counts"]["errors"] == 2 + sum(r["error"] is not None for r in b) + 1
    assert not list(out.rglob("*.tmp"))


def test_resume_skips_done_shards(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir)
    for name in ("s1", "s2", "s3"):
        write_jsonl(tmp_path / "in" / f"{name}.jsonl", [{"text": t} for t in make_texts(10)])
    out = tmp_path / "out"
    assert run_job(artifact.path, tmp_path / "in", out, replicas=1) == 0
    first = read_rows(out / "s2.parquet")
    (out / "s2.parquet").unlink()
    before = (out / "s1.parquet").stat().st_mtime_ns
    assert run_job(artifact.path, tmp_path / "in", out, replicas=1, resume=True) == 0
    assert read_rows(out / "s2.parquet") == first
    assert (out / "s1.parquet").stat().st_mtime_ns == before
    assert manifest(out)["shards"] | {} == {
        "done": ["s2.jsonl"],
        "skipped": ["s1.jsonl", "s3.jsonl"],
        "failed": [],
    }


def test_unreadable_shard_is_recorded_and_the_rest_completes(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir)
    write_jsonl(tmp_path / "in" / "good.jsonl", [{"text": "fine"}])
    (tmp_path / "in" / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-20])
    assert run_job(artifact.path, tmp_path / "in", tmp_path / "out", replicas=1) == 1
    m = manifest(tmp_path / "out")
    assert m["shards"]["done"] == ["good.jsonl"]
    assert [f["shard"] for f in m["shards"]["failed"]] == ["broken.jsonl.gz"]
    assert "gzip" in m["shards"]["failed"][0]["error"]
    assert not (tmp_path / "out" / "broken.parquet").exists()


def test_replica_killed_mid_job_loses_nothing(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batchjob.replicas")
    artifact = compiled(classifier_dir, (Shape(32, 2),))
    texts = make_texts(3000, seed=11)
    write_jsonl(
        tmp_path / "in" / "big.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    )
    killed: list[int] = []
    pids: list[int] = []
    ready = threading.Event()

    class OnReady(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.search(r"ready in .* \(pid (\d+)", record.getMessage())
            if match:
                pids.append(int(match.group(1)))
            if "pool ready" in record.getMessage():
                ready.set()

    def kill_one_replica() -> None:
        if ready.wait(60) and pids:
            time.sleep(0.3)  # let the pool get busy
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    handler = OnReady()
    logging.getLogger("batchjob.replicas").addHandler(handler)
    killer = threading.Thread(target=kill_one_replica)
    killer.start()
    try:
        assert run_job(artifact.path, tmp_path / "in", tmp_path / "out", replicas=2) == 0
    finally:
        ready.set()
        killer.join()
        logging.getLogger("batchjob.replicas").removeHandler(handler)
    assert killed
    rows = read_rows(tmp_path / "out" / "big.parquet")
    assert [r["id"] for r in rows] == [str(i) for i in range(len(texts))]
    assert all(r["error"] is None and r["label"] is not None for r in rows)
    assert manifest(tmp_path / "out")["counts"]["replica_restarts"] == 1


def test_job_file_with_flag_override(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"body": "from a job file"}])
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {artifact.path}\ninput: {tmp_path / 'in'}\noutput: {tmp_path / 'ignored'}\n"
        "text-field: body\nreplicas: 1\nprogress: none\n"
    )
    assert main(["run", "--job", str(job), "--output", str(tmp_path / "out")]) == 0
    assert read_rows(tmp_path / "out" / "a.parquet")[0]["error"] is None
    assert not (tmp_path / "ignored").exists()

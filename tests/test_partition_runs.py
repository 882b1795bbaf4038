"""Partitioned runs end to end, on local files with real replicas: three parts write what one
run writes, each shard in exactly one part; a part killed mid-run and rerun with --resume
loses no record and duplicates none; an empty part is a success that says so."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchjob.partitions import part_of
from batchjob.shards import shard
from tests.conftest import (
    CompileFn,
    assert_usage_error,
    invoke,
    make_texts,
    run_job,
    write_jsonl,
)
from tests.test_kill_resume import STARTUP, ids_in, wait_until

SHARDS, PER_SHARD, PARTS = 45, 30, 3


def make_input(root: Path) -> dict[str, list[str]]:
    """Shards in nested directories, ids unique across them: rel → ids in order."""
    expected = {}
    for k in range(SHARDS):
        rel = f"d{k % 3}/s{k:02d}.jsonl"
        ids = [f"s{k:02d}-{i}" for i in range(PER_SHARD)]
        rows = [
            {"id": i, "text": t}
            for i, t in zip(ids, make_texts(PER_SHARD, seed=k, max_words=12), strict=True)
        ]
        write_jsonl(root / rel, rows)
        expected[rel] = ids
    return expected


def parquet_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*.parquet")}


def output_of(rel: str) -> str:
    return rel.removesuffix(".jsonl") + ".parquet"


def part_manifest(out: Path, index: int) -> dict[str, Any]:
    """The latest run record of part `index` (each run or part writes its own)."""
    records = [json.loads(p.read_text()) for p in sorted((out / "_batchjob/runs").glob("*.json"))]
    mine = [r for r in records if r.get("partition", {}).get("index") == index]
    assert mine, f"no run record of part {index} in {out}"
    latest: dict[str, Any] = mine[-1]
    return latest


@dataclass
class Runs:
    expected: dict[str, list[str]]
    whole: Path  # one run over everything
    parts: Path  # three partitioned runs into one output
    codes: list[int]


@pytest.fixture(scope="module")
def runs(
    classifier_dir: Path, compiled: CompileFn, tmp_path_factory: pytest.TempPathFactory
) -> Runs:
    artifact = compiled(classifier_dir).path
    tmp = tmp_path_factory.mktemp("partitions")
    expected = make_input(tmp / "in")
    codes = [run_job(artifact, tmp / "in", tmp / "whole")]
    for i in range(PARTS - 1):
        codes.append(run_job(artifact, tmp / "in", tmp / "parts", partition=f"{i}/{PARTS}"))
    # The last part reads an --input-manifest naming the same shards, in another order.
    manifest = tmp / "shards.json"
    manifest.write_text(json.dumps([{"prefix": str(tmp / "in")}, *sorted(expected, reverse=True)]))
    spec = {"input_manifest": str(manifest), "partition": f"{PARTS - 1}/{PARTS}"}
    codes.append(run_job(artifact, "", tmp / "parts", **spec))
    return Runs(expected, tmp / "whole", tmp / "parts", codes)


def test_three_parts_write_what_one_run_writes(runs: Runs) -> None:
    assert runs.codes == [0] * (PARTS + 1)
    files = parquet_files(runs.whole)
    assert files == {output_of(rel) for rel in runs.expected}
    assert parquet_files(runs.parts) == files
    for name in sorted(files):
        one, parted = pq.read_table(runs.whole / name), pq.read_table(runs.parts / name)
        assert parted.schema == one.schema, name
        assert parted.column("id").to_pylist() == one.column("id").to_pylist(), name
        assert parted.column("label").to_pylist() == one.column("label").to_pylist(), name
        for column in ("truncated", "error"):
            assert parted.column(column).to_pylist() == one.column(column).to_pylist(), name
        for column in ("score", "scores"):  # other batches around them: fp32 noise at most
            a, b = (np.array(t.column(column).to_pylist()) for t in (parted, one))
            assert np.allclose(a, b, rtol=0, atol=1e-6), name


def test_each_shard_is_in_exactly_one_part_and_each_part_has_its_record(runs: Runs) -> None:
    done = [part_manifest(runs.parts, i)["shards"]["done"] for i in range(PARTS)]
    assert Counter(rel for part in done for rel in part) == Counter(list(runs.expected))
    assert all(done), "45 shards over 3 parts: none should be empty"
    for i, rels in enumerate(done):
        manifest = part_manifest(runs.parts, i)
        assert manifest["partition"]["index"] == i
        assert manifest["partition"]["count"] == PARTS
        assert manifest["partition"]["shards"] == len(rels)
        assert manifest["partition"]["shards_listed"] == SHARDS
        assert manifest["counts"]["documents"] == len(rels) * PER_SHARD
        assert manifest["shards"]["failed"] == manifest["shards"]["skipped"] == []
        assert {part_of(shard(rel, rel, "auto"), PARTS) for rel in rels} == {i}
    # _manifest.json sums up every part's run record, whichever part finished last.
    summary = json.loads((runs.parts / "_manifest.json").read_text())
    assert sorted(r["partition"]["index"] for r in summary["runs"]) == list(range(PARTS))
    assert (runs.whole / "_manifest.json").exists()
    assert pq.read_table(runs.parts).num_rows == SHARDS * PER_SHARD


def test_a_killed_part_rerun_with_resume_loses_and_duplicates_nothing(
    artifact: str, tmp_path: Path
) -> None:
    """Part 1/3 of an input where it has 12 shards of 100 records (enough work that the kill,
    after its second output, lands mid-part), and the other parts a few shards."""
    from tests.conftest import batchjob_run

    inp, out = tmp_path / "in", tmp_path / "out"
    expected: dict[str, list[str]] = {}  # part 1's output → ids
    names = (f"k/s{k:03d}.jsonl" for k in range(1000))
    others = 0
    while len(expected) < 12:
        rel = next(names)
        mine = part_of(shard(rel, rel, "auto"), PARTS) == 1
        if not mine and others == 4:
            continue
        ids = [f"{rel}-{i}" for i in range(100)]
        texts = make_texts(len(ids), seed=len(expected), max_words=12)
        write_jsonl(inp / rel, [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)])
        if mine:
            expected[output_of(rel)] = ids
        else:
            others += 1
    with batchjob_run(
        artifact, str(inp), str(out), tmp_path / "stdout", tmp_path / "stderr", "--partition", "1/3"
    ) as proc:
        wait_until(lambda: len(parquet_files(out)) >= 2, STARTUP, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    before = parquet_files(out)
    assert 2 <= len(before) < len(expected), "the kill should land mid-part"
    assert before <= set(expected)
    for name in before:  # whole outputs only
        assert ids_in(out / name) == expected[name], name

    code = run_job(artifact, inp, out, partition="1/3", resume=True)
    assert code == 0
    assert parquet_files(out) == set(expected)  # the part's shards, no other part's
    seen: Counter[str] = Counter()
    for name, ids in expected.items():
        assert ids_in(out / name) == ids, name
        seen.update(ids)
    assert set(seen.values()) == {1}
    assert len(seen) == 12 * 100
    manifest = part_manifest(out, 1)
    assert {output_of(r) for r in manifest["shards"]["skipped"]} == before
    assert {output_of(r) for r in manifest["shards"]["done"]} == set(expected) - before
    assert manifest["partition"] == {**manifest["partition"], "shards": 12, "shards_listed": 16}


def test_an_empty_part_succeeds_and_says_so(
    artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = (f"n{k}.jsonl" for k in range(100))
    two = [rel for rel in names if part_of(shard(rel, rel, "auto"), 3) != 2][:2]
    for rel in two:
        write_jsonl(tmp_path / "in" / rel, [{"text": "some text"}])
    out = tmp_path / "out"
    argv = ["run", "--model", artifact, "--input", str(tmp_path / "in"), "--output", str(out)]
    code, stdout, err = invoke([*argv, "--partition", "2/3", "--progress", "none"], capsys)
    assert code == 0, err
    assert stdout.startswith("batchjob run: part 2/3: 0 of 2 shards; 0 documents"), stdout
    assert parquet_files(out) == set()
    manifest = part_manifest(out, 2)
    assert manifest["partition"]["shards"] == 0
    assert manifest["shards"] == {"done": [], "skipped": [], "failed": []}


def test_int8_parts_need_given_ranges(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ranges taken from each part's first records would quantise the parts differently."""
    artifact = compiled(embedder_dir).path
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "some text"}])
    out = tmp_path / "out"
    argv = ["run", "--model", artifact, "--input", str(tmp_path / "in"), "--output", str(out)]
    code, stdout, err = invoke(
        [*argv, "--partition", "0/2", "--embedding-precision", "int8"], capsys
    )
    assert_usage_error(
        code, stdout, err, ("--partition 0/2 with --embedding-precision int8 needs",)
    )
    assert not out.exists()

"""Where outputs may go: overlap with the input, paths that leave the output, colliding
outputs, and the worker's allow-list. Pure: local paths in tmp_path, S3 as strings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchjob.paths import allowed, local_output_path, output_problems, overlap
from batchjob.s3 import S3Url
from batchjob.shards import ShardRef, shard


def shards_of(paths: list[str], root: str) -> list[ShardRef]:
    return [shard(p, p[len(root) :].lstrip("/"), "auto") for p in paths]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("in/a.jsonl", "in/b.parquet", "in/sub/c.csv"):
        (tmp_path / name).write_text("x\n")
    return tmp_path


def local_shards(root: Path) -> list[ShardRef]:
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file())
    return shards_of(paths, str(root))


def test_local_output_equal_to_the_input_is_refused(tree: Path) -> None:
    inp = tree / "in"
    assert overlap(str(inp), str(inp), local_shards(inp)) == f"--output {inp} is the input itself"
    # Spelled differently, or through a symlink: the same directory.
    assert overlap(f"{inp}/./sub/..", str(inp), local_shards(inp)) is not None
    (tree / "link").symlink_to(inp)
    assert overlap(str(tree / "link"), str(inp), local_shards(inp)) is not None


def test_local_input_inside_the_output_is_refused(tree: Path) -> None:
    inp = tree / "in" / "sub"
    why = overlap(str(tree / "in"), str(inp), local_shards(inp))
    assert why == f"--input {inp} lies inside --output {tree / 'in'}"
    one = tree / "in" / "a.jsonl"
    assert overlap(str(tree / "in"), str(one), shards_of([str(one)], str(tree / "in")))


def test_local_output_inside_the_input_is_allowed(tree: Path) -> None:
    inp = tree / "in"
    assert overlap(str(inp / "out"), str(inp), local_shards(inp)) is None
    assert overlap(str(tree / "elsewhere"), str(inp), local_shards(inp)) is None


def test_a_shard_whose_output_is_an_input_shard_is_refused(tree: Path) -> None:
    # An --input-manifest naming in/b.parquet, written to in/: b.parquet → b.parquet.
    listed = [shard(str(tree / "in" / "b.parquet"), "b.parquet", "auto")]
    why = overlap(str(tree / "in"), None, listed)
    assert why is not None
    assert "b.parquet" in why
    # Shards elsewhere, output beside one of them: x/b.jsonl's output is in/b.parquet.
    (tree / "x").mkdir()
    (tree / "x" / "b.jsonl").write_text("x\n")
    listed = [shard(str(tree / "x" / "b.jsonl"), "b.jsonl", "auto"), *listed]
    why = overlap(str(tree / "in"), None, listed)
    assert why is not None
    assert str(tree / "in" / "b.parquet") in why


def test_manifest_shards_inside_the_output_are_refused(tree: Path) -> None:
    listed = [shard(str(tree / "in" / "a.jsonl"), "a.jsonl", "auto")]
    why = overlap(str(tree / "in"), None, listed)
    assert why == f"input shard {tree / 'in' / 'a.jsonl'} lies inside --output {tree / 'in'}"


@pytest.mark.parametrize(
    ("output", "input_root", "refused"),
    [
        ("s3://b/pq/", "s3://b/pq/", "is the input itself"),
        ("s3://b/pq", "s3://b/pq/", "is the input itself"),
        ("s3://b/", "s3://b/pq/", "lies inside"),
        ("s3://b/pq/", "s3://b/pq/x/", "lies inside"),
        ("s3://b/pq/results/", "s3://b/pq/", None),  # output inside the input: excluded
        ("s3://b/pqr/", "s3://b/pq/", None),  # a sibling prefix, not the same one
        ("s3://other/pq/", "s3://b/pq/", None),
    ],
)
def test_s3_prefixes(output: str, input_root: str, refused: str | None) -> None:
    why = overlap(output, input_root, [])
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_s3_shard_whose_output_is_an_input_object() -> None:
    listed = [shard("s3://b/in/x.parquet", "x.parquet", "auto")]
    why = overlap("s3://b/in/", None, listed)
    assert why is not None
    assert "s3://b/in/x.parquet" in why
    assert overlap("s3://b/out/", None, listed) is None


def test_local_output_paths_stay_inside(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert local_output_path(out, "a/b.parquet") == os.path.join(out, "a", "b.parquet")
    assert local_output_path(out, "p1//double.parquet") == os.path.join(out, "p1/double.parquet")
    assert local_output_path(out, "a/../b.parquet") == os.path.join(out, "b.parquet")
    assert local_output_path(out, "../escape.parquet") is None
    assert local_output_path(out, "a/../../escape.parquet") is None
    assert local_output_path(out, "/etc/passwd") is None


def test_output_problems_fail_only_the_shards_concerned(tmp_path: Path) -> None:
    listed = [
        shard("s3://b/in/a.jsonl", "a.jsonl", "auto"),
        shard("s3://b/in/a.csv", "a.csv", "auto"),
        shard("s3://b/in/p1//double.jsonl", "p1//double.jsonl", "auto"),
        shard("s3://b/in/p1/double.jsonl", "p1/double.jsonl", "auto"),
        shard("s3://b/in/../up.jsonl", "../up.jsonl", "auto"),
        shard("s3://b/in/fine.jsonl", "fine.jsonl", "auto"),
    ]
    local = output_problems(str(tmp_path / "out"), listed)
    assert sorted(local) == [
        "../up.jsonl",
        "a.csv",
        "a.jsonl",
        "p1//double.jsonl",
        "p1/double.jsonl",
    ]
    assert "would leave --output" in local["../up.jsonl"]
    assert "would also be that of a.csv" in local["a.jsonl"]
    # On S3 keys are opaque: only a.jsonl and a.csv collide.
    assert sorted(output_problems("s3://o/out/", listed)) == ["a.csv", "a.jsonl"]


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("s3://in/data/x.jsonl", True),
        ("s3://in/data/deep/x.jsonl", True),
        ("s3://in/data/", True),
        ("s3://in/data", False),  # the object "data", or everything under "data/": ask for "data/"
        ("s3://in/database/x.jsonl", False),
        ("s3://in/x.jsonl", False),
        ("s3://other/data/x.jsonl", False),
        ("s3://all/anything/at/all", True),
    ],
)
def test_allowed(url: str, ok: bool) -> None:
    prefixes = [S3Url.parse("s3://in/data"), S3Url.parse("s3://all/")]
    assert allowed(S3Url.parse(url), prefixes) is ok

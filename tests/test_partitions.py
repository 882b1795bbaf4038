"""Partitions: the split (disjoint, complete, stable), choosing the part from flags and the
schedulers' environment, and what a bad choice says. End to end: tests/test_partition_runs.py."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from batchjob.config import run_spec
from batchjob.errors import UsageError
from batchjob.job_files import load_job_file
from batchjob.partitions import Partition, parse_partition, part_of, resolve_partition
from batchjob.shards import ShardRef, list_shards, parse_shard_list, shard
from batchjob.storage import Storage
from tests.conftest import assert_usage_error, invoke, write_jsonl
from tests.s3_server import Bucket

SCHEDULER_VARS = ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE")


def refs(rels: list[str]) -> list[ShardRef]:
    return [shard(f"/data/{rel}", rel, "auto") for rel in rels]


RELS = [f"d{k % 7}/sub{k % 3}/part-{k:05d}.jsonl.gz" for k in range(3000)]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64])
def test_parts_are_disjoint_and_their_union_is_the_input(count: int) -> None:
    shards = refs(RELS)
    parts = [Partition(i, count).select(shards) for i in range(count)]
    seen = [s.rel for part in parts for s in part]
    assert len(seen) == len(set(seen)) == len(shards)
    assert set(seen) == set(RELS)
    position = {s.rel: k for k, s in enumerate(shards)}
    for part in parts:  # each in the listing's order
        assert [position[s.rel] for s in part] == sorted(position[s.rel] for s in part)


def test_parts_are_balanced_in_count_on_average() -> None:
    sizes = [len(Partition(i, 3).select(refs(RELS))) for i in range(3)]
    assert all(abs(size - 1000) < 100 for size in sizes), sizes


def test_a_shards_part_depends_on_its_own_name_only() -> None:
    """Listing order and the other shards (added, removed) never move a shard."""
    shards = refs(RELS[:500])
    before = {s.rel: part_of(s, 5) for s in shards}
    shuffled = shards[:]
    random.Random(0).shuffle(shuffled)
    kept = shuffled[100:]  # 100 removed, 300 added, the rest in another order
    more = kept + refs([f"new/{k}.csv" for k in range(300)])
    for i in range(5):
        part = Partition(i, 5).select(more)
        assert {s.rel for s in part if s.rel in before} == {
            s.rel for s in kept if before[s.rel] == i
        }


def test_the_split_is_fixed_across_releases() -> None:
    """A part rerun with another batchjob version must get the same shards: the hash is
    sha256 of the output path, not Python's (salted) hash()."""
    got = [part_of(s, 10) for s in refs(["a.jsonl", "b/c.csv", "d/e.parquet.gz", "f g.txt"])]
    assert got == [5, 7, 2, 5]


def test_shards_with_one_output_are_in_one_part() -> None:
    """a.jsonl and a.csv would both write a.parquet: one part refuses them, as one run does."""
    for count in (2, 3, 5, 11):
        for group in (["a.jsonl", "a.csv", "a.jsonl.gz"], ["p/x.txt", "p//x.txt", "p/./x.csv"]):
            assert len({part_of(s, count) for s in refs(group)}) == 1, (count, group)


def test_an_input_manifest_is_split_as_the_listing_of_its_files(tmp_path: Path) -> None:
    for k in range(60):
        write_jsonl(tmp_path / "in" / f"d{k % 4}" / f"s{k}.jsonl", [{"text": "x"}])
    listed = list_shards(str(tmp_path / "in"))
    named = parse_shard_list(
        json.dumps([{"prefix": str(tmp_path / "in")}, *[s.rel for s in reversed(listed)]]), "m"
    )
    lines = parse_shard_list("\n".join(s.path for s in listed), "m")
    for i in range(3):
        part = {s.rel for s in Partition(i, 3).select(listed)}
        assert {s.rel for s in Partition(i, 3).select(named)} == part
        assert {s.rel for s in Partition(i, 3).select(lines)} == part


@pytest.mark.parametrize(
    ("text", "index", "count"), [("0/1", 0, 1), ("2/3", 2, 3), (" 1 / 3 ", 1, 3), ("9/10", 9, 10)]
)
def test_parse_partition(text: str, index: int, count: int) -> None:
    assert parse_partition(text) == Partition(index, count)
    assert str(Partition(index, count)) == f"{index}/{count}"


def test_an_earlier_partitioned_output_inside_the_input_is_not_read(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "old" / "b.jsonl", [{"text": "x"}])
    (tmp_path / "old" / "_manifest.json").write_text("{}")  # a part's summary, as any run's
    assert [s.rel for s in list_shards(str(tmp_path))] == ["a.jsonl"]


# -- which part: flags and the environment ------------------------------------------------------


@pytest.mark.parametrize(
    ("partition", "partitions", "env", "expected"),
    [
        (None, None, {}, None),
        ("1/3", None, {}, Partition(1, 3)),
        (None, 3, {"JOB_COMPLETION_INDEX": "2"}, Partition(2, 3)),
        (None, None, {"AWS_BATCH_JOB_ARRAY_INDEX": "4", "AWS_BATCH_JOB_ARRAY_SIZE": "5"}, (4, 5)),
        (None, 5, {"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "5"}, (0, 5)),
        (None, 4, {"AWS_BATCH_JOB_ARRAY_INDEX": "3"}, (3, 4)),  # no size: --partitions says
        (None, None, {"JOB_COMPLETION_INDEX": ""}, None),  # empty is unset
        ("0/1", None, {"AWS_BATCH_JOB_ARRAY_SIZE": "3"}, (0, 1)),  # a size alone picks nothing
    ],
)
def test_the_part_comes_from_one_place(
    partition: str | None,
    partitions: int | None,
    env: dict[str, str],
    expected: Partition | tuple[int, int] | None,
) -> None:
    if isinstance(expected, tuple):
        expected = Partition(*expected)
    assert resolve_partition(partition, partitions, env) == expected


BAD_CHOICES = {
    "malformed": ("3-of-5", None, {}, "--partition must be I/N (part I of N, 0-based, e.g. 0/3)"),
    "negative": ("-1/3", None, {}, "--partition must be I/N"),
    "no-count": ("1", None, {}, "got '1'"),
    "index-not-below-count": ("3/3", None, {}, "--partition 3/3: the index must be 0 to 2"),
    "count-0": ("0/0", None, {}, "--partition 0/0: the count must be ≥ 1"),
    "partitions-0": (None, 0, {"JOB_COMPLETION_INDEX": "0"}, "--partitions must be ≥ 1, got 0"),
    "both-flags": ("1/3", 3, {}, "--partition 1/3 and --partitions 3 exclude each other"),
    "flag-and-k8s-index": (
        "1/3",
        None,
        {"JOB_COMPLETION_INDEX": "1"},
        "--partition 1/3 and JOB_COMPLETION_INDEX=1 both choose the part",
    ),
    "flag-and-batch-index": (
        "0/2",
        None,
        {"AWS_BATCH_JOB_ARRAY_INDEX": "1", "AWS_BATCH_JOB_ARRAY_SIZE": "2"},
        "--partition 0/2 and AWS_BATCH_JOB_ARRAY_INDEX=1 both choose the part",
    ),
    "partitions-without-index": (None, 3, {}, "--partitions 3: no part index in the environment"),
    "k8s-index-without-count": (
        None,
        None,
        {"JOB_COMPLETION_INDEX": "1"},
        "JOB_COMPLETION_INDEX=1 is set but not the number of parts: give --partitions N",
    ),
    "batch-index-without-size": (
        None,
        None,
        {"AWS_BATCH_JOB_ARRAY_INDEX": "1"},
        "AWS_BATCH_JOB_ARRAY_INDEX=1 is set but not the number of parts",
    ),
    "k8s-index-too-large": (
        None,
        3,
        {"JOB_COMPLETION_INDEX": "3"},
        "JOB_COMPLETION_INDEX=3 is not below the number of parts, 3",
    ),
    "index-not-a-number": (None, 3, {"JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX must"),
    "sizes-differ": (
        None,
        4,
        {"AWS_BATCH_JOB_ARRAY_INDEX": "1", "AWS_BATCH_JOB_ARRAY_SIZE": "3"},
        "--partitions 4 differs from AWS_BATCH_JOB_ARRAY_SIZE=3",
    ),
    "two-schedulers": (
        None,
        3,
        {"JOB_COMPLETION_INDEX": "1", "AWS_BATCH_JOB_ARRAY_INDEX": "1"},
        "JOB_COMPLETION_INDEX=1 and AWS_BATCH_JOB_ARRAY_INDEX=1 are both set",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHOICES))
def test_a_bad_choice_of_part_says_what_and_where(case: str) -> None:
    partition, partitions, env, message = BAD_CHOICES[case]
    with pytest.raises(UsageError) as caught:
        resolve_partition(partition, partitions, env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("case", "flags", "env"),
    [
        ("malformed", ["--partition", "3-of-5"], {}),
        ("index-not-below-count", ["--partition", "3/3"], {}),
        ("flag-and-k8s-index", ["--partition", "1/3"], {"JOB_COMPLETION_INDEX": "1"}),
        ("k8s-index-without-count", [], {"JOB_COMPLETION_INDEX": "1"}),
        ("partitions-without-index", ["--partitions", "3"], {}),
        ("sizes-differ", ["--partitions", "4"], BAD_CHOICES["sizes-differ"][2]),
    ],
)
def test_the_cli_refuses_a_bad_part_with_exit_2_and_writes_nothing(
    case: str,
    flags: list[str],
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "x"}])
    out = tmp_path / "out"
    argv = ["run", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "in")]
    code, stdout, err = invoke([*argv, "--output", str(out), *flags], capsys)
    assert_usage_error(code, stdout, err, (BAD_CHOICES[case][3],))
    assert not out.exists()


def test_partitions_from_a_job_file_and_the_environment(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: m\ninput: in/\noutput: out/\npartitions: 4\n")
    fields = load_job_file(str(job))
    assert run_spec(dict(fields), {"JOB_COMPLETION_INDEX": "3"}).part == Partition(3, 4)
    with pytest.raises(UsageError, match="no part index in the environment"):
        run_spec(dict(fields))  # the library reads no environment unless given one
    job.write_text("model: m\ninput: in/\noutput: out/\npartition: 1/2\n")
    assert run_spec(load_job_file(str(job))).partition == "1/2"
    job.write_text("model: m\ninput: in/\noutput: out/\npartitions: '4'\n")
    with pytest.raises(UsageError, match="partitions must be an integer, got '4'"):
        load_job_file(str(job))


def test_an_earlier_partitioned_output_under_an_s3_input_is_not_read(bucket: Bucket) -> None:
    bucket.put_many(
        {
            "a.jsonl": b"",
            "_manifest.json": b"{}",  # at the root listed: the root is still read
            "old/b.jsonl": b"",
            "old/_manifest.json": b"{}",
            "older/c.jsonl": b"",
            "older/_manifest.json": b"{}",
            "newer/d.jsonl": b"",
        }
    )

    async def listing(root: str) -> list[str]:
        async with Storage() as storage:
            return [s.rel for s in await storage.list_shards(root)]

    assert asyncio.run(listing(bucket.uri(""))) == ["a.jsonl", "newer/d.jsonl"]
    assert asyncio.run(listing(bucket.uri("old/"))) == ["b.jsonl"]

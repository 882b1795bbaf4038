"""Partitioned runs: N processes (a Kubernetes Indexed Job, an AWS Batch array job, or N
hands) each run one part of the same input into the same output, with no coordination.

The split: a shard belongs to part `sha256(its output path) mod N`, the output path being
the shard's relative path with `.parquet` for its extension (`a/b.jsonl.gz` → `a/b.parquet`),
the first 8 bytes of the digest read as a big-endian integer. Why a hash, not a split of
one listing balanced by size: a shard's part depends on its own name and N only, so every
part computes the same split from its own listing, whatever the listing order, and a shard
added or removed between the parts' listings moves no other shard. Why the output path:
shards that would write the same output (`a.jsonl` and `a.csv`) fall in one part, which
refuses them as a single run would; two parts would each take one for done. The price: parts
are balanced in shard count only on average (many shards of similar size balance well).

Which part: `--partition I/N` (0-based, as both schedulers count); else `--partitions N`
with the index from JOB_COMPLETION_INDEX (Kubernetes) or AWS_BATCH_JOB_ARRAY_INDEX; else,
under AWS Batch, AWS_BATCH_JOB_ARRAY_INDEX of AWS_BATCH_JOB_ARRAY_SIZE. Anything
ambiguous (an index without a count, a flag and an index from the environment, counts that
differ) is a UsageError: a wrong part silently does another part's work or none.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchjob.errors import UsageError

if TYPE_CHECKING:  # config.py imports this module: keep it light
    from batchjob.shards import ShardRef

K8S_INDEX = "JOB_COMPLETION_INDEX"
BATCH_INDEX = "AWS_BATCH_JOB_ARRAY_INDEX"
BATCH_SIZE = "AWS_BATCH_JOB_ARRAY_SIZE"

_PARTITION = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")


@dataclass(frozen=True, slots=True)
class Partition:
    """Part `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise UsageError(f"--partition {self}: the count must be ≥ 1")
        if not 0 <= self.index < self.count:
            raise UsageError(
                f"--partition {self}: the index must be 0 to {self.count - 1} (0-based)"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, shard: ShardRef) -> bool:
        return part_of(shard, self.count) == self.index

    def select(self, shards: list[ShardRef]) -> list[ShardRef]:
        """This part's shards, in the listing's order."""
        return [s for s in shards if self.holds(s)]

    def describe(self, part: int, listed: int) -> dict[str, object]:
        return {
            "index": self.index,
            "count": self.count,
            "shards": part,
            "shards_listed": listed,
            "split": "sha256 of the output path, mod count",
        }


def part_of(shard: ShardRef, count: int) -> int:
    # normpath: `p//a.jsonl` and `p/a.jsonl` write one local file, so they go together.
    name = posixpath.normpath(shard.output_rel).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(name).digest()[:8], "big") % count


def parse_partition(text: str) -> Partition:
    """`"1/3"` → Partition(1, 3); UsageError naming the flag otherwise."""
    match = _PARTITION.fullmatch(text)
    if match is None:
        raise UsageError(f"--partition must be I/N (part I of N, 0-based, e.g. 0/3), got {text!r}")
    return Partition(int(match[1]), int(match[2]))


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    """An index or count the scheduler set; None when unset or empty."""
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise UsageError(f"{name} must be an integer ≥ 0, got {value!r}")
    return int(value)


def resolve_partition(
    partition: str | None, partitions: int | None, env: Mapping[str, str]
) -> Partition | None:
    """The part this process runs (None: the whole input), from `--partition`, `--partitions`
    and the schedulers' environment variables."""
    if partitions is not None and partitions < 1:
        raise UsageError(f"--partitions must be ≥ 1, got {partitions}")
    k8s, batch, batch_size = (_env_int(env, n) for n in (K8S_INDEX, BATCH_INDEX, BATCH_SIZE))
    if k8s is not None and batch is not None:
        raise UsageError(
            f"{K8S_INDEX}={k8s} and {BATCH_INDEX}={batch} are both set: the part is ambiguous"
        )
    index, source = (k8s, K8S_INDEX) if k8s is not None else (batch, BATCH_INDEX)
    if partition is not None:
        if partitions is not None:
            raise UsageError(
                f"--partition {partition} and --partitions {partitions} exclude each other: "
                "--partition I/N gives the count too"
            )
        if index is not None:
            raise UsageError(
                f"--partition {partition} and {source}={index} both choose the part: give one "
                "(--partitions N takes the index from the environment)"
            )
        return parse_partition(partition)
    if index is None:
        if partitions is not None:
            raise UsageError(
                f"--partitions {partitions}: no part index in the environment ({K8S_INDEX} of a "
                f"Kubernetes Indexed Job, {BATCH_INDEX} of an AWS Batch array job); "
                "elsewhere give --partition I/N"
            )
        return None
    count = partitions
    if source == BATCH_INDEX and batch_size is not None:
        if partitions is not None and partitions != batch_size:
            raise UsageError(
                f"--partitions {partitions} differs from {BATCH_SIZE}={batch_size}, the array "
                "job's size: leave --partitions out"
            )
        count = batch_size
    if count is None:
        hint = "the Job's completions" if source == K8S_INDEX else f"{BATCH_SIZE} is not set"
        raise UsageError(
            f"{source}={index} is set but not the number of parts: give --partitions N ({hint})"
        )
    if index >= count:
        raise UsageError(
            f"{source}={index} is not below the number of parts, {count}: "
            "the Job's completions (or the array's size) and --partitions must be equal"
        )
    return Partition(index, count)

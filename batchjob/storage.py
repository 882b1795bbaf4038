"""Where shards come from and results go: local paths (S3 plugs in behind the same calls)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import BinaryIO

from batchjob.errors import UsageError
from batchjob.records import detect_format, is_gzip
from batchjob.sinks import output_rel

log = logging.getLogger("batchjob.storage")


@dataclass(frozen=True, slots=True)
class ShardRef:
    path: str  # where to read it
    rel: str  # relative to the input root, extension included: ids and output names use it
    format: str
    gzip: bool

    @property
    def output_rel(self) -> str:
        return output_rel(self.rel)


def list_shards(root: str, fmt: str = "auto", exclude: str | None = None) -> list[ShardRef]:
    """The shards under `root` (a file or a directory tree), in a stable order.

    `exclude` (the output directory, when it lies inside the input) is not descended into.
    """
    skip_dir = os.path.abspath(exclude) if exclude else None
    if os.path.isfile(root):
        name = os.path.basename(root)
        return [ShardRef(root, name, detect_format(name, fmt), is_gzip(name))]
    if not os.path.isdir(root):
        raise UsageError(f"--input {root}: no such file or directory")
    shards, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith((".", "_"))
            and os.path.abspath(os.path.join(dirpath, d)) != skip_dir
        )
        for name in sorted(filenames):
            if name.startswith((".", "_")):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            try:
                shards.append(ShardRef(path, rel, detect_format(name, fmt), is_gzip(name)))
            except UsageError:
                skipped.append(rel)
    if skipped:
        log.warning("skipping %d file(s) of no supported format, e.g. %s", len(skipped), skipped[0])
    if not shards:
        raise UsageError(
            f"--input {root}: no shards (.jsonl, .csv, .parquet, .txt, optionally .gz)"
        )
    return shards


def open_shard(shard: ShardRef) -> BinaryIO:
    return open(shard.path, "rb")


def existing_outputs(output: str) -> set[str]:
    """Relative paths of the shard outputs already under `output` (one walk, for --resume)."""
    found = set()
    for dirpath, _, filenames in os.walk(output):
        for name in filenames:
            if name.endswith(".parquet"):
                found.add(os.path.relpath(os.path.join(dirpath, name), output))
    return found

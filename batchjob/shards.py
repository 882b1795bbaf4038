"""Shards: what a run reads (a file or an S3 object), named by its path relative to the input
root. Listing a local tree and parsing an `--input-manifest` live here; storage.py does the
I/O for S3.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass

from batchjob.errors import UsageError
from batchjob.records import detect_format, is_gzip
from batchjob.s3 import is_s3
from batchjob.sinks import MANIFEST, output_rel

log = logging.getLogger("batchjob.shards")

NO_SHARDS = "no shards (.jsonl, .csv, .parquet, .txt, optionally .gz)"


@dataclass(frozen=True, slots=True)
class ShardRef:
    path: str  # where to read it: a local path or an s3:// URI
    rel: str  # relative to the input root, extension included: ids and output names use it
    format: str
    gzip: bool

    @property
    def output_rel(self) -> str:
        return output_rel(self.rel)


def shard(path: str, rel: str, fmt: str) -> ShardRef:
    """The shard at `path`; UsageError when its format can't be told."""
    name = posixpath.basename(rel)
    return ShardRef(path, rel, detect_format(name, fmt), is_gzip(name))


def display_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (which `os` hands over as surrogates)
    written as `\\xNN`, so ids, output names and the manifest stay valid UTF-8."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def hidden(rel: str) -> bool:
    """Names starting with "." or "_" (`_SUCCESS`, `_manifest.json`, `.tmp/`) aren't shards.
    An S3 key's "." and ".." segments are not names: keys are opaque."""
    return any(p.startswith((".", "_")) and p not in (".", "..") for p in rel.split("/"))


def checked(where: str, shards: list[ShardRef], skipped: list[str]) -> list[ShardRef]:
    if skipped:
        log.warning("skipping %d file(s) of no supported format, e.g. %s", len(skipped), skipped[0])
    if not shards:
        raise UsageError(f"{where}: {NO_SHARDS}")
    return shards


def list_shards(
    root: str, fmt: str = "auto", exclude: str | None = None, label: str = "--input"
) -> list[ShardRef]:
    """The shards under local `root` (a file or a directory tree), in a stable order.

    `exclude` (the output directory, when it lies inside the input) is not descended into,
    nor is the output of an earlier run (a directory holding `_manifest.json`). `label`
    names `root` in errors: the flag it came from.
    """
    skip_dir = os.path.realpath(exclude) if exclude and not is_s3(exclude) else None
    if os.path.isfile(root):
        return [shard(root, display_name(os.path.basename(root)), fmt)]
    if not os.path.isdir(root):
        raise UsageError(f"{label} {root}: no such file or directory")
    shards, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath != root and MANIFEST in filenames:
            log.warning("skipping %s: an earlier run's output (it holds %s)", dirpath, MANIFEST)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith((".", "_"))
            and os.path.realpath(os.path.join(dirpath, d)) != skip_dir
        )
        for name in sorted(filenames):
            if name.startswith((".", "_")):
                continue
            path = os.path.join(dirpath, name)
            rel = display_name(os.path.relpath(path, root))
            if os.path.exists(path) and not os.path.isfile(path):
                # A FIFO, socket or device: opening a FIFO waits for a writer, for ever.
                log.warning("skipping %s: not a regular file", rel)
                continue
            try:
                shards.append(shard(path, rel, fmt))
            except UsageError:
                skipped.append(rel)
    return checked(f"{label} {root}", shards, skipped)


def parse_shard_list(text: str, where: str, fmt: str = "auto") -> list[ShardRef]:
    """The shards an `--input-manifest` names, in its order. Either a SageMaker manifest,
    `[{"prefix": "s3://b/p/"}, "rel/a.jsonl", ...]` (each shard's rel is its entry), or URIs
    or paths one a line (rel: the path below the directory they all share)."""
    try:
        entries = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON: {e}") from None
    if entries is not None:
        head = entries[0] if entries else None
        if not (isinstance(head, dict) and isinstance(head.get("prefix"), str)):
            raise UsageError(f'{where}: a JSON manifest starts with {{"prefix": "..."}}')
        if not all(isinstance(e, str) and e for e in entries[1:]):
            raise UsageError(f"{where}: entries after the prefix are strings")
        base = head["prefix"] if head["prefix"].endswith("/") else head["prefix"] + "/"
        pairs = [(base + rel, rel) for rel in entries[1:]]
    else:
        lines = [ln.strip() for ln in text.splitlines()]
        paths = [ln for ln in lines if ln and not ln.startswith("#")]
        pairs = list(zip(paths, _relative_to_common_dir(paths), strict=True))
    seen: set[str] = set()
    for path, _ in pairs:
        key = path if is_s3(path) else os.path.abspath(path)
        if key in seen:  # run twice, it would race with itself on one output
            raise UsageError(f"{where}: {display_name(path)} is listed more than once")
        seen.add(key)
    return checked(where, [shard(path, display_name(rel), fmt) for path, rel in pairs], [])


def _relative_to_common_dir(uris: list[str]) -> list[str]:
    """Each of `uris` (s3:// or local) as a path below the deepest directory they all share:
    [s3://b/p/x/a.jsonl, s3://b/p/b.jsonl] → [x/a.jsonl, b.jsonl]."""
    paths = [
        uri[len("s3://") :] if is_s3(uri) else os.path.abspath(uri).lstrip("/") for uri in uris
    ]
    dirs = [p.split("/")[:-1] for p in paths]
    depth = 0
    while dirs and all(len(d) > depth and d[depth] == dirs[0][depth] for d in dirs):
        depth += 1
    return ["/".join(p.split("/")[depth:]) for p in paths]

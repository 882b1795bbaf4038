"""Where outputs may go: never over an input, never outside the output, never outside what a
queue message is allowed to name.

- A run (or a job message) whose output could overwrite or shadow an input is refused before
  any work: the output is the input, the input lies inside the output, or some shard's output
  is itself an input shard. Local paths are compared resolved (`realpath`: symlinks too); S3
  locations by bucket and key prefix (keys are opaque: `//` and `..` are characters).
- A shard's local output path must stay inside the output directory.
- The worker reads only objects under its `--allow-input` prefixes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from batchjob.s3 import S3Url, is_s3
from batchjob.shards import ShardRef


def _inside(path: str, root: str) -> bool:
    """`path` is `root` or lies below it (both resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def local_output_path(output: str, rel: str) -> str | None:
    """`<output>/<rel>`, or None when `rel` would leave the output directory."""
    root = os.path.realpath(output)
    path = os.path.realpath(os.path.join(root, rel))
    return path if _inside(path, root) and path != root else None


def overlap(output: str, input_root: str | None, shards: Sequence[ShardRef]) -> str | None:
    """Why writing the shards' outputs under `output` could destroy or shadow an input; None
    when it can't. `input_root` is `--input` (None for an `--input-manifest`)."""
    if is_s3(output):
        return _s3_overlap(output, input_root, shards)
    out = os.path.realpath(output)
    if input_root is not None and not is_s3(input_root):
        root = os.path.realpath(input_root)
        if root == out:
            return f"--output {output} is the input itself"
        if _inside(root, out):
            return f"--input {input_root} lies inside --output {output}"
    local = [s for s in shards if not is_s3(s.path)]
    real = {os.path.realpath(s.path): s.path for s in local}
    for path, given in real.items():
        if input_root is None and _inside(path, out):
            return f"input shard {given} lies inside --output {output}"
    for shard in shards:
        target = os.path.realpath(os.path.join(out, shard.output_rel))
        if target in real:
            return f"the output of {shard.path} would be input shard {real[target]}"
    return None


def _s3_overlap(output: str, input_root: str | None, shards: Sequence[ShardRef]) -> str | None:
    out = S3Url.parse(output)
    if input_root is not None and is_s3(input_root):
        root = S3Url.parse(input_root)
        if root.bucket == out.bucket:
            if root.prefix == out.prefix:
                return f"--output {output} is the input itself"
            if root.key.startswith(out.prefix):
                return f"--input {input_root} lies inside --output {output}"
    keys = {}
    for shard in shards:
        if is_s3(shard.path):
            url = S3Url.parse(shard.path)
            keys[(url.bucket, url.key)] = shard.path
            if input_root is None and url.bucket == out.bucket and url.key.startswith(out.prefix):
                return f"input shard {shard.path} lies inside --output {output}"
    for shard in shards:
        target = out.join(shard.output_rel)
        if (target.bucket, target.key) in keys:
            return f"the output of {shard.path} would be {target}, which is an input shard"
    return None


def is_under(url: S3Url, prefix: S3Url) -> bool:
    """`url` (an object, or a prefix ending in "/") lies under the directory `prefix`."""
    return url.bucket == prefix.bucket and url.key.startswith(prefix.prefix)


def allowed(url: S3Url, prefixes: Iterable[S3Url]) -> bool:
    return any(is_under(url, prefix) for prefix in prefixes)


def output_problems(output: str, shards: Sequence[ShardRef]) -> dict[str, str]:
    """Shards whose output can't be written, by rel, with why: a local path that would leave
    `output` (an S3 key with `..`), or an output another shard also has (`a.jsonl` and
    `a.csv`; `p//a.jsonl` and `p/a.jsonl` locally). The other shards can still run."""
    problems: dict[str, str] = {}
    owners: dict[str, list[str]] = {}
    for shard in shards:
        if is_s3(output):
            target = str(S3Url.parse(output).join(shard.output_rel))
        elif (path := local_output_path(output, shard.output_rel)) is not None:
            target = path
        else:
            problems[shard.rel] = f"its output {shard.output_rel} would leave --output {output}"
            continue
        owners.setdefault(target, []).append(shard.rel)
    for target, rels in owners.items():
        for rel in rels if len(rels) > 1 else ():
            others = ", ".join(r for r in rels if r != rel)
            problems[rel] = f"its output {target} would also be that of {others}: rename one"
    return problems

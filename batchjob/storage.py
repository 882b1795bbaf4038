"""Where shards come from and results go: local paths and s3:// URIs, in any mix, behind
one interface (`Storage`). The S3 client is only created when an s3:// URI is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
from collections import deque
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import pyarrow as pa

from batchjob.errors import BatchJobError, UsageError
from batchjob.records import detect_format, is_gzip
from batchjob.s3 import S3, S3Error, S3Url, is_s3
from batchjob.sinks import (
    MANIFEST,
    OutputWriter,
    S3ShardWriter,
    ShardWriter,
    manifest_bytes,
    output_rel,
    write_manifest,
)

log = logging.getLogger("batchjob.storage")

SHARD_LIST_MAX_BYTES = 64 << 20  # an --input-manifest is read whole
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


def _hidden(rel: str) -> bool:
    """Names starting with "." or "_" (`_SUCCESS`, `_manifest.json`, `.tmp/`) aren't shards."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _checked(where: str, shards: list[ShardRef], skipped: list[str]) -> list[ShardRef]:
    if skipped:
        log.warning("skipping %d file(s) of no supported format, e.g. %s", len(skipped), skipped[0])
    if not shards:
        raise UsageError(f"{where}: {NO_SHARDS}")
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.rel.startswith("/") or ".." in shard.rel.split("/"):
            raise UsageError(f"{where}: {shard.rel!r} would be written outside the output")
        other = seen.setdefault(shard.output_rel, shard.rel)
        if other != shard.rel:
            raise UsageError(
                f"{where}: {other} and {shard.rel} would both be written to {shard.output_rel}"
            )
    return shards


def list_shards(root: str, fmt: str = "auto", exclude: str | None = None) -> list[ShardRef]:
    """The shards under local `root` (a file or a directory tree), in a stable order.

    `exclude` (the output directory, when it lies inside the input) is not descended into.
    """
    skip_dir = os.path.abspath(exclude) if exclude and not is_s3(exclude) else None
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
    return _checked(f"--input {root}", shards, skipped)


def existing_local_outputs(output: str) -> set[str]:
    found = set()
    for dirpath, _, filenames in os.walk(output):
        for name in filenames:
            if name.endswith(".parquet"):
                found.add(os.path.relpath(os.path.join(dirpath, name), output))
    return found


# Local files open at once and read from the page cache: no thread needed.
def _open_local(path: str) -> BinaryIO:
    return open(path, "rb")


def _is_file(path: str) -> bool:
    return os.path.isfile(path)


def _read_local(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{path}: larger than {limit} bytes")
    return data


def _usage(flag: str, e: S3Error) -> BatchJobError:
    """A listing that can never work (no bucket, no access) is a bad invocation."""
    return UsageError(f"{flag}: {e}") if e.client_fault else e


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


class Storage:
    """Local paths and s3:// URIs: list shards, open them, write outputs and the manifest.

    `async with Storage() as storage:`; one per event loop.
    """

    def __init__(self, *, connections: int = 10) -> None:
        self.connections = connections
        self._stack = contextlib.AsyncExitStack()
        self._s3: S3 | None = None

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def s3(self) -> S3:
        if self._s3 is None:
            self._s3 = await self._stack.enter_async_context(S3(connections=self.connections))
        return self._s3

    # -- input ------------------------------------------------------------------------------

    async def list_shards(
        self, root: str, fmt: str = "auto", exclude: str | None = None, label: str = "--input"
    ) -> list[ShardRef]:
        """The shards of `root`: a file or object (one shard), or everything under a directory
        or prefix, in a stable order (key order on S3). `exclude`: the output, when it lies
        inside the input. `label` names `root` in errors."""
        if not is_s3(root):
            return list_shards(root, fmt, exclude)
        url, s3 = S3Url.parse(root), await self.s3()
        try:
            if url.key and not url.key.endswith("/") and await s3.head(url) is not None:
                name = posixpath.basename(url.key)
                return [ShardRef(root, name, detect_format(name, fmt), is_gzip(name))]
            prefix, skip = url.prefix, None
            if exclude and is_s3(exclude):  # the output, when it lies inside the input
                out = S3Url.parse(exclude)
                inside = out.bucket == url.bucket and out.prefix.startswith(prefix)
                skip = out.prefix if inside and out.prefix != prefix else None
            shards, skipped = [], []
            async for obj in s3.list_objects(S3Url(url.bucket, prefix)):
                rel = obj.key[len(prefix) :]
                if not rel or rel.endswith("/") or _hidden(rel):
                    continue  # "folder" markers, and hidden names as locally
                if skip is not None and obj.key.startswith(skip):
                    continue
                name = posixpath.basename(rel)
                try:
                    uri = str(S3Url(url.bucket, obj.key))
                    shards.append(ShardRef(uri, rel, detect_format(name, fmt), is_gzip(name)))
                except UsageError:
                    skipped.append(rel)
        except S3Error as e:
            raise _usage(f"{label} {root}", e) from None
        if not shards and not skipped:
            raise UsageError(f"{label} {root}: no such object, nor objects under {prefix!r}")
        return _checked(f"{label} {root}", shards, skipped)

    async def read_shard_list(self, uri: str, fmt: str = "auto") -> list[ShardRef]:
        """The shards an `--input-manifest` names, in its order. Either a SageMaker manifest,
        `[{"prefix": "s3://b/p/"}, "rel/a.jsonl", ...]` (each shard's rel is its entry), or
        URIs or paths one a line (rel: the path below the directory they all share)."""
        text = (await self._read_small(uri, "--input-manifest")).decode("utf-8", "replace")
        try:
            entries = json.loads(text) if text.lstrip().startswith("[") else None
        except json.JSONDecodeError as e:
            raise UsageError(f"--input-manifest {uri}: not valid JSON: {e}") from None
        if entries is not None:
            head = entries[0] if entries else None
            if not (isinstance(head, dict) and isinstance(head.get("prefix"), str)):
                raise UsageError(
                    f'--input-manifest {uri}: a JSON manifest starts with {{"prefix": "..."}}'
                )
            if not all(isinstance(e, str) and e for e in entries[1:]):
                raise UsageError(f"--input-manifest {uri}: entries after the prefix are strings")
            base = head["prefix"] if head["prefix"].endswith("/") else head["prefix"] + "/"
            pairs = [(base + rel, rel) for rel in entries[1:]]
        else:
            lines = [ln.strip() for ln in text.splitlines()]
            paths = [ln for ln in lines if ln and not ln.startswith("#")]
            pairs = list(zip(paths, _relative_to_common_dir(paths), strict=True))
        shards = []
        for path, rel in pairs:
            name = posixpath.basename(rel)
            shards.append(ShardRef(path, rel, detect_format(name, fmt), is_gzip(name)))
        return _checked(f"--input-manifest {uri}", shards, [])

    async def _read_small(self, uri: str, flag: str) -> bytes:
        if not is_s3(uri):
            try:
                return _read_local(uri, SHARD_LIST_MAX_BYTES)
            except OSError as e:
                raise UsageError(f"{flag} {uri}: {e.strerror}") from None
        try:
            return await (await self.s3()).read_bytes(S3Url.parse(uri), SHARD_LIST_MAX_BYTES)
        except S3Error as e:
            raise _usage(flag, e) from None

    async def open(self, ref: ShardRef) -> BinaryIO:
        """A blocking stream for a worker thread; S3 objects download ahead in the loop.

        Closing it from the loop while a thread reads it must not block: an S3 stream is
        therefore unbuffered (no lock), and the reader buffers on its side.
        """
        if not is_s3(ref.path):
            return _open_local(ref.path)
        return cast(BinaryIO, await (await self.s3()).open(S3Url.parse(ref.path)))

    def prefetch(self, shards: list[ShardRef], in_flight: int) -> Prefetch:
        return Prefetch(self, shards, in_flight)

    # -- output -----------------------------------------------------------------------------

    async def prepare_output(self, output: str, *, list_existing: bool = False) -> set[str]:
        """Check that `output` can take outputs (create the directory, or fail fast on a
        missing bucket); with `list_existing` (--resume), return the relative paths of the
        shard outputs already there, in one listing (not a HEAD per shard)."""
        if not is_s3(output):
            os.makedirs(output, exist_ok=True)
            return existing_local_outputs(output) if list_existing else set()
        url, s3 = S3Url.parse(output), await self.s3()
        prefix = S3Url(url.bucket, url.prefix)
        try:
            if list_existing:
                return {
                    obj.key[len(prefix.key) :]
                    async for obj in s3.list_objects(prefix)
                    if obj.key.endswith(".parquet")
                }
            await s3.probe(prefix)
        except S3Error as e:
            if list_existing or e.code != "AccessDenied":
                raise _usage(f"--output {output}", e) from None
            # Write-only credentials are legitimate without --resume.
            log.warning("--output %s: can't list it (%s); going on", output, e.code)
        return set()

    async def output_exists(self, output: str, rel: str) -> bool:
        """Whether `<output>/<rel>` is published already (a HEAD on S3). Without
        s3:ListBucket, S3 answers a missing key 403, not 404: then False (unknown), and the
        conditional upload still keeps the output single."""
        if not is_s3(output):
            return _is_file(os.path.join(output, rel))
        url = S3Url.parse(output).join(rel)
        try:
            return await (await self.s3()).head(url) is not None
        except S3Error as e:
            if e.status != 403:
                raise
            log.debug("HEAD %s: 403, taken as not there yet", url)
            return False

    async def writer(self, output: str, rel: str, schema: pa.Schema) -> OutputWriter:
        """Where a shard's rows go: `<output>/<rel>`, published whole on commit."""
        if not is_s3(output):
            return ShardWriter(os.path.join(output, rel), schema, f"{os.getpid()}")
        return S3ShardWriter(await self.s3(), S3Url.parse(output).join(rel), schema)

    async def write_manifest(self, output: str, manifest: dict[str, Any]) -> None:
        if not is_s3(output):
            write_manifest(output, manifest)
            return
        url = S3Url.parse(output).join(MANIFEST)
        await (await self.s3()).put_bytes(url, manifest_bytes(manifest), "application/json")


@dataclass(eq=False)
class OpenShard:
    """A shard from `Prefetch`: its stream, or why it couldn't be opened."""

    ref: ShardRef
    stream: BinaryIO | None
    error: BaseException | None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class Prefetch:
    """Shards opened in order, `in_flight` at a time (the one being read included), so that
    the next shards download while this one is parsed and computed.

    `async with storage.prefetch(shards, n) as opened: async for shard in opened: ...`;
    close each shard when done with it.
    """

    def __init__(self, storage: Storage, shards: list[ShardRef], in_flight: int) -> None:
        self._storage = storage
        self._todo = deque(shards)
        self._in_flight = max(1, in_flight)
        self._opening: deque[tuple[ShardRef, asyncio.Task[BinaryIO]]] = deque()

    async def __aenter__(self) -> Prefetch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [task for _, task in self._opening]
        self._opening.clear()
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if not isinstance(result, BaseException):
                result.close()

    def __aiter__(self) -> Prefetch:
        return self

    async def __anext__(self) -> OpenShard:
        while self._todo and len(self._opening) < self._in_flight:
            ref = self._todo.popleft()
            self._opening.append((ref, asyncio.create_task(self._storage.open(ref))))
        if not self._opening:
            raise StopAsyncIteration
        ref, task = self._opening[0]
        try:
            stream = await task
        except (BatchJobError, OSError) as e:
            return OpenShard(ref, None, e)
        finally:
            if task.done():
                self._opening.popleft()
        return OpenShard(ref, stream, None)

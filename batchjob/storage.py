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
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from batchjob.errors import BatchJobError, StorageError, UsageError
from batchjob.paths import local_output_path
from batchjob.s3 import S3, S3Error, S3Url, is_s3
from batchjob.shards import ShardRef, checked, hidden, list_shards, parse_shard_list, shard
from batchjob.sinks import (
    MANIFEST,
    OutputWriter,
    S3ShardWriter,
    SchemaSource,
    ShardWriter,
    manifest_bytes,
    stale_temp_files,
    write_manifest,
)

log = logging.getLogger("batchjob.storage")

SHARD_LIST_MAX_BYTES = 64 << 20  # an --input-manifest is read whole
WRITE_CHECK = "_batchjob/write-check"  # what the S3 write check leaves under an output


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


async def _is_object(s3: S3, url: S3Url) -> bool:
    """Whether `url` names an object rather than a prefix. A policy that grants reads only
    under the prefix answers the HEAD 403: then it is taken for a prefix, and listed."""
    try:
        return await s3.head(url) is not None
    except S3Error as e:
        if e.status != 403:
            raise
        return False


def _usage(flag: str, e: S3Error) -> BatchJobError:
    """A listing that can never work (no bucket, no access) is a bad invocation."""
    return UsageError(f"{flag}: {e}") if e.client_fault else e


def _remove_stale_temp_files(output: str | None) -> None:
    for path in stale_temp_files(output):
        log.info("removing %s, left by a run that is gone", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _check_local_output(output: str) -> None:
    """Create `output` and write (then remove) a file in it: a read-only or full file system,
    a missing permission or a file in the way is found before any work."""
    try:
        os.makedirs(output, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".batchjob-write-check-", dir=output)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--output {output}: can't be written: {e.strerror or e}") from None


class Storage:
    """Local paths and s3:// URIs: list shards, open them, write outputs and the manifest.

    `async with Storage() as storage:`; one per event loop.
    """

    def __init__(self, *, connections: int = 10, expected_bucket_owner: str | None = None) -> None:
        self.connections = connections
        self.expected_bucket_owner = expected_bucket_owner
        self._stack = contextlib.AsyncExitStack()
        self._s3: S3 | None = None

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def s3(self) -> S3:
        if self._s3 is None:
            s3 = S3(connections=self.connections, expected_bucket_owner=self.expected_bucket_owner)
            self._s3 = await self._stack.enter_async_context(s3)
        return self._s3

    # -- input ------------------------------------------------------------------------------

    async def list_shards(
        self, root: str, fmt: str = "auto", exclude: str | None = None, label: str = "--input"
    ) -> list[ShardRef]:
        """The shards of `root`: a file or object (one shard), or everything under a directory
        or prefix, in a stable order (key order on S3). `exclude`: the output, when it lies
        inside the input. Not listed: folder markers (keys ending in "/"), hidden names, and
        the outputs of earlier runs (under a `_manifest.json`). `label` names `root` in errors."""
        if not is_s3(root):
            return list_shards(root, fmt, exclude, label)
        url, s3 = S3Url.parse(root), await self.s3()
        try:
            if url.key and not url.key.endswith("/") and await _is_object(s3, url):
                return [shard(root, posixpath.basename(url.key), fmt)]
            prefix = url.prefix
            objects = [obj.key async for obj in s3.list_objects(S3Url(url.bucket, prefix))]
        except S3Error as e:
            raise _usage(f"{label} {root}", e) from None
        skip = []  # key prefixes not to read: the output, earlier outputs
        if exclude and is_s3(exclude):
            out = S3Url.parse(exclude)
            if out.bucket == url.bucket and out.prefix.startswith(prefix) and out.prefix != prefix:
                skip.append(out.prefix)
        for key in objects:
            if key.endswith("/" + MANIFEST) and len(key) > len(prefix + MANIFEST):
                skip.append(key[: -len(MANIFEST)])
                log.warning("skipping s3://%s/%s: an earlier run's output", url.bucket, skip[-1])
        shards, skipped = [], []
        for key in objects:
            rel = key[len(prefix) :]
            if not rel or rel.endswith("/") or hidden(rel) or key.startswith(tuple(skip)):
                continue
            try:
                shards.append(shard(str(S3Url(url.bucket, key)), rel, fmt))
            except UsageError:
                skipped.append(rel)
        if not shards and not skipped:
            raise UsageError(f"{label} {root}: no such object, nor objects under {prefix!r}")
        return checked(f"{label} {root}", shards, skipped)

    async def read_shard_list(self, uri: str, fmt: str = "auto") -> list[ShardRef]:
        """The shards an `--input-manifest` names, in its order (`shards.parse_shard_list`)."""
        data = await self._read_small(uri, "--input-manifest")
        # surrogateescape: a local path that is not UTF-8 still names its file.
        text = data.decode("utf-8", "surrogateescape")
        return parse_shard_list(text, f"--input-manifest {uri}", fmt)

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

    async def earlier_manifest(self, output: str) -> dict[str, Any] | None:
        """The `_manifest.json` an earlier run left in `output`; None when there is none (or
        it can't be read: a run killed hard leaves none)."""
        uri = str(S3Url.parse(output).join(MANIFEST)) if is_s3(output) else f"{output}/{MANIFEST}"
        try:
            data = json.loads(await self._read_small(uri, "--resume"))
        except (BatchJobError, ValueError):
            return None
        return data if isinstance(data, dict) else None

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
        """`check_writable`, then with `list_existing` (--resume) `existing_outputs`."""
        await self.check_writable(output)
        return await self.existing_outputs(output) if list_existing else set()

    async def check_writable(self, output: str) -> None:
        """Before any work: a missing bucket or directory, no permission, a read-only file
        system are a UsageError naming the output."""
        if not is_s3(output):
            await asyncio.to_thread(_check_local_output, output)
            return
        # One small object, overwritten by every start: only a write proves a write works.
        note = b"batchjob checks here that it may write under this prefix\n"
        try:
            await (await self.s3()).put_bytes(
                S3Url.parse(output).join(WRITE_CHECK), note, "text/plain"
            )
        except S3Error as e:
            raise UsageError(f"--output {output}: can't be written: {e}") from None
        await asyncio.to_thread(_remove_stale_temp_files, None)  # where S3 outputs are staged

    async def existing_outputs(self, output: str) -> set[str]:
        """The relative paths of the shard outputs already under `output`, in one listing
        (not a HEAD per shard). Locally, also removes the temp files left by runs of this
        host that are gone."""
        if not is_s3(output):
            await asyncio.to_thread(_remove_stale_temp_files, output)
            return await asyncio.to_thread(existing_local_outputs, output)
        url, s3 = S3Url.parse(output), await self.s3()
        prefix = S3Url(url.bucket, url.prefix)
        try:
            return {
                obj.key[len(prefix.key) :]
                async for obj in s3.list_objects(prefix)
                if obj.key.endswith(".parquet")
            }
        except S3Error as e:
            raise _usage(f"--output {output}", e) from None

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

    async def writer(self, output: str, rel: str, schema: SchemaSource) -> OutputWriter:
        """Where a shard's rows go: `<output>/<rel>`, published whole on commit. A local path
        that would leave `output` (`..` in an S3 key) is a StorageError: that shard fails."""
        if not is_s3(output):
            path = local_output_path(output, rel)
            if path is None:
                raise StorageError(f"its output {rel} would be written outside {output}")
            # Not in a thread: cancelled while a thread opened it, nobody would remove the file.
            return ShardWriter(path, schema)
        return S3ShardWriter(await self.s3(), S3Url.parse(output).join(rel), schema)

    async def write_manifest(self, output: str, manifest: dict[str, Any]) -> None:
        """StorageError when it can't be written (a full disk, S3 errors past retries)."""
        if not is_s3(output):
            try:
                write_manifest(output, manifest)
            except OSError as e:
                raise StorageError(f"can't write {output}/{MANIFEST}: {e}") from None
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

"""`--model s3://bucket/key/model.tar.gz` or `--model s3://bucket/prefix/`: the model fetched
once into the cache directory, as SageMaker fetches `ModelDataUrl` for `serve`.

The cache holds one slot per URL, and in it one entry per version of what the URL named:

    <cache>/models/<name>-<url digest>/.lock
    <cache>/models/<name>-<url digest>/<version digest>/download.json
    <cache>/models/<name>-<url digest>/<version digest>/<name>/...   the model

A version is the object's ETag, version id and size (an archive: one HEAD finds it), or every
object's key, size and ETag (a prefix: one listing). A run that finds its version's entry
downloads nothing; a changed object is a new version, downloaded anew. `download.json`
records the SHA-256 of the archive as downloaded and of every file of the model, and a
reused entry is checked against them (a damaged entry is refused, naming what to delete).

An entry is written in a staging directory and renamed into place whole, under the slot's
lock file: a killed download never becomes an entry, and processes starting at once download
once (the others wait for the lock, then find the entry).

An archive is unpacked only as regular files and directories below the entry (safe_tar.py):
absolute names, `..`, links of any kind and device files are refused, as are archives whose
files add up to more than 64 GiB or 100,000 entries, or more than the free disk space. A
prefix's keys are files below the entry; a key with an empty, `.` or `..` component is
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from batchjob.artifact import file_checksums, verify_files
from batchjob.artifact_manifest import MANIFEST
from batchjob.config import CompileSpec
from batchjob.errors import BatchJobError, UsageError
from batchjob.s3 import BODY_RESUMES, S3, S3Error, S3Url, is_s3, s3_error
from batchjob.safe_tar import COPY_BYTES, flush, unpack
from batchjob.staging import fsync_path

log = logging.getLogger("batchjob.model_location")
T = TypeVar("T")

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MODELS_DIR = "models"
RECORD = "download.json"
STAGING_PREFIX = ".fetching-"
DOWNLOADS_IN_FLIGHT = 4  # a prefix's objects at once


@dataclass(frozen=True)
class Fetched:
    """A model fetched into the cache: `path` its directory, `downloaded` whether this call
    downloaded it (False: the entry was there already)."""

    path: str
    downloaded: bool


def fetch_model(
    url: str, cache_dir: str, *, expected_bucket_owner: str | None = None, flag: str = "--model"
) -> Fetched:
    """The local directory of the model at `url` (an s3:// archive or prefix), fetched into
    `cache_dir` unless this version is there already. Blocking; callable from inside an event
    loop (it runs its own in a thread). UsageError: the URL names nothing (or nothing we may
    read), or what it names is refused; StorageError: S3 failed past its retries."""
    location = S3Url.parse(url)
    if not location.key or (not _is_archive(location.key) and not location.key.endswith("/")):
        location = S3Url(location.bucket, location.prefix)  # a prefix, as a directory
    slot = os.path.join(cache_dir, MODELS_DIR, _slot_name(location))
    return _Fetch(location, slot, expected_bucket_owner, flag).run()


def _in_own_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` in an event loop of its own thread: callers may be in a loop."""
    with ThreadPoolExecutor(1, thread_name_prefix="fetch-model") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def local_compile_spec(
    spec: CompileSpec, cache_dir: str, *, expected_bucket_owner: str | None = None
) -> CompileSpec:
    """`spec` with an s3:// model fetched (`fetch_model`) and named by its local directory,
    the URL kept as its `source`; any other spec as it is."""
    if not is_s3(spec.model):
        return spec
    fetched = fetch_model(spec.model, cache_dir, expected_bucket_owner=expected_bucket_owner)
    return dataclasses.replace(spec, model=fetched.path, source=spec.model)


def _is_archive(key: str) -> bool:
    return key.endswith(ARCHIVE_SUFFIXES)


def _model_name(location: S3Url) -> str:
    """`s3://b/models/bert/model.tar.gz` → bert; `s3://b/models/minilm/` → minilm."""
    parts = [p for p in location.key.split("/") if p]
    if parts and _is_archive(parts[-1]):
        stem = re.sub(r"(\.tar\.gz|\.tgz|\.tar)$", "", parts.pop())
        if stem != "model" or not parts:  # SageMaker's model.tar.gz: its folder names it
            parts.append(stem)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", parts[-1] if parts else location.bucket)
    return name.lstrip(".") or "model"


def _slot_name(location: S3Url) -> str:
    return f"{_model_name(location)}-{_digest(str(location).encode())[:12]}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(slot: str) -> Iterator[None]:
    """The slot's lock: one process at a time checks, downloads and publishes its entries."""
    try:
        os.makedirs(slot, exist_ok=True)
        fd = os.open(os.path.join(slot, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"--cache-dir: can't keep a model in {slot}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Fetch:
    def __init__(
        self, location: S3Url, slot: str, expected_bucket_owner: str | None, flag: str
    ) -> None:
        self.location = location
        self.slot = slot
        self.owner = expected_bucket_owner
        self.flag = flag
        self.name = _model_name(location)

    def run(self) -> Fetched:
        version = _in_own_loop(self._version())
        entry = os.path.join(self.slot, _digest(json.dumps(version).encode())[:16])
        with _locked(self.slot):
            if os.path.isfile(os.path.join(entry, RECORD)):
                return Fetched(self._reuse(entry), False)
            self._remove_abandoned()
            staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.slot)
            try:
                record = _in_own_loop(self._download(version, staging))
                _write_json(os.path.join(staging, RECORD), record)
                fsync_path(staging)
                os.rename(staging, entry)  # whole, or not at all
                fsync_path(self.slot)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        log.info("fetched %s into %s", self.location, entry)
        return Fetched(os.path.join(entry, self.name), True)

    async def _version(self) -> dict[str, Any]:
        async with S3(expected_bucket_owner=self.owner) as s3:
            try:
                if _is_archive(self.location.key):
                    return await self._archive_version(s3)
                return await self._prefix_version(s3)
            except S3Error as e:
                raise self._usage(e) from None

    def _usage(self, e: S3Error) -> BatchJobError:
        return UsageError(f"{self.flag} {self.location}: {e}") if e.client_fault else e

    # -- which version -----------------------------------------------------------------------

    async def _archive_version(self, s3: S3) -> dict[str, Any]:
        head = await s3.head(self.location)
        if head is None:
            raise UsageError(f"{self.flag} {self.location}: no such object")
        return {
            "url": str(self.location),
            "etag": head.etag,
            "version_id": head.version_id,
            "size": head.size,
        }

    async def _prefix_version(self, s3: S3) -> dict[str, Any]:
        objects = []
        async for obj in s3.list_objects(self.location):
            rel = obj.key[len(self.location.key) :]
            if rel.endswith("/") and obj.size == 0:
                continue  # a folder marker
            parts = rel.split("/")
            if any(part in ("", ".", "..") for part in parts):
                raise UsageError(
                    f"{self.flag} {self.location}: the key {obj.key!r} can't be a file of the "
                    "model (an empty, '.' or '..' path component)"
                )
            objects.append([rel, obj.size, obj.etag])
        if not objects:
            raise UsageError(
                f"{self.flag} {self.location}: no objects under this prefix (an archive must "
                f"end in {', '.join(ARCHIVE_SUFFIXES)})"
            )
        return {"url": str(self.location), "objects": objects}

    # -- reusing an entry --------------------------------------------------------------------

    def _reuse(self, entry: str) -> str:
        path = os.path.join(entry, self.name)
        try:
            with open(os.path.join(entry, RECORD), encoding="utf-8") as f:
                files = json.load(f)["files"]
            _verify(path, files)
        except (OSError, ValueError, KeyError, TypeError, UsageError) as e:
            reason = str(e) if isinstance(e, UsageError) else f"{RECORD}: {e}"
            raise UsageError(
                f"{reason} (a cached download of {self.location}: delete {entry} to fetch it again)"
            ) from None
        log.info("using the cached download of %s at %s", self.location, path)
        return path

    def _remove_abandoned(self) -> None:
        """Staging directories are only made under the lock: any found now were left by a
        download that was killed."""
        for name in os.listdir(self.slot):
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(self.slot, name), ignore_errors=True)

    # -- downloading -------------------------------------------------------------------------

    async def _download(self, version: dict[str, Any], staging: str) -> dict[str, Any]:
        async with S3(expected_bucket_owner=self.owner) as s3:
            return await self._download_with(s3, version, staging)

    async def _download_with(self, s3: S3, version: dict[str, Any], staging: str) -> dict[str, Any]:
        model = os.path.join(staging, self.name)
        await asyncio.to_thread(os.mkdir, model)
        record: dict[str, Any] = {**version, "fetched_at": time.time()}
        if "objects" in version:
            slots = asyncio.Semaphore(DOWNLOADS_IN_FLIGHT)

            async def one(rel: str, etag: str) -> tuple[str, str]:
                target = os.path.join(model, *rel.split("/"))
                await asyncio.to_thread(os.makedirs, os.path.dirname(target), exist_ok=True)
                async with slots:
                    digest = await self._get(s3, self.location.join(rel), etag, target)
                return rel, digest

            found = await asyncio.gather(*(one(rel, etag) for rel, _, etag in version["objects"]))
            record["objects_sha256"] = dict(found)
        else:
            archive = os.path.join(staging, ".archive")
            record["sha256"] = await self._get(s3, self.location, version["etag"], archive)
            try:
                await asyncio.to_thread(unpack, archive, model, str(self.location), self.flag)
            finally:
                await asyncio.to_thread(os.unlink, archive)
        files = await asyncio.to_thread(_checksums, model)
        if not files:
            raise UsageError(f"{self.flag} {self.location}: the archive holds no files")
        record["files"] = files
        return record

    async def _get(self, s3: S3, url: S3Url, etag: str, target: str) -> str:
        """Download `url` to `target`, its SHA-256. If-Match `etag`: the version that was
        looked up, also for the ranged GETs that resume a body that broke (botocore retries
        a request only until its headers arrive)."""
        sha, size, resumes = hashlib.sha256(), 0, 0
        f = await asyncio.to_thread(open, target, "wb")
        try:
            response = await self._get_from(s3, url, etag, 0)
            expected = int(response["ContentLength"])
            while True:
                body = response["Body"]
                try:
                    while data := await body.read(COPY_BYTES):
                        sha.update(data)
                        size += len(data)
                        await asyncio.to_thread(f.write, data)
                    break
                except Exception as e:  # botocore, aiohttp and socket errors alike
                    resumes += 1
                    if resumes > BODY_RESUMES:
                        raise s3_error("GetObject", url, e) from e
                    log.warning("%s broke at byte %d (%s): resuming", url, size, e)
                finally:
                    body.release()
                response = await self._get_from(s3, url, etag, size)
            await asyncio.to_thread(flush, f)
        finally:
            f.close()
        if size != expected:
            raise S3Error(f"GetObject {url}: {size} bytes of {expected} arrived", "Truncated")
        return sha.hexdigest()

    async def _get_from(self, s3: S3, url: S3Url, etag: str, offset: int) -> Any:
        options = {"IfMatch": etag} if etag else {}
        if offset:
            options["Range"] = f"bytes={offset}-"
        try:
            return await s3.get(url, **options)
        except S3Error as e:
            if e.status == 412:
                raise S3Error(f"GetObject {url}: changed while it was fetched; try again") from e
            raise self._usage(e) from None


def _checksums(root: str) -> dict[str, str]:
    """SHA-256 of every file under `root` by relative path, an artifact's manifest included
    (artifact.file_checksums leaves it out: it lists the others)."""
    found = file_checksums(root)
    if os.path.isfile(manifest := os.path.join(root, MANIFEST)):
        found[MANIFEST] = _sha256(manifest)
    return found


def _verify(root: str, files: dict[str, str]) -> None:
    """As recorded (UsageError naming the file if not). The files but the manifest are
    checked as an artifact's are, so that loading the artifact next finds them verified."""
    files = dict(files)
    if MANIFEST in files and _sha256(os.path.join(root, MANIFEST)) != files.pop(MANIFEST):
        raise UsageError(f"{os.path.join(root, MANIFEST)}: SHA-256 does not match {RECORD}")
    verify_files(root, files)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())

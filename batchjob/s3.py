"""S3 through aioboto3: list a prefix, stream an object, put a file whole. Shared by `run`
(through storage.py) and the queue worker.

Endpoints, credentials, region and retries come from the standard AWS configuration
(`AWS_ENDPOINT_URL[_S3]`, profiles, `AWS_MAX_ATTEMPTS`, `AWS_RETRY_MODE`): nothing here
overrides them. Every failure that survives botocore's retries becomes an `S3Error` whose
message names the call, the object, the error code and how many attempts were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import queue
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from batchjob.errors import StorageError, UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("batchjob.s3")

SCHEME = "s3://"
CHUNK_BYTES = 1 << 20  # what a reader thread takes from the download at a time
CHUNKS_AHEAD = 2  # per open object: downloaded but not yet read (bounds memory)
MULTIPART_THRESHOLD = 64 << 20  # larger files are uploaded in parts
PART_BYTES = 16 << 20  # ≥ 5 MiB, S3's minimum part size; at most 10,000 parts
UPLOADS_IN_FLIGHT = 4
CONNECT_TIMEOUT = 10  # seconds
READ_TIMEOUT = 60  # seconds without a byte from S3: botocore gives up on that attempt
# botocore retries a request until its response headers arrive; a body that breaks later
# (a reset connection mid-object) is resumed from where it broke with a ranged GET.
BODY_RESUMES = 3
# A concurrent conditional write answers 409 ConditionalRequestConflict: S3 asks for a retry.
CONFLICT_RETRIES = 5
_STREAM_ERRORS = (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def is_s3(uri: str) -> bool:
    return uri.startswith(SCHEME)


@dataclass(frozen=True, slots=True)
class S3Url:
    bucket: str
    key: str  # an object's key, or a prefix ("" for the whole bucket)

    @classmethod
    def parse(cls, uri: str) -> S3Url:
        if not is_s3(uri):
            raise UsageError(f"{uri!r} is not an s3:// URI")
        bucket, _, key = uri[len(SCHEME) :].partition("/")
        if not bucket:
            raise UsageError(f"{uri!r}: no bucket name (expected s3://bucket/key)")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def prefix(self) -> str:
        """The key as a "directory": "" or ending with "/"."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    def join(self, rel: str) -> S3Url:
        return S3Url(self.bucket, self.prefix + rel)


class S3Error(StorageError):
    """An S3 call that failed after botocore's retries; `code` is S3's ("NoSuchKey", "503"...)."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    @property
    def client_fault(self) -> bool:
        """A 4xx other than throttling or timeout: trying again won't help."""
        return 400 <= self.status < 500 and self.status not in (408, 429)


def s3_error(call: str, url: S3Url, e: Exception) -> S3Error:
    if isinstance(e, ClientError):
        error, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        code = str(error.get("Code") or meta.get("HTTPStatusCode", "?"))
        attempts = int(meta.get("RetryAttempts", 0)) + 1
        after = f" after {attempts} attempts" if attempts > 1 else ""
        message = " ".join(str(error.get("Message") or "").split())  # one line, always
        text = f"{call} {url}: {code}{after}" + (f": {message}" if message else "")
        return S3Error(text, code, int(meta.get("HTTPStatusCode") or 0))
    text = " ".join(str(e).split())
    return S3Error(f"{call} {url}: {type(e).__name__}: {text}", type(e).__name__)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    version_id: str | None = None  # HEAD only, in a versioned bucket


class S3:
    """An open S3 client: `async with S3() as s3: ...`, within one event loop."""

    def __init__(
        self,
        *,
        connections: int = 10,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_bytes: int = PART_BYTES,
        expected_bucket_owner: str | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.connections = connections
        self.expected_bucket_owner = expected_bucket_owner
        self.read_timeout = read_timeout
        self.multipart_threshold = multipart_threshold
        self.part_bytes = part_bytes
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._uploads = asyncio.Semaphore(UPLOADS_IN_FLIGHT)

    async def __aenter__(self) -> S3:
        # The pool size and timeouts are ours (a stalled peer must not hold a connection for
        # long); retries and endpoints stay as the environment says.
        config = Config(
            max_pool_connections=self.connections,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=self.read_timeout,
            tcp_keepalive=True,
        )
        client = aioboto3.Session().client("s3", config=config)
        self._client = await self._stack.enter_async_context(client)
        if self.expected_bucket_owner is not None:
            self._client.meta.events.register(
                "provide-client-params.s3.*", self._add_expected_bucket_owner
            )
        return self

    def _add_expected_bucket_owner(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        """Every call that can name the bucket's owner names it: S3 then refuses (403) a
        bucket of another account, e.g. one taken over after ours was deleted."""
        if "ExpectedBucketOwner" in model.input_shape.members:
            params.setdefault("ExpectedBucketOwner", self.expected_bucket_owner)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    # -- reading --------------------------------------------------------------------------

    async def list_objects(self, url: S3Url) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `url.key`, in key order, page after page."""
        kwargs: dict[str, Any] = {"Bucket": url.bucket, "Prefix": url.key}
        while True:
            try:
                page = await self._client.list_objects_v2(**kwargs)
            except (ClientError, BotoCoreError) as e:
                raise s3_error("ListObjectsV2", url, e) from e
            for obj in page.get("Contents", ()):
                yield ObjectInfo(obj["Key"], int(obj["Size"]), obj.get("ETag", ""))
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    async def head(self, url: S3Url) -> ObjectInfo | None:
        """The object's size and ETag; None when there is no such object."""
        try:
            r = await self._client.head_object(Bucket=url.bucket, Key=url.key)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise s3_error("HeadObject", url, e) from e
        except BotoCoreError as e:
            raise s3_error("HeadObject", url, e) from e
        return ObjectInfo(url.key, int(r["ContentLength"]), r.get("ETag", ""), r.get("VersionId"))

    async def open(self, url: S3Url) -> ObjectReader:
        """The object as a blocking stream for a worker thread, downloaded ahead in the loop.

        Raises S3Error when the GET fails (NoSuchKey, AccessDenied, SlowDown past retries).
        Close it (from any thread) to stop the download.
        """
        reader = ObjectReader(self, url)
        await reader.start()
        return reader

    async def get(self, url: S3Url, **options: Any) -> Any:
        try:
            return await self._client.get_object(Bucket=url.bucket, Key=url.key, **options)
        except (ClientError, BotoCoreError) as e:
            raise s3_error("GetObject", url, e) from e

    async def read_bytes(self, url: S3Url, limit: int) -> bytes:
        """A small object whole (a manifest); S3Error when larger than `limit` bytes."""
        response = await self.get(url)
        body = response["Body"]
        try:
            if int(response["ContentLength"]) > limit:
                raise S3Error(f"GetObject {url}: larger than {limit} bytes", "TooLarge")
            data: bytes = await body.read()
            return data
        except _STREAM_ERRORS as e:
            raise s3_error("GetObject", url, e) from e
        finally:
            body.release()

    # -- writing --------------------------------------------------------------------------

    async def put_bytes(self, url: S3Url, data: bytes, content_type: str) -> None:
        """Overwrites: for files rewritten by every run, such as `_manifest.json`."""
        try:
            await self._client.put_object(
                Bucket=url.bucket, Key=url.key, Body=data, ContentType=content_type
            )
        except (ClientError, BotoCoreError) as e:
            raise s3_error("PutObject", url, e) from e

    async def put_file_once(self, path: str, url: S3Url) -> bool:
        """Upload a local file whole, only if `url` does not exist yet (`If-None-Match: *`).

        True: written now. False: it existed already (412: another run wrote it). The object
        appears complete or not at all; a multipart upload that fails is aborted.
        """
        size = await asyncio.to_thread(os.path.getsize, path)
        async with self._uploads:
            for attempt in range(1, CONFLICT_RETRIES + 1):
                try:
                    if size > self.multipart_threshold:
                        await self._put_multipart(path, size, url)
                    else:
                        await self._put_single(path, url)
                    return True
                except ClientError as e:
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status == 412:
                        return False
                    if status != 409 or attempt == CONFLICT_RETRIES:
                        raise s3_error(e.operation_name, url, e) from e
                    await asyncio.sleep(random.uniform(0, 0.1 * 2**attempt))
                except BotoCoreError as e:
                    raise s3_error("PutObject", url, e) from e
        raise AssertionError("unreachable")

    async def _put_single(self, path: str, url: S3Url) -> None:
        # Streamed from the file (aiohttp reads it in a thread); rewound by botocore on retry.
        body = await asyncio.to_thread(open, path, "rb")
        try:
            await self._client.put_object(
                Bucket=url.bucket, Key=url.key, Body=body, IfNoneMatch="*"
            )
        finally:
            body.close()

    async def _put_multipart(self, path: str, size: int, url: S3Url) -> None:
        part_bytes = max(self.part_bytes, -(-size // 10_000))
        created = await self._client.create_multipart_upload(Bucket=url.bucket, Key=url.key)
        upload = {"Bucket": url.bucket, "Key": url.key, "UploadId": created["UploadId"]}
        try:
            parts = []
            f = await asyncio.to_thread(open, path, "rb")
            try:
                for number in range(1, -(-size // part_bytes) + 1):
                    data = await asyncio.to_thread(f.read, part_bytes)
                    r = await self._client.upload_part(**upload, PartNumber=number, Body=data)
                    parts.append({"PartNumber": number, "ETag": r["ETag"]})
            finally:
                f.close()
            await self._client.complete_multipart_upload(
                **upload, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            )
        except BaseException:
            # Parts of an abandoned upload are billed until aborted; shielded so that a
            # cancelled run still aborts.
            await asyncio.shield(self._abort(upload))
            raise

    async def _abort(self, upload: dict[str, str]) -> None:
        try:
            await self._client.abort_multipart_upload(**upload)
        except (ClientError, BotoCoreError) as e:
            log.warning("couldn't abort multipart upload %s: %s", upload["UploadId"], e)


class ObjectReader(io.RawIOBase):
    """One object's body: a task in the event loop downloads it into a bounded queue of
    chunks; a worker thread reads it as a blocking, read-only stream.

    At most CHUNKS_AHEAD chunks wait in the queue, so a large object is never held whole.
    """

    def __init__(self, s3: S3, url: S3Url) -> None:
        self.url = url
        self._s3 = s3
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(CHUNKS_AHEAD)
        self._space = asyncio.Event()  # set by the reader thread after it takes a chunk
        self._stopped = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._current = memoryview(b"")
        self._eof = False
        self._error: BaseException | None = None

    async def start(self) -> None:
        response = await self._s3.get(self.url)
        self._task = asyncio.create_task(self._download(response))

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes (all the rest for -1); b"" at the end. Blocking: call it from a
        worker thread, never from the event loop's."""
        if size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_BYTES), b""))
        if not self._fill():
            return b""
        data = bytes(self._current[:size])
        self._current = self._current[len(data) :]
        return data

    def readinto(self, buffer: Buffer, /) -> int:
        if not self._fill():
            return 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._current))
        view[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def _fill(self) -> bool:
        """Make sure some bytes are at hand; False at the end of the object."""
        if not self._current:
            if self._eof:
                return False
            item = self._error or self._take()
            if isinstance(item, BaseException):
                self._error = item  # raised again by any later read
                raise item
            if not item:
                self._eof = True
                return False
            self._current = memoryview(item)
        return True

    def close(self) -> None:
        if not self.closed:
            self._stopped.set()
            if self._task is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: so is the task
                    self._loop.call_soon_threadsafe(self._task.cancel)
        super().close()

    def _take(self) -> bytes | BaseException:
        while True:
            try:
                item = self._chunks.get(timeout=0.5)
            except queue.Empty:
                if not self._stopped.is_set():
                    continue
                try:  # the download may have put its last chunk just before it stopped
                    item = self._chunks.get_nowait()
                except queue.Empty:
                    return S3Error(f"GetObject {self.url}: the stream was closed", "Closed")
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._space.set)
            return item

    async def _put(self, item: bytes | BaseException) -> None:
        while True:
            self._space.clear()
            if not self._chunks.full():
                self._chunks.put_nowait(item)
                return
            await self._space.wait()

    async def _download(self, response: Any) -> None:
        body, etag, offset, resumes = response["Body"], response.get("ETag"), 0, 0
        try:
            while True:
                chunk, eof = bytearray(), False
                try:
                    while len(chunk) < CHUNK_BYTES:
                        data = await body.read(CHUNK_BYTES - len(chunk))
                        if not data:
                            eof = True
                            break
                        chunk += data
                except _STREAM_ERRORS as e:
                    resumes += 1
                    if resumes > BODY_RESUMES:
                        raise s3_error("GetObject", self.url, e) from e
                    log.warning("%s broke at byte %d (%s): resuming", self.url, offset, e)
                    body.close()
                    # If-Match: the rest must come from the same version of the object.
                    options = {"Range": f"bytes={offset + len(chunk)}-", "IfMatch": etag}
                    body = (await self._s3.get(self.url, **options))["Body"]
                offset += len(chunk)
                if chunk:
                    await self._put(bytes(chunk))
                if eof:
                    await self._put(b"")
                    return
        except Exception as e:  # the reader thread raises it
            await self._put(e)
        finally:
            # Back to the pool when read whole (keep-alive), closed when not.
            body.release()
            # The reader thread stops waiting once the queue is empty, also when this task
            # was cancelled with the event loop's teardown rather than through close().
            self._stopped.set()

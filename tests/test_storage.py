"""storage.py and s3.py against a real S3 server (moto, in server mode, on loopback): listing
past one page, odd keys, shard lists, streaming in bounded memory, retries and their limits,
conditional uploads, multipart uploads and their abort."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from batchjob.errors import UsageError
from batchjob.records import Fields, read_records
from batchjob.s3 import CHUNK_BYTES, CHUNKS_AHEAD, S3, S3Error, S3Url
from batchjob.storage import ShardRef, Storage
from tests.s3_server import (
    Bucket,
    Fault,
    FaultProxy,
)

T = TypeVar("T")
ODD = "odd dir/a+b=c/résumé ü.jsonl"  # space, +, =, non-ASCII


def run(work: Callable[[Storage], Awaitable[T]]) -> T:
    async def main() -> T:
        async with Storage() as storage:
            return await work(storage)

    return asyncio.run(main())


def read_all(uri: str) -> bytes:
    async def main() -> bytes:
        async with Storage() as storage:
            stream = await storage.open(ShardRef(uri, "x", "jsonl", False))
            try:
                return await asyncio.to_thread(stream.read)
            finally:
                stream.close()

    return asyncio.run(main())


def jsonl(n: int, start: int = 0) -> bytes:
    return "".join(
        json.dumps({"id": str(i), "text": f"t{i}"}) + "\n" for i in range(start, n)
    ).encode()


# -- URIs -------------------------------------------------------------------------------------


def test_s3_urls() -> None:
    url = S3Url.parse("s3://bkt/a/b.jsonl")
    assert (url.bucket, url.key, url.prefix) == ("bkt", "a/b.jsonl", "a/b.jsonl/")
    assert str(url) == "s3://bkt/a/b.jsonl"
    assert S3Url.parse("s3://bkt").prefix == ""
    assert S3Url.parse("s3://bkt/").prefix == ""
    assert S3Url.parse("s3://bkt/out/").join("x/y.parquet") == S3Url("bkt", "out/x/y.parquet")
    assert S3Url.parse("s3://bkt/out").join("y.parquet") == S3Url("bkt", "out/y.parquet")
    for bad in ("s3://", "s3:///key", "/local/path"):
        with pytest.raises(UsageError):
            S3Url.parse(bad)


# -- listing ----------------------------------------------------------------------------------


def test_lists_a_prefix_page_after_page_in_key_order(bucket: Bucket) -> None:
    names = [f"in/part-{i:04d}.parquet" for i in range(1003)]
    others = {
        "in/" + ODD: b"",
        "in/_SUCCESS": b"",
        "in/.hidden/x.jsonl": b"",
        "in/_tmp/x.jsonl": b"",
        "in/notes.md": b"",  # no shard format: skipped
        "in/folder/": b"",  # a console-made "folder"
        "in/out/done.parquet": b"",  # the output, inside the input
        "input-elsewhere/x.jsonl": b"",  # shares the string prefix "in", not the directory
    }
    bucket.put_many({name: b"" for name in names} | others)

    shards = run(lambda s: s.list_shards(bucket.uri("in"), exclude=bucket.uri("in/out/")))
    expected = sorted([*names, "in/" + ODD])
    assert [s.path for s in shards] == [bucket.uri(k) for k in expected]
    assert [s.rel for s in shards] == [k.removeprefix("in/") for k in expected]
    assert shards[0].output_rel == "odd dir/a+b=c/résumé ü.parquet"
    assert {s.format for s in shards} == {"parquet", "jsonl"}
    again = run(lambda s: s.list_shards(bucket.uri("in/"), exclude=bucket.uri("in/out/")))
    assert again == shards

    # --resume lists the output prefix once, also past one page
    found = run(lambda s: s.prepare_output(bucket.uri("in/"), list_existing=True))
    assert found == {n.removeprefix("in/") for n in names} | {"out/done.parquet"}


def test_an_object_is_one_shard_and_a_name_without_slash_can_be_a_prefix(bucket: Bucket) -> None:
    bucket.put_many({"data/a.jsonl.gz": b"", "data/b.csv": b"", "data": b"not a shard"})
    shards = run(lambda s: s.list_shards(bucket.uri("data/a.jsonl.gz")))
    assert shards == [ShardRef(bucket.uri("data/a.jsonl.gz"), "a.jsonl.gz", "jsonl", True)]
    with pytest.raises(UsageError, match="can't tell the format of 'data'"):
        run(lambda s: s.list_shards(bucket.uri("data")))  # the object wins, as a file would
    bucket.client.delete_object(Bucket=bucket.name, Key="data")
    shards = run(lambda s: s.list_shards(bucket.uri("data")))
    assert [s.rel for s in shards] == ["a.jsonl.gz", "b.csv"]
    shards = run(lambda s: s.list_shards(bucket.uri("data/"), fmt="txt"))
    assert [s.format for s in shards] == ["txt", "txt"]


def test_a_name_without_slash_is_a_prefix_where_its_head_is_refused(
    bucket: Bucket, proxy: FaultProxy
) -> None:
    """A policy granting reads only under data/ answers the HEAD of "data" with 403."""
    bucket.put_many({"data/a.jsonl": b"", "data/b.csv": b""})
    proxy.faults.append(Fault("HEAD", f"/{bucket.name}/data", status=403, code="AccessDenied"))
    shards = run(lambda s: s.list_shards(bucket.uri("data")))
    assert [s.rel for s in shards] == ["a.jsonl", "b.csv"]
    assert len(proxy.seen("HEAD")) == 1


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("s3://{bucket}/nothing/", "no such object"),
        ("s3://{bucket}/nothing", "no such object"),
        ("s3://no-such-bucket-{bucket}/x/", "NoSuchBucket"),
    ],
)
def test_missing_input_is_a_usage_error(bucket: Bucket, where: str, message: str) -> None:
    bucket.put("elsewhere/a.jsonl", b"")
    uri = where.format(bucket=bucket.name)
    with pytest.raises(UsageError, match=message) as raised:
        run(lambda s: s.list_shards(uri))
    assert uri in str(raised.value)


def test_output_in_a_missing_bucket_is_a_usage_error(bucket: Bucket) -> None:
    with pytest.raises(UsageError, match=r"--output s3://no-such-bucket.*NoSuchBucket"):
        run(lambda s: s.prepare_output(f"s3://no-such-bucket-{bucket.name}/out/"))


# -- shard lists (--input-manifest) -----------------------------------------------------------


def test_sagemaker_manifest(bucket: Bucket) -> None:
    entries = [{"prefix": bucket.uri("in/")}, "a.jsonl", "sub/b.csv.gz", ODD]
    bucket.put("lists/manifest.json", json.dumps(entries).encode())
    shards = run(lambda s: s.read_shard_list(bucket.uri("lists/manifest.json")))
    assert [(s.path, s.rel, s.format, s.gzip) for s in shards] == [
        (bucket.uri("in/a.jsonl"), "a.jsonl", "jsonl", False),
        (bucket.uri("in/sub/b.csv.gz"), "sub/b.csv.gz", "csv", True),
        (bucket.uri("in/" + ODD), ODD, "jsonl", False),
    ]


def test_text_shard_list_mixes_s3_and_local(bucket: Bucket, tmp_path: Path) -> None:
    local = tmp_path / "data" / "c.txt"
    listing = tmp_path / "shards.txt"
    listing.write_text(
        f"# one a line\n{bucket.uri('p/x/a.jsonl')}\n\n{bucket.uri('p/' + ODD)}\n{local}\n"
    )
    shards = run(lambda s: s.read_shard_list(str(listing)))
    assert [s.path for s in shards] == [
        bucket.uri("p/x/a.jsonl"),
        bucket.uri("p/" + ODD),
        str(local),
    ]
    # relative to the deepest directory all share: here none but the root
    assert [s.rel for s in shards] == [
        f"{bucket.name}/p/x/a.jsonl",
        f"{bucket.name}/p/{ODD}",
        str(local).lstrip("/"),
    ]
    listing.write_text(f"{bucket.uri('p/x/a.jsonl')}\n{bucket.uri('p/b.jsonl')}\n")
    assert [s.rel for s in run(lambda s: s.read_shard_list(str(listing)))] == [
        "x/a.jsonl",
        "b.jsonl",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '[{"prefix": "s3://b/p/"}, "a.jsonl", "x/a.jsonl", "a.jsonl"]',
            "s3://b/p/a.jsonl is listed more than once",
        ),
        (
            "s3://b/p/a.jsonl\ns3://b/q/a.jsonl\ns3://b/p/a.jsonl\n",
            "s3://b/p/a.jsonl is listed more than once",
        ),
        ("a.jsonl\n./a.jsonl\n", "./a.jsonl is listed more than once"),
        ('["a.jsonl"]', 'starts with {"prefix"'),
        ('[{"prefix": "s3://b/p/"}, 7]', "entries after the prefix"),
        ("[not json", "not valid JSON"),
        ("s3://b/p/a.xml\n", "can't tell the format"),
        ("# nothing\n", "no shards"),
    ],
)
def test_bad_shard_lists(tmp_path: Path, content: str, message: str) -> None:
    listing = tmp_path / "list"
    listing.write_text(content)
    with pytest.raises(UsageError, match=message):
        run(lambda s: s.read_shard_list(str(listing)))


def test_missing_shard_list_is_a_usage_error(bucket: Bucket, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--input-manifest.*NoSuchKey"):
        run(lambda s: s.read_shard_list(bucket.uri("no/such/list.txt")))
    with pytest.raises(UsageError, match=r"--input-manifest.*No such file"):
        run(lambda s: s.read_shard_list(str(tmp_path / "nope.txt")))


# -- reading ----------------------------------------------------------------------------------


def test_streams_a_large_object_in_bounded_memory(bucket: Bucket) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choices(words, k=800)) for _ in range(50)]
    data = "".join(
        json.dumps({"id": str(i), "text": texts[i % 50]}) + "\n" for i in range(10_000)
    ).encode()
    size = len(data)
    assert size > 40 << 20
    bucket.put("big.jsonl", data)
    del data

    async def count(storage: Storage) -> tuple[int, int]:
        await storage.s3()  # the client and its service model are not the stream's memory
        tracemalloc.start()
        try:
            ref = ShardRef(bucket.uri("big.jsonl"), "big.jsonl", "jsonl", False)
            stream = await storage.open(ref)
            try:
                reader = read_records(stream, "jsonl", "big.jsonl", Fields(), chunk_size=64)
                n = await asyncio.to_thread(lambda: sum(len(c) for c in reader))
            finally:
                stream.close()
            return n, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    records, peak = run(count)
    assert records == 10_000
    # Observed ~10 MiB whatever the object's size: CHUNKS_AHEAD chunks queued, one waiting to
    # be queued, one being read, one being gathered, aiohttp's socket buffer (~2 MiB), the
    # records of a chunk, copies in passing.
    assert peak < (CHUNKS_AHEAD + 12) * CHUNK_BYTES < size / 2.5, f"peak {peak / 2**20:.1f} MiB"


def test_reads_gzip_and_odd_keys(bucket: Bucket) -> None:
    bucket.put("in/" + ODD + ".gz", gzip.compress(jsonl(5000)))

    async def ids(storage: Storage) -> list[str]:
        (ref,) = await storage.list_shards(bucket.uri("in/"))
        assert (ref.rel, ref.gzip) == (ODD + ".gz", True)
        stream = await storage.open(ref)
        try:
            chunks = read_records(stream, ref.format, ref.rel, Fields(), gzip=True)
            return await asyncio.to_thread(lambda: [r.id for c in chunks for r in c])
        finally:
            stream.close()

    assert run(ids) == [str(i) for i in range(5000)]


def test_throttled_reads_are_retried_then_fail_with_the_reason(
    bucket: Bucket, proxy: FaultProxy
) -> None:
    bucket.put_many({"flaky.jsonl": jsonl(3), "throttled.jsonl": jsonl(3)})
    proxy.faults += [Fault("GET", "/flaky.jsonl", times=2), Fault("GET", "/throttled.jsonl")]
    assert read_all(bucket.uri("flaky.jsonl")) == jsonl(3)
    assert len(proxy.seen("GET", "/flaky.jsonl")) == 3
    with pytest.raises(S3Error, match="SlowDown after 3 attempts") as raised:
        read_all(bucket.uri("throttled.jsonl"))
    assert raised.value.code == "SlowDown"
    assert bucket.uri("throttled.jsonl") in str(raised.value)
    assert len(proxy.seen("GET", "/throttled.jsonl")) == 3  # AWS_MAX_ATTEMPTS counts them all


def test_a_body_cut_short_is_resumed_where_it_broke(bucket: Bucket, proxy: FaultProxy) -> None:
    data = random.Random(1).randbytes(3 * CHUNK_BYTES + 12345)
    bucket.put("cut.bin", data)
    proxy.faults.append(Fault("GET", "/cut.bin", times=1, cut_at=CHUNK_BYTES + 777))
    assert read_all(bucket.uri("cut.bin")) == data
    first, second = proxy.seen("GET", "/cut.bin")
    assert "Range" not in first.headers
    assert second.headers["Range"].startswith("bytes=")
    assert 0 < int(second.headers["Range"][6:-1]) <= CHUNK_BYTES + 777
    assert second.headers["If-Match"]  # the rest comes from the same version


def test_prefetch_opens_shards_ahead_a_bounded_number_at_a_time(
    bucket: Bucket, proxy: FaultProxy
) -> None:
    refs = [ShardRef(bucket.uri(f"p{i}.jsonl"), f"p{i}.jsonl", "jsonl", False) for i in range(6)]
    bucket.put_many({f"p{i}.jsonl": jsonl(2) for i in range(6)})

    async def main(storage: Storage) -> list[list[int]]:
        requested = []
        async with storage.prefetch(refs, 3) as opened:
            async for shard in opened:
                deadline = time.monotonic() + 10
                want = min(int(shard.ref.rel[1]) + 3, 6)
                # The proxy runs in a thread: there is no event to await.
                while len(proxy.seen("GET")) < want and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                requested.append(sorted(int(r.path.split("/p")[1][0]) for r in proxy.seen("GET")))
                assert shard.stream is not None
                assert await asyncio.to_thread(shard.stream.read) == jsonl(2)
                shard.close()
        return requested

    assert run(main) == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], *[[0, 1, 2, 3, 4, 5]] * 3]


# -- writing ----------------------------------------------------------------------------------


def put_once(path: Path, uri: str, **options: Any) -> bool:
    async def main() -> bool:
        async with S3(**options) as s3:
            return await s3.put_file_once(str(path), S3Url.parse(uri))

    return asyncio.run(main())


def test_put_once_writes_one_version(bucket: Bucket, tmp_path: Path) -> None:
    bucket.client.put_bucket_versioning(
        Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    first, second = tmp_path / "1", tmp_path / "2"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    assert put_once(first, bucket.uri(ODD)) is True
    assert put_once(second, bucket.uri(ODD)) is False  # 412: someone wrote it already
    assert bucket.get(ODD) == b"first"
    assert bucket.versions() == {ODD: 1}


def test_multipart_put_once_and_its_abort(
    bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(random.Random(2).randbytes(11 << 20))
    small_parts = {"multipart_threshold": 5 << 20, "part_bytes": 5 << 20}
    assert put_once(big, bucket.uri("out/big.parquet"), **small_parts) is True
    assert bucket.get("out/big.parquet") == big.read_bytes()
    assert len(proxy.seen("PUT", "partNumber=")) == 3
    assert proxy.seen("POST", "uploadId=")[0].headers["If-None-Match"] == "*"
    # Completing over an existing object: 412, and the upload is aborted.
    assert put_once(big, bucket.uri("out/big.parquet"), **small_parts) is False
    assert bucket.multipart_uploads() == []
    # A part refused: the error names it, no object appears, nothing is left to bill.
    proxy.faults.append(Fault("PUT", "partNumber=2", status=403, code="AccessDenied"))
    with pytest.raises(S3Error, match=r"UploadPart s3://.*/out/other\.parquet: AccessDenied"):
        put_once(big, bucket.uri("out/other.parquet"), **small_parts)
    assert bucket.keys("out/") == ["out/big.parquet"]
    assert bucket.multipart_uploads() == []


def test_a_conditional_write_conflict_is_retried(
    bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    proxy.faults.append(
        Fault("PUT", "/c.parquet", status=409, code="ConditionalRequestConflict", times=2)
    )
    assert put_once(path, bucket.uri("c.parquet")) is True
    assert bucket.get("c.parquet") == b"data"


def test_manifest_is_overwritten_on_s3(bucket: Bucket) -> None:
    async def twice(storage: Storage) -> None:
        for n in (1, 2):
            await storage.write_manifest(bucket.uri("out/"), {"run": n})

    run(twice)
    assert json.loads(bucket.get("out/_manifest.json")) == {"run": 2}


def test_a_stalled_peer_times_out_and_names_the_object(bucket: Bucket, proxy: FaultProxy) -> None:
    """A peer that stops answering holds a connection (or a worker's message) only for the
    read timeout, each of botocore's attempts; then the call fails with the reason."""
    bucket.put("slow.jsonl", b'{"text": "x"}\n')
    proxy.faults.append(Fault("GET", "/slow.jsonl", delay=2))

    async def main() -> None:
        async with S3(read_timeout=0.5) as s3:
            await s3.read_bytes(S3Url(bucket.name, "slow.jsonl"), 1000)

    with pytest.raises(S3Error, match=r"GetObject s3://.*/slow.jsonl: .*(Timeout|timeout)"):
        asyncio.run(main())
    assert len(proxy.seen("GET", "/slow.jsonl")) == 3  # AWS_MAX_ATTEMPTS

"""`--model s3://...`: an archive or a prefix fetched once into the cache (model_location.py),
against a real S3 (moto's server on loopback, through the request-recording proxy): reused
with a HEAD only, fetched anew when the object changes, refused whole (nothing cached) when
an archive would write outside its directory, and usable by `compile`, `run` and `worker`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from batchjob.errors import StorageError, UsageError
from batchjob.model_location import MODELS_DIR, RECORD, fetch_model
from batchjob.s3 import BODY_RESUMES
from tests.conftest import assert_usage_error, invoke, make_texts, write_jsonl
from tests.s3_server import Bucket, Fault, FaultProxy
from tests.sqs_queues import Queues, run_worker

Member = tuple[tarfile.TarInfo, bytes | None]


def tar_gz(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tar_of(folder: str | Path) -> bytes:
    """`tar czf model.tar.gz -C folder .`, as SageMaker's model.tar.gz is made."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(str(folder), arcname=".")
    return buffer.getvalue()


def file_member(name: str, data: bytes = b"x") -> Member:
    return tarfile.TarInfo(name), data


def special_member(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def tree(root: str | Path) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = Path(path).read_bytes()
    return found


def cache_listing(cache: Path) -> list[str]:
    """Everything in the cache's model slots but their lock files."""
    root = cache / MODELS_DIR
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*") if p.name != ".lock")


def gets(proxy: FaultProxy, key: str) -> int:
    return len(proxy.seen("GET", f"/{key}"))


def test_an_archive_is_downloaded_once_then_found_with_a_head(
    artifact: str, bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = tar_of(artifact)
    bucket.put("models/tiny/model.tar.gz", data)
    url = bucket.uri("models/tiny/model.tar.gz")

    first = fetch_model(url, str(tmp_path))
    assert first.downloaded
    assert tree(first.path) == tree(artifact)
    assert os.path.basename(first.path) == "tiny"  # SageMaker's model.tar.gz: its folder
    record = json.loads(Path(first.path).parent.joinpath(RECORD).read_text())
    assert record["url"] == url
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(record["files"]) == set(tree(artifact))

    again = fetch_model(url, str(tmp_path))
    assert (again.path, again.downloaded) == (first.path, False)
    assert gets(proxy, "models/tiny/model.tar.gz") == 1
    assert len(proxy.seen("HEAD", "/models/tiny/model.tar.gz")) == 2


def test_a_changed_object_is_downloaded_anew(
    bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = bucket.uri("m/model.tgz")
    bucket.put("m/model.tgz", tar_gz([file_member("config.json", b'{"v": 1}')]))
    old = fetch_model(url, str(tmp_path))
    bucket.put("m/model.tgz", tar_gz([file_member("config.json", b'{"v": 2}')]))
    new = fetch_model(url, str(tmp_path))
    assert new.downloaded
    assert new.path != old.path
    assert Path(new.path, "config.json").read_bytes() == b'{"v": 2}'
    assert gets(proxy, "m/model.tgz") == 2


def test_a_prefix_is_downloaded_as_a_directory_once(
    bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    files = {"config.json": b"{}", "tokenizer/vocab.txt": b"a\nb\n", "1_Pooling/c.json": b"[]"}
    bucket.put_many({f"reg/minilm/{k}": v for k, v in files.items()})
    bucket.put("reg/minilm/empty-folder/", b"")  # a console-made folder marker
    bucket.put("reg/minilm-other/x", b"not under the prefix")
    for url in (bucket.uri("reg/minilm/"), bucket.uri("reg/minilm")):  # the slash is implied
        fetched = fetch_model(url, str(tmp_path))
        assert tree(fetched.path) == files
        assert os.path.basename(fetched.path) == "minilm"
    assert fetched.downloaded is False  # the second URL is the same prefix
    assert gets(proxy, "reg/minilm/config.json") == 1

    bucket.put("reg/minilm/config.json", b'{"changed": true}')
    assert fetch_model(bucket.uri("reg/minilm/"), str(tmp_path)).downloaded


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ([file_member("/etc/cron.d/evil")], "'/etc/cron.d/evil' refused: an absolute path"),
        ([file_member("../../escape")], "'../../escape' refused: a '..' path component"),
        ([file_member("a/../../escape")], "'a/../../escape' refused: a '..'"),
        ([special_member("v", tarfile.SYMTYPE, "/etc/passwd")], "a link (to '/etc/passwd')"),
        ([special_member("ok", tarfile.SYMTYPE, "weights.bin")], "'ok' refused: a link"),
        ([file_member("w"), special_member("h", tarfile.LNKTYPE, "w")], "'h' refused: a link"),
        ([special_member("dev", tarfile.CHRTYPE)], "'dev' refused: not a regular file"),
        ([special_member("fifo", tarfile.FIFOTYPE)], "'fifo' refused: not a regular file"),
        ([file_member("a"), file_member("./a")], "'./a' refused: a file named twice"),
        ([file_member("a"), file_member("a/b")], "'a/b' refused: a file and a directory"),
    ],
    ids=["absolute", "dotdot", "inner-dotdot", "symlink-out", "symlink-in", "hardlink",
         "device", "fifo", "twice", "file-and-dir"],
)  # fmt: skip
def test_a_malicious_archive_is_refused_and_nothing_is_cached(
    members: list[Member], needle: str, bucket: Bucket, s3_env: object, tmp_path: Path
) -> None:
    bucket.put("bad/model.tar.gz", tar_gz([file_member("config.json", b"{}"), *members]))
    with pytest.raises(UsageError) as caught:
        fetch_model(bucket.uri("bad/model.tar.gz"), str(tmp_path / "cache"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--model {bucket.uri('bad/model.tar.gz')}: member ")
    assert needle in message
    assert cache_listing(tmp_path / "cache") == []  # no entry, no staging directory left
    assert not (tmp_path / "escape").exists()


def test_archives_that_are_not_tar_or_too_big_are_refused(
    bucket: Bucket, s3_env: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket.put("x/model.tar.gz", b"this is not gzip")
    with pytest.raises(UsageError, match=r"x/model\.tar\.gz: not a readable tar archive"):
        fetch_model(bucket.uri("x/model.tar.gz"), str(tmp_path))
    whole = tar_gz([file_member("config.json", b"{}" * 5000)])
    bucket.put("x/cut.tar.gz", whole[: len(whole) // 2])
    with pytest.raises(UsageError, match="not a readable tar archive"):
        fetch_model(bucket.uri("x/cut.tar.gz"), str(tmp_path))
    bucket.put("x/empty.tar.gz", tar_gz([]))
    with pytest.raises(UsageError, match="the archive holds no files"):
        fetch_model(bucket.uri("x/empty.tar.gz"), str(tmp_path))

    import batchjob.safe_tar

    monkeypatch.setattr(batchjob.safe_tar, "MAX_UNPACKED_BYTES", 100)
    bucket.put("x/big.tar.gz", tar_gz([file_member("a", b"0" * 60), file_member("b", b"0" * 60)]))
    with pytest.raises(UsageError, match="the archive refused: its files add up to more than 100"):
        fetch_model(bucket.uri("x/big.tar.gz"), str(tmp_path))
    assert cache_listing(tmp_path) == []


def test_prefix_keys_that_escape_are_refused(
    bucket: Bucket, s3_env: object, tmp_path: Path
) -> None:
    bucket.put("p/config.json", b"{}")
    bucket.put("p/a/../../../escape", b"x")
    with pytest.raises(UsageError, match=r"the key 'p/a/\.\./\.\./\.\./escape' can't be a file"):
        fetch_model(bucket.uri("p/"), str(tmp_path))
    bucket.put("q//x", b"x")
    with pytest.raises(UsageError, match=r"an empty, '\.' or '\.\.' path component"):
        fetch_model(bucket.uri("q/"), str(tmp_path))
    assert cache_listing(tmp_path) == []


def test_nothing_there_is_a_one_line_refusal(
    bucket: Bucket, s3_env: object, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match=r"^--model s3://\S+/nope/model\.tar\.gz: no such object$"):
        fetch_model(bucket.uri("nope/model.tar.gz"), str(tmp_path))
    with pytest.raises(UsageError, match=r"no objects under this prefix \(an archive must end"):
        fetch_model(bucket.uri("nope/model"), str(tmp_path))


def test_a_broken_body_is_resumed_and_a_lost_download_leaves_nothing(
    bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = tar_gz([file_member("weights.bin", os.urandom(300_000))])
    bucket.put("w/model.tar.gz", data)
    url = bucket.uri("w/model.tar.gz")
    # Every body cut short: resumed (ranged GETs) until the resumes run out.
    proxy.faults.append(Fault("GET", "/w/model.tar.gz", cut_at=20_000))
    with pytest.raises(StorageError, match=r"GetObject s3://\S+/w/model\.tar\.gz"):
        fetch_model(url, str(tmp_path))
    assert gets(proxy, "w/model.tar.gz") == 1 + BODY_RESUMES
    assert cache_listing(tmp_path) == []  # no entry, no staging directory

    # One body cut short: the download resumes where it broke, from the same version.
    proxy.faults[:] = [Fault("GET", "/w/model.tar.gz", cut_at=50_000, times=1)]
    fetched = fetch_model(url, str(tmp_path))
    assert fetched.downloaded
    resumed = proxy.seen("GET", "/w/model.tar.gz")[-1].lower_headers
    assert resumed["range"] == "bytes=50000-"
    assert (
        resumed["if-match"]
        == bucket.client.head_object(Bucket=bucket.name, Key="w/model.tar.gz")["ETag"]
    )
    record = json.loads(Path(fetched.path).parent.joinpath(RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(data).hexdigest()


def test_processes_starting_at_once_download_once(
    bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket.put("c/model.tar.gz", tar_gz([file_member("weights.bin", os.urandom(500_000))]))
    results: list[object] = []

    def fetch() -> None:
        results.append(fetch_model(bucket.uri("c/model.tar.gz"), str(tmp_path)))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3
    assert sorted(r.downloaded for r in results) == [False, False, True]  # type: ignore[attr-defined]
    assert len({r.path for r in results}) == 1  # type: ignore[attr-defined]
    assert gets(proxy, "c/model.tar.gz") == 1


def test_a_damaged_cache_entry_is_refused_naming_what_to_delete(
    bucket: Bucket, s3_env: object, tmp_path: Path
) -> None:
    bucket.put("d/model.tar.gz", tar_gz([file_member("config.json", b"{}")]))
    fetched = fetch_model(bucket.uri("d/model.tar.gz"), str(tmp_path))
    Path(fetched.path, "config.json").write_bytes(b'{"tampered": 1}')
    entry = os.path.dirname(fetched.path)
    with pytest.raises(UsageError, match=f"config.json: SHA-256 .* delete {entry} to fetch"):
        fetch_model(bucket.uri("d/model.tar.gz"), str(tmp_path))


# -- through the CLI: compile, run and worker -------------------------------------------------


def test_compile_and_run_take_an_s3_model(
    classifier_dir: Path,
    artifact: str,
    bucket: Bucket,
    proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket.put("plain/model.tar.gz", tar_of(classifier_dir))
    out = tmp_path / "compiled"
    cache = str(tmp_path / "cache")
    argv = ["compile", "--model", bucket.uri("plain/model.tar.gz"), "--output", str(out)]
    argv += ["--cache-dir", cache, "--batch-size", "2", "--sequence-length", "16"]
    code, _, err = invoke(argv, capsys)
    assert code == 0, err
    manifest = json.loads((out / "batchjob.json").read_text())
    assert manifest["source_model"] == bucket.uri("plain/model.tar.gz")  # not the cache path

    # run: an artifact as a prefix, twice: the second finds it with one listing.
    for sub in Path(artifact).rglob("*"):
        if sub.is_file():
            bucket.put(f"art/{sub.relative_to(artifact)}", sub.read_bytes())
    write_jsonl(
        tmp_path / "in" / "a.jsonl",
        [{"id": str(i), "text": t} for i, t in enumerate(make_texts(5))],
    )
    for attempt in range(2):
        argv = ["run", "--model", bucket.uri("art/"), "--input", str(tmp_path / "in")]
        argv += ["--output", str(tmp_path / f"out{attempt}"), "--cache-dir", cache]
        argv += ["--replicas", "1", "--progress", "none"]
        code, _, err = invoke(argv, capsys)
        assert code == 0, err
        assert (tmp_path / f"out{attempt}" / "a.parquet").is_file()
    assert gets(proxy, "art/batchjob.json") == 1


def test_run_refuses_a_missing_or_malicious_model_on_one_line(
    bucket: Bucket, s3_env: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "hello"}])
    bucket.put("evil/model.tar.gz", tar_gz([file_member("../../x")]))
    for key, needle in (
        ("gone/model.tar.gz", "no such object"),
        ("evil/model.tar.gz", "'../../x' refused"),
    ):
        argv = ["run", "--model", bucket.uri(key), "--input", str(tmp_path / "in")]
        argv += ["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
        code, out, err = invoke(argv, capsys)
        assert_usage_error(code, out, err, (bucket.uri(key), needle))
        assert not (tmp_path / "out").exists()


def test_worker_takes_an_s3_model(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket.put("models/tiny/model.tar.gz", tar_of(artifact))
    queue = queues.make()
    queue.send({"id": "one", "documents": [{"id": "a", "text": "hello there"}]})
    worker = run_worker(
        bucket.uri("models/tiny/model.tar.gz"),
        queue,
        bucket.uri("out/"),
        caplog,
        capsys,
        "--exit-when-idle",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert worker.code == 0, worker.log()
    assert worker.messages("done") == [worker.messages("done")[0]]
    assert bucket.keys("out/") == ["out/inline/one.parquet"]
    assert f"fetched {bucket.uri('models/tiny/model.tar.gz')}" in worker.log()


def test_an_object_replaced_between_head_and_get_is_not_mixed(
    bucket: Bucket, s3_env: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If-Match: the bytes downloaded are those of the version looked up, or none."""
    from batchjob.model_location import _Fetch

    bucket.put("r/model.tar.gz", tar_gz([file_member("config.json", b'{"v": 1}')]))
    look_up = _Fetch._version

    async def look_up_then_replace(self: _Fetch) -> dict[str, object]:
        version = await look_up(self)
        bucket.put("r/model.tar.gz", tar_gz([file_member("config.json", b'{"v": 2}')]))
        return version

    monkeypatch.setattr(_Fetch, "_version", look_up_then_replace)
    with pytest.raises(StorageError, match="changed while it was fetched; try again"):
        fetch_model(bucket.uri("r/model.tar.gz"), str(tmp_path))
    assert cache_listing(tmp_path) == []

"""`batchjob run` with S3 in and out, against moto's server on loopback: the same results as
local files in every mix, more than 1,000 shards, failures recorded with their reasons,
SIGKILL then --resume, and two runs racing on one output prefix."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjob.cli import build_parser, main
from batchjob.config import run_spec
from batchjob.errors import UsageError
from tests.conftest import CompileFn, batchjob_run, make_texts, run_job, write_jsonl
from tests.s3_server import (
    Bucket,
    Fault,
    FaultProxy,
    MotoServer,
)

ODD = "odd dir/a+b=c/résumé ü.jsonl.gz"  # space, +, =, non-ASCII, gzip
STARTUP = 120.0  # seconds: bound on imports + replica start of a runner process on a busy machine


def s3_table(bucket: Bucket, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(bucket.get(key)))


def s3_ids(bucket: Bucket, key: str) -> list[str]:
    ids: list[str] = s3_table(bucket, key).column("id").to_pylist()
    return ids


def s3_manifest(bucket: Bucket, key: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(bucket.get(key))
    return data


def our_temp_files() -> list[str]:
    prefix = f"batchjob-{socket.gethostname()}-{os.getpid()}-"
    return [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(prefix)]


def make_tree(root: Path) -> dict[str, bytes]:
    """Shards of every kind (rel → bytes), written under `root` too."""
    texts = make_texts(40, seed=11)
    rows = [{"id": f"a{i}", "text": t} for i, t in enumerate(texts[:15])]
    write_jsonl(root / "a.jsonl", rows)
    with (root / "a.jsonl").open("a") as f:
        f.write("not json\n")
    (root / "nested").mkdir()
    csv = "text,id\n" + "".join(f'"{t}",c{i}\n' for i, t in enumerate(texts[15:25]))
    (root / "nested" / "b.csv.gz").write_bytes(gzip.compress(csv.encode()))
    pq.write_table(pa.table({"text": texts[25:32]}), root / "c.parquet")
    (root / ODD).parent.mkdir(parents=True)
    odd = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[32:])
    (root / ODD).write_bytes(gzip.compress(odd.encode()))
    (root / "_SUCCESS").write_bytes(b"")
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_s3_gives_the_local_results_in_every_mix(
    classifier_dir: Path, compiled: CompileFn, bucket: Bucket, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir).path
    files = make_tree(tmp_path / "in")
    bucket.put_many({f"in/{rel}": data for rel, data in files.items()})
    outputs = ["a.parquet", "nested/b.parquet", "c.parquet", "odd dir/a+b=c/résumé ü.parquet"]

    assert run_job(artifact, str(tmp_path / "in"), str(tmp_path / "local")) == 0
    expected = {rel: pq.read_table(tmp_path / "local" / rel) for rel in outputs}
    assert expected["a.parquet"].column("id").to_pylist()[-1] == "a.jsonl:16"
    assert expected[outputs[3]].column("id").to_pylist()[0] == f"{ODD}:1"

    assert run_job(artifact, bucket.uri("in/"), bucket.uri("out")) == 0
    assert run_job(artifact, bucket.uri("in"), str(tmp_path / "from-s3")) == 0
    assert run_job(artifact, str(tmp_path / "in"), bucket.uri("to-s3/")) == 0

    for prefix in ("out/", "to-s3/"):
        assert sorted(bucket.keys(prefix)) == sorted(
            prefix + r for r in [*outputs, "_manifest.json"]
        )
        for rel in outputs:
            assert s3_table(bucket, prefix + rel).equals(expected[rel]), (prefix, rel)
        m = s3_manifest(bucket, prefix + "_manifest.json")
        assert sorted(m["shards"]["done"]) == sorted(r for r in files if r != "_SUCCESS")
        assert m["shards"]["failed"] == []
        assert m["counts"]["documents"] == 41
    for rel in outputs:
        assert pq.read_table(tmp_path / "from-s3" / rel).equals(expected[rel])
    assert our_temp_files() == []


def test_more_than_1000_shards_then_resume_lists_the_output_once(
    classifier_dir: Path,
    compiled: CompileFn,
    bucket: Bucket,
    proxy: FaultProxy,
    moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    artifact = compiled(classifier_dir).path
    n = 1003
    bucket.put_many(
        {
            f"in/s-{i:04d}.jsonl": json.dumps({"id": f"r{i}", "text": "hi"}).encode()
            for i in range(n)
        }
    )
    with monkeypatch.context() as direct:  # the proxy only watches the resumed run
        direct.setenv("AWS_ENDPOINT_URL", moto_server.url)
        assert run_job(artifact, bucket.uri("in/"), bucket.uri("out/")) == 0
    outputs = [k for k in bucket.keys("out/") if k.endswith(".parquet")]
    assert outputs == [f"out/s-{i:04d}.parquet" for i in range(n)]
    assert s3_ids(bucket, outputs[-1]) == [f"r{n - 1}"]
    assert len(s3_manifest(bucket, "out/_manifest.json")["shards"]["done"]) == n

    proxy.requests.clear()
    assert run_job(artifact, bucket.uri("in/"), bucket.uri("out/"), resume=True) == 0
    manifest = s3_manifest(bucket, "out/_manifest.json")
    assert len(manifest["shards"]["skipped"]) == n
    assert manifest["shards"]["done"] == []
    # One listing of each prefix, page after page (1,000 keys a page); no object read or HEAD.
    # (Besides: under _batchjob/, the write check, the earlier run's record read to check that
    # the outputs keep its format, this run's record, and the two run records read back for
    # the manifest, whose listings are left out below.)
    records = [r for r in proxy.requests if "/out/_batchjob/" in r.path.split("?")[0]]
    assert len(records) == 5
    assert [r.method for r in proxy.requests].count("HEAD") == 0
    listings = [
        r.path
        for r in proxy.requests
        if r.method == "GET" and "prefix=out/_batchjob/" not in r.path
    ]
    listings = [p for p in listings if "/out/_batchjob/" not in p.split("?")[0]]
    assert len(listings) == 4
    assert all("list-type=2" in p for p in listings)
    assert sum("prefix=out/" in p for p in listings) == 2


def test_failed_shards_are_recorded_with_their_reason_and_the_rest_complete(
    classifier_dir: Path, compiled: CompileFn, bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir).path
    names = ["good", "flaky", "throttled", "denied", "unwritable"]
    bucket.put_many({f"in/{name}.jsonl": b'{"text": "some words"}\n' for name in names})
    proxy.faults += [
        Fault("GET", "/in/flaky.jsonl", times=2),  # 503 SlowDown, then fine
        Fault("GET", "/in/throttled.jsonl"),  # 503 SlowDown past AWS_MAX_ATTEMPTS=3
        Fault("GET", "/in/denied.jsonl", status=403, code="AccessDenied"),
        Fault("PUT", "/out/unwritable.parquet", status=403, code="AccessDenied"),
    ]
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(bucket.uri(f"in/{n}.jsonl") + "\n" for n in [*names, "missing"]))

    code = run_job(artifact, "", bucket.uri("out/"), input_manifest=str(listing))
    assert code == 1
    manifest = s3_manifest(bucket, "out/_manifest.json")
    assert manifest["input_manifest"] == str(listing)
    assert sorted(manifest["shards"]["done"]) == ["flaky.jsonl", "good.jsonl"]
    reasons = {f["shard"]: f["error"] for f in manifest["shards"]["failed"]}
    assert sorted(reasons) == [
        "denied.jsonl",
        "missing.jsonl",
        "throttled.jsonl",
        "unwritable.jsonl",
    ]
    assert "GetObject" in reasons["throttled.jsonl"]
    assert "SlowDown after 3 attempts" in reasons["throttled.jsonl"]
    assert "AccessDenied" in reasons["denied.jsonl"]
    assert "NoSuchKey" in reasons["missing.jsonl"]
    assert "PutObject" in reasons["unwritable.jsonl"]
    assert "AccessDenied" in reasons["unwritable.jsonl"]
    assert bucket.uri("in/missing.jsonl") in reasons["missing.jsonl"]
    assert sorted(bucket.keys("out/")) == [
        "out/_manifest.json",
        "out/flaky.parquet",
        "out/good.parquet",
    ]
    assert len(proxy.seen("GET", "/in/flaky.jsonl")) == 3
    assert our_temp_files() == []


# -- a runner process: SIGKILL, races ------------------------------------------------------------


def put_shards(bucket: Bucket, shards: int, per_shard: int) -> dict[str, list[str]]:
    """jsonl shards under in/, ids unique across shards: output key → ids in order."""
    expected, objects = {}, {}
    for k in range(shards):
        ids = [f"s{k:03d}-{i}" for i in range(per_shard)]
        texts = make_texts(per_shard, seed=k)
        lines = [json.dumps({"id": i, "text": t}) for i, t in zip(ids, texts, strict=True)]
        objects[f"in/s{k:03d}.jsonl"] = ("\n".join(lines) + "\n").encode()
        expected[f"out/s{k:03d}.parquet"] = ids
    bucket.put_many(objects)
    return expected


def runner(
    artifact: str, bucket: Bucket, logs: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    return batchjob_run(
        artifact,
        bucket.uri("in/"),
        bucket.uri("out/"),
        logs.with_suffix(".out"),
        logs.with_suffix(".err"),
    )


def test_sigkill_then_resume_gives_every_record_once_and_no_partial_object(
    classifier_dir: Path, compiled: CompileFn, bucket: Bucket, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir).path
    expected = put_shards(bucket, shards=100, per_shard=50)
    checked: set[str] = set()

    def check_outputs() -> None:
        """Every output visible is whole: all its records, in order."""
        for key in bucket.keys("out/"):
            if key not in checked:
                assert key in expected, f"unexpected object {key}"
                assert s3_ids(bucket, key) == expected[key], f"{key} is partial"
                checked.add(key)

    with runner(artifact, bucket, tmp_path / "run") as proc:
        deadline = time.monotonic() + STARTUP
        while len(checked) < 3:
            assert proc.poll() is None, f"the runner exited early with {proc.returncode}"
            assert time.monotonic() < deadline, f"no 3 outputs after {STARTUP} s"
            check_outputs()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    check_outputs()
    before = set(checked)
    assert 3 <= len(before) < len(expected), "the kill should land mid-job"
    assert "out/_manifest.json" not in bucket.keys("out/")

    argv = ["run", "--model", artifact, "--input", bucket.uri("in/"), "--output"]
    code = main([*argv, bucket.uri("out/"), "--replicas", "1", "--progress", "none", "--resume"])
    assert code == 0
    seen: Counter[str] = Counter()
    outputs = [k for k in bucket.keys("out/") if k.endswith(".parquet")]
    assert sorted(outputs) == sorted(expected)
    for key in outputs:
        ids = s3_ids(bucket, key)
        assert ids == expected[key], key
        seen.update(ids)
    assert len(seen) == 100 * 50
    assert set(seen.values()) == {1}
    manifest = s3_manifest(bucket, "out/_manifest.json")
    done_before = {k.removeprefix("out/").replace(".parquet", ".jsonl") for k in before}
    assert sorted(manifest["shards"]["skipped"]) == sorted(done_before)
    assert len(manifest["shards"]["done"]) == len(expected) - len(before)
    assert manifest["counts"]["documents"] == (len(expected) - len(before)) * 50
    assert bucket.multipart_uploads() == []


def test_two_runs_racing_on_one_output_write_each_object_once(
    classifier_dir: Path, compiled: CompileFn, bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.serialize_writes = True  # S3's conditional writes are atomic; moto's check isn't
    artifact = compiled(classifier_dir).path
    # With versioning, an overwrite would leave a second version: one version = one write.
    bucket.client.put_bucket_versioning(
        Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    expected = put_shards(bucket, shards=40, per_shard=30)
    with (
        runner(artifact, bucket, tmp_path / "a") as a,
        runner(artifact, bucket, tmp_path / "b") as b,
    ):
        codes = [a.wait(timeout=STARTUP), b.wait(timeout=STARTUP)]
    assert codes == [0, 0], (tmp_path / "a.err").read_text()[-2000:]
    versions = bucket.versions("out/")
    written = {k: v for k, v in versions.items() if k.endswith(".parquet")}
    assert written == dict.fromkeys(expected, 1)
    for key, ids in expected.items():
        assert s3_ids(bucket, key) == ids
    # Each run counts every shard done: written by itself, or found written (412). Each has
    # its own record, and the summary in the end lists both.
    assert len(bucket.keys("out/_batchjob/runs/", internal=True)) == 2
    assert len(s3_manifest(bucket, "out/_manifest.json")["runs"]) == 2
    listed = bucket.client.list_object_versions(Bucket=bucket.name, Prefix="out/_manifest.json")
    assert len(listed["Versions"]) >= 2  # again when the other run's record appeared meanwhile
    for v in listed["Versions"]:
        body = bucket.client.get_object(
            Bucket=bucket.name, Key="out/_manifest.json", VersionId=v["VersionId"]
        )["Body"].read()
        assert len(json.loads(body)["shards"]["done"]) == len(expected)


def test_run_flags_for_s3() -> None:
    argv = ["run", "--model", "m", "--output", "s3://b/out/", "--max-shards-in-flight", "3"]
    fields = vars(build_parser().parse_args([*argv, "--input-manifest", "s3://b/list.txt"]))
    spec = run_spec(fields)
    assert (spec.input, spec.input_manifest, spec.max_shards_in_flight) == (
        "",
        "s3://b/list.txt",
        3,
    )
    assert run_spec(vars(build_parser().parse_args([*argv, "--input", "s3://b/in/"]))).input
    both = [*argv, "--input", "s3://b/in/", "--input-manifest", "s3://b/list.txt"]
    with pytest.raises(UsageError, match="--input and --input-manifest exclude each other"):
        run_spec(vars(build_parser().parse_args(both)))
    with pytest.raises(UsageError, match="--max-shards-in-flight must be ≥ 1, got 0"):
        run_spec(vars(build_parser().parse_args([*argv[:-1], "0", "--input", "x"])))

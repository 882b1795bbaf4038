"""The worker does only the work it is allowed to: queue messages (anyone who can send to the
queue, or forge an S3 event) read only under `--allow-input` and write only under `--output`;
every S3 call names the expected bucket owner. Against moto behind a recording proxy."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchjob.cli import main
from tests.conftest import assert_usage_error
from tests.s3_server import (
    Bucket,
    FaultProxy,
)
from tests.sqs_queues import (
    Queues,
    wait_until,
    worker_process,
)

OWNER = "123456789012"  # moto's account


def s3_event(bucket: str, key: str) -> dict[str, object]:
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket},
              "object": {"key": key}}}  # fmt: skip
    return {"Records": [record]}


def test_messages_read_only_allowed_inputs_and_write_only_under_the_output(
    artifact: str, bucket: Bucket, queues: Queues, proxy: FaultProxy, tmp_path: Path
) -> None:
    other = f"{bucket.name}-other"
    bucket.client.create_bucket(Bucket=other)
    secret = b'{"id": "k", "text": "x"}\n'
    bucket.client.put_object(Bucket=other, Key="private/creds.jsonl", Body=secret)
    bucket.put_many(
        {
            "data/ok.jsonl": b'{"id": "ok", "text": "allowed"}\n',
            "private/creds.jsonl": b'{"id": "secret", "text": "not allowed"}\n',
            "results/sub/x.jsonl": b'{"id": "x", "text": "an input inside the output"}\n',
        }
    )
    proxy.bucket_owner = OWNER
    queue = queues.make(max_receive_count=1)
    bad = [
        # The observed leak: a private object of another bucket, copied into an output.
        {"input": f"s3://{other}/private/creds.jsonl", "output": bucket.uri("results/leak/")},
        # An output outside --output: another bucket.
        {"input": bucket.uri("data/ok.jsonl"), "output": f"s3://{other}/stolen/"},
        # A forged S3 event for an object outside --allow-input.
        s3_event(bucket.name, "private/creds.jsonl"),
        # A prefix whose results would land over it.
        {"input": bucket.uri("results/sub/"), "output": bucket.uri("results/")},
    ]
    for body in bad:
        queue.send(body)
    queue.send({"input": bucket.uri("data/")})
    queue.send({"id": "inline-1", "documents": [{"id": "i", "text": "needs no allowance"}]})
    flags = ["--exit-when-idle", "3", "--expected-bucket-owner", OWNER]
    flags += ["--allow-input", bucket.uri("data/"), "--allow-input", bucket.uri("results/")]
    with worker_process(artifact, queue, bucket.uri("results/"), tmp_path, *flags) as worker:
        assert worker.finish() == 0, worker.log()
    log = worker.log()
    assert len(worker.messages("done")) == 2, log
    assert f"job input s3://{other}/private/creds.jsonl is not under --allow-input" in log
    assert f"job output s3://{other}/stolen/ is not under --output" in log
    assert f"object {bucket.uri('private/creds.jsonl')} is not under --allow-input" in log
    assert "lies inside --output" in log
    assert queue.dlq is not None
    wait_until(lambda: queue.dlq is not None and queue.dlq.depth() == len(bad), 30, "the DLQ")
    # Nothing was read (not even a HEAD or a listing) where it was not allowed, and nothing
    # was written outside the output.
    s3 = proxy.s3_requests()
    assert not [r for r in s3 if r.path.startswith(f"/{other}")], "the other bucket untouched"
    assert not [r for r in s3 if "private/creds" in r.path]
    writes = sorted(r.path for r in s3 if r.method in ("PUT", "POST"))
    assert all(w.startswith(f"/{bucket.name}/results/") for w in writes), writes
    assert sorted(bucket.keys("results/", internal=True)) == [
        "results/_batchjob/write-check",
        "results/inline/inline-1.parquet",
        "results/ok.parquet",
        "results/sub/x.jsonl",
    ]
    ok = pq.read_table(io.BytesIO(bucket.get("results/ok.parquet")))
    assert ok.column("id").to_pylist() == ["ok"]
    # Every S3 call named the bucket's owner.
    assert s3
    assert all(r.lower_headers.get("x-amz-expected-bucket-owner") == OWNER for r in s3)


def test_run_names_the_expected_bucket_owner_on_every_call(
    artifact: str, bucket: Bucket, proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy.bucket_owner = OWNER
    bucket.put_many({"in/a.jsonl": b'{"text": "one"}\n', "in/b.jsonl": b'{"text": "two"}\n'})
    argv = ["run", "--model", artifact, "--input", bucket.uri("in/"), "--replicas", "1",
            "--progress", "none", "--resume", "--output"]  # fmt: skip
    assert main([*argv, bucket.uri("out/"), "--expected-bucket-owner", OWNER]) == 0
    s3 = proxy.s3_requests()
    assert {r.method for r in s3} >= {"GET", "PUT"}
    assert all(r.lower_headers.get("x-amz-expected-bucket-owner") == OWNER for r in s3)
    # Buckets of another account (as S3 sees them) are refused before any work.
    capsys.readouterr()
    code = main([*argv, bucket.uri("out2/"), "--expected-bucket-owner", "999999999999"])
    _, err = capsys.readouterr()
    assert_usage_error(code, "", err, ("--input", "AccessDenied"))
    assert bucket.keys("out2/", internal=True) == []


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ([], "--allow-input s3://bucket/prefix/ is required"),
        (["--allow-input", "/local/dir"], "--allow-input must be an s3://bucket/prefix/ URI"),
        (["--allow-input", "s3://b/", "--allow-any-input"], "exclude each other"),
        (["--allow-any-input", "--expected-bucket-owner", "me"], "12-digit AWS account id"),
    ],
)
def test_worker_refuses_to_start_without_an_allow_list(
    flags: list[str], needle: str, artifact: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["worker", "--model", artifact, "--queue", "q", "--output", "s3://b/out/", *flags]
    code = main(argv)
    out, err = capsys.readouterr()
    assert_usage_error(code, out, err, (needle,))


def test_worker_job_file_carries_the_allow_list(tmp_path: Path) -> None:
    from batchjob.config import worker_spec
    from batchjob.job_files import load_job_file

    job = tmp_path / "worker.yaml"
    job.write_text(
        "queue: q\noutput: s3://b/out/\nmodel: m\n"
        "allow-input: [s3://b/in/, s3://c/]\nexpected-bucket-owner: '123456789012'\n"
    )
    spec = worker_spec(load_job_file(str(job), "worker"))
    assert spec.allow_input == ("s3://b/in/", "s3://c/")
    assert spec.expected_bucket_owner == "123456789012"
    job.write_text("queue: q\noutput: s3://b/out/\nmodel: m\nallow-input: s3://b/in/\n")
    assert worker_spec(load_job_file(str(job), "worker")).allow_input == ("s3://b/in/",)
    job.write_text("queue: q\noutput: s3://b/out/\nallow-input: [7]\n")
    with pytest.raises(Exception, match="allow_input must be a list of strings"):
        load_job_file(str(job), "worker")

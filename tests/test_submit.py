"""`batchjob submit` and `batchjob status` against real SQS and S3 (moto's server on loopback):
a job's shards fanned out to two workers, each written once and equal to `batchjob run`'s;
resubmission sending only the missing shards; status's exit codes from the records."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjob.errors import UsageError
from batchjob.job_records import message_key, submission_key
from batchjob.job_specs import SubmitSpec
from batchjob.shards import shard
from batchjob.submit import input_root, message_bodies
from tests.conftest import assert_usage_error, invoke, make_texts, run_job
from tests.s3_server import Bucket
from tests.sqs_queues import Queue, Queues, run_worker, worker_process

SHARDS = {"a.jsonl": 30, "b.jsonl": 12, "sub/c.jsonl": 25, "sub/d.csv": 9, "e.txt": 7}


def jsonl(prefix: str, n: int, seed: int) -> bytes:
    rows = [
        json.dumps({"id": f"{prefix}{i}", "text": t}) for i, t in enumerate(make_texts(n, seed))
    ]
    return ("\n".join(rows) + "\n").encode()


def shard_data(rel: str, n: int, seed: int) -> bytes:
    if rel.endswith(".csv"):
        return (
            "id,text\n" + "".join(f"c{i},{t}\n" for i, t in enumerate(make_texts(n, seed)))
        ).encode()
    if rel.endswith(".txt"):
        return ("\n".join(make_texts(n, seed)) + "\n").encode()
    return jsonl(rel[0], n, seed)


def put_input(bucket: Bucket, prefix: str = "in/") -> None:
    bucket.put_many(
        {f"{prefix}{rel}": shard_data(rel, n, seed) for seed, (rel, n) in enumerate(SHARDS.items())}
    )


def output_of(rel: str) -> str:
    return rel.rsplit(".", 1)[0] + ".parquet"


def table(bucket: Bucket, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(bucket.get(key)))


def drain(queue: Queue) -> list[dict[str, Any]]:
    """Every message in the queue now (received and deleted), as bodies."""
    bodies = []
    while messages := queue.receive():
        for m in messages:
            bodies.append(json.loads(m["Body"]))
            queue.client.delete_message(QueueUrl=queue.url, ReceiptHandle=m["ReceiptHandle"])
    return bodies


def submit(
    bucket: Bucket, queue: Queue, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, str, str]:
    argv = ["submit", "--input", bucket.uri("in/"), "--queue", queue.url]
    return invoke([*argv, "--output", bucket.uri("out/"), *flags], capsys)


def status(output: str, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    return invoke(["status", "--output", output, *flags], capsys)


def test_submitted_job_drained_by_two_workers_equals_run_and_status_says_complete(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket.client.put_bucket_versioning(
        Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    put_input(bucket)
    queue = queues.make(max_receive_count=3)
    code, out, err = submit(bucket, queue, capsys)
    assert code == 0, err
    job = out.split()[3].rstrip(":")
    assert out == f"batchjob submit: job {job}: 5 shards, 0 done already, 5 sent in 5 messages\n"
    code, out, _ = status(bucket.uri("out/"), capsys, "--job-id", job)
    assert code == 3
    assert out.startswith(f"job {job}: in progress: 0/5 shards done, 5 remaining, 0 failed\n")
    assert "ETA unknown (no shard finished yet)" in out

    flags = ("--exit-when-idle", "3", "--max-messages-in-flight", "1")
    with (
        worker_process(artifact, queue, bucket.uri("out/"), tmp_path, *flags) as a,
        worker_process(artifact, queue, bucket.uri("out/"), tmp_path, *flags) as b,
    ):
        assert a.finish() == 0, a.log()
        assert b.finish() == 0, b.log()
    assert len(a.messages("done") + b.messages("done")) == 5
    assert queue.depth() == 0
    # Every shard written once (one version each), and the same as `batchjob run`'s.
    outputs = {f"out/{output_of(rel)}" for rel in SHARDS}
    assert bucket.versions("out/") == {key: 1 for key in outputs}
    assert run_job(artifact, bucket.uri("in/"), bucket.uri("ref/")) == 0
    capsys.readouterr()  # run's summary line
    for rel in SHARDS:
        assert table(bucket, f"out/{output_of(rel)}").equals(table(bucket, f"ref/{output_of(rel)}"))

    code, out, _ = status(
        bucket.uri("out/"), capsys, "--job-id", job, "--instance-type", "inf2.xlarge"
    )
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"job {job}: complete: 5/5 shards done, 0 remaining, 0 failed"
    assert lines[1].startswith(f"{sum(SHARDS.values())} documents, 0 error rows; ")
    assert lines[1].endswith("ETA 0m00s")
    assert lines[2].startswith("cost $")
    assert "per million documents" in lines[2]
    assert "per million tokens" in lines[2]
    # A job submitted again when done sends nothing.
    code, out, err = submit(bucket, queue, capsys)
    assert (code, out) == (
        0,
        f"batchjob submit: job {job}: 5 shards, 5 done already, 0 sent in 0 messages\n",
    ), err
    assert queue.depth() == 0


def test_resubmitting_sends_only_the_shards_whose_outputs_are_missing(
    bucket: Bucket, queues: Queues, capsys: pytest.CaptureFixture[str]
) -> None:
    put_input(bucket)
    queue = queues.make()
    code, out, err = submit(bucket, queue, capsys, "--shards-per-message", "2", "--job-id", "j7")
    assert code == 0, err
    assert out == "batchjob submit: job j7: 5 shards, 0 done already, 5 sent in 3 messages\n"
    first = drain(queue)
    assert sorted(s for body in first for s in body["shards"]) == sorted(
        bucket.uri(f"in/{rel}") for rel in SHARDS
    )
    assert {(b["job_id"], b["input"], b["output"]) for b in first} == {
        ("j7", bucket.uri("in/"), bucket.uri("out/"))
    }
    # Two shards are done (their outputs exist); the others were lost.
    for rel in ("a.jsonl", "sub/c.jsonl"):
        bucket.put(f"out/{output_of(rel)}", b"PAR1")
    code, out, err = submit(bucket, queue, capsys, "--shards-per-message", "2", "--job-id", "j7")
    assert code == 0, err
    assert out == "batchjob submit: job j7: 5 shards, 2 done already, 3 sent in 2 messages\n"
    again = sorted(s for body in drain(queue) for s in body["shards"])
    assert again == sorted(bucket.uri(f"in/{rel}") for rel in ("b.jsonl", "sub/d.csv", "e.txt"))
    records = bucket.keys("out/_batchjob/jobs/j7/", internal=True)
    assert len(records) == 2
    assert all("/submissions/" in key for key in records)
    code, out, _ = status(bucket.uri("out/"), capsys)
    assert code == 3
    assert out.startswith(f"{bucket.uri('out/')}: in progress: 2/5 shards done, 3 remaining")


def put_json(bucket: Bucket, key: str, value: dict[str, Any]) -> None:
    bucket.put(key, json.dumps(value).encode())


def test_status_exit_codes_from_the_records(
    bucket: Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    out_uri = bucket.uri("out/")
    code, out, err = status(out_uri, capsys)
    assert_usage_error(
        code, out, err, (f"--output {out_uri}: no job submitted nor run", "_batchjob/")
    )
    plan = {"kind": "submission", "submitted": 100.0, "shards": ["a.jsonl", "b.jsonl"]}
    put_json(bucket, "out/" + submission_key("j", "1"), {**plan, "sent": ["a.jsonl", "b.jsonl"]})
    bucket.put("out/a.parquet", b"PAR1")
    code, out, _ = status(out_uri, capsys, "--job-id", "j")
    assert code == 3, out  # b has no output, nor a failure
    # b failed on a delivery before the last: still remaining.
    failure = {"kind": "message", "started": 101.0, "finished": 102.0, "shards": {}}
    put_json(bucket, "out/" + message_key("j", "2"), {**failure, "failed": {"b.jsonl": "oops"}})
    code, out, _ = status(out_uri, capsys, "--job-id", "j")
    assert code == 3
    assert "1 shard(s) failed and will be delivered again" in out
    # Then on the last delivery before the dead-letter queue: failed for good.
    last = {**failure, "started": 103.0, "finished": 104.0, "final": True}
    put_json(bucket, "out/" + message_key("j", "3"), {**last, "failed": {"b.jsonl": "no such key"}})
    code, out, _ = status(out_uri, capsys, "--job-id", "j")
    assert code == 1
    assert out.splitlines()[0] == "job j: failed: 1/2 shards done, 0 remaining, 1 failed"
    assert "failed: b.jsonl: no such key" in out.splitlines()
    # Submitted again: in the queue once more.
    put_json(
        bucket, "out/" + submission_key("j", "4"), {**plan, "submitted": 200.0, "sent": ["b.jsonl"]}
    )
    assert status(out_uri, capsys, "--job-id", "j")[0] == 3
    bucket.put("out/b.parquet", b"PAR1")
    code, out, _ = status(out_uri, capsys, "--job-id", "j")
    assert code == 0
    assert out.startswith("job j: complete: 2/2 shards done")
    # Bad invocations: one line, exit 2.
    code, out, err = status(out_uri, capsys, "--job-id", "nope")
    assert_usage_error(code, out, err, ("--job-id nope: no such job", "(jobs: j)"))
    code, out, err = status(out_uri, capsys, "--instance-type", "m9.huge")
    assert_usage_error(code, out, err, ("--instance-type m9.huge: no price known", "inf2.xlarge"))
    for price in ("0", "inf"):
        code, out, err = status(out_uri, capsys, "--price-per-hour", price)
        assert_usage_error(
            code,
            out,
            err,
            (f"--price-per-hour must be a number > 0 (USD per machine-hour), got {price}",),
        )


def test_shards_outside_allow_input_fail_for_good_and_status_says_why(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    put_input(bucket)
    put_input(bucket, "private/")
    queue = queues.make(max_receive_count=1)
    argv = ["submit", "--input", bucket.uri("private/"), "--queue", queue.url]
    code, out, err = invoke([*argv, "--output", bucket.uri("out/"), "--job-id", "p"], capsys)
    assert code == 0, err
    flags = ("--allow-input", bucket.uri("in/"), "--exit-when-idle", "2")
    worker = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *flags)
    assert worker.code == 0, worker.log()
    assert len(worker.messages("failed")) == 5
    assert bucket.keys("out/") == []  # nothing read, nothing written
    code, out, _ = status(bucket.uri("out/"), capsys, "--job-id", "p")
    assert code == 1, out
    assert out.splitlines()[0] == "job p: failed: 0/5 shards done, 0 remaining, 5 failed"
    why = f"shard {bucket.uri('private/a.jsonl')} is not under --allow-input"
    assert any(line.startswith("failed: a.jsonl: ") and why in line for line in out.splitlines())


def test_bad_submissions_are_one_line_exit_2_and_send_nothing(
    bucket: Bucket, queues: Queues, capsys: pytest.CaptureFixture[str]
) -> None:
    put_input(bucket)
    queue = queues.make()
    base = ["submit", "--queue", queue.url, "--output", bucket.uri("out/")]
    cases = [
        ([*base], ("--input is required",)),
        ([*base, "--input", "/local/dir"], ("--input must be an s3://bucket/prefix/ URI",)),
        ([*base, "--input", bucket.uri("in/"), "--shards-per-message", "0"], ("1..100, got 0",)),
        ([*base, "--input", bucket.uri("in/"), "--job-id", "../x"], ("--job-id '../x'",)),
        ([*base, "--input", bucket.uri("nothing/")], ("no such object, nor objects under",)),
        (
            [
                "submit",
                "--queue",
                queue.url,
                "--input",
                bucket.uri("in/"),
                "--output",
                bucket.uri("in/"),
            ],
            ("is the input itself",),
        ),
        (
            [
                "submit",
                "--queue",
                queue.url + "-none",
                "--input",
                bucket.uri("in/"),
                "--output",
                bucket.uri("o/"),
            ],
            ("--queue", "GetQueueAttributes"),
        ),
    ]
    for argv, needles in cases:
        code, out, err = invoke(argv, capsys)
        assert_usage_error(code, out, err, needles)
    assert queue.depth() == 0
    assert bucket.keys("out/", internal=True) == []


def test_messages_fit_the_queue_and_shards_share_one_root() -> None:
    spec = SubmitSpec(queue="q", output="s3://o/out/", input="s3://b/in/", shards_per_message=3)
    refs = [shard(f"s3://b/in/{i}.jsonl", f"{i}.jsonl", "auto") for i in range(7)]
    bodies = message_bodies(spec, input_root(refs), refs, 262_144)
    assert [len(json.loads(b)["shards"]) for b in bodies] == [3, 3, 1]
    assert json.loads(bodies[2]) == {
        "job_id": spec.job_id,
        "input": "s3://b/in/",
        "shards": ["s3://b/in/6.jsonl"],
        "output": "s3://o/out/",
    }
    with pytest.raises(UsageError, match=r"more than the queue's MaximumMessageSize \(100\)"):
        message_bodies(spec, "s3://b/in/", refs, 100)
    # An --input-manifest of two buckets: no one prefix names both as `run` would.
    two = [
        shard("s3://b/x/a.jsonl", "b/x/a.jsonl", "auto"),
        shard("s3://c/y.jsonl", "c/y.jsonl", "auto"),
    ]
    with pytest.raises(UsageError, match="the shards of one job must lie in one bucket"):
        input_root(two)
    # The same input and output: the same job id, however often submitted.
    assert SubmitSpec(queue="other", output="s3://o/out/", input="s3://b/in/").job_id == spec.job_id
    assert SubmitSpec(queue="q", output="s3://o/out2/", input="s3://b/in/").job_id != spec.job_id

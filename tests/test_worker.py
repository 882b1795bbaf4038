"""`batchjob worker` against real SQS and S3 (moto's server on loopback): jobs, inline
documents and moto's own S3 event notifications; visibility kept through long work; a
poison message reaching the dead-letter queue; duplicates; SIGTERM handing a message to
another worker; two workers sharing a queue; metrics."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import re
import signal
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchjob.config import CompileSpec, WorkerSpec
from batchjob.engine import Engine
from batchjob.metrics import WorkerMetrics
from batchjob.replica_process import plan_placements
from batchjob.replicas import ReplicaPool
from batchjob.sqs import SqsQueue
from batchjob.storage import Storage
from batchjob.worker import Summary, Worker, work
from tests.conftest import CompileFn, assert_usage_error, invoke, make_texts, run_job
from tests.replica_fakes import Toy
from tests.s3_server import (
    Bucket,
    Fault,
    FaultProxy,
)
from tests.sqs_queues import (
    Queue,
    Queues,
    run_worker,
    wait_until,
    worker_process,
)

IDLE = ("--exit-when-idle", "2")


def jsonl(prefix: str, n: int, seed: int) -> bytes:
    rows = [f'{{"id": "{prefix}{i}", "text": "{t}"}}' for i, t in enumerate(make_texts(n, seed))]
    return ("\n".join(rows) + "\n").encode()


def table(bucket: Bucket, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(bucket.get(key)))


def test_job_messages_prefix_and_object_match_run(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket.put_many(
        {
            "in/a.jsonl": jsonl("a", 30, 1),
            "in/sub/b.jsonl": jsonl("b", 25, 2),
            "one/c.jsonl": jsonl("c", 20, 3),
        }
    )
    queue = queues.make()
    queue.send({"input": bucket.uri("in/")})  # a prefix: run's layout under --output
    queue.send({"input": bucket.uri("one/c.jsonl"), "output": bucket.uri("out/elsewhere/")})
    worker = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *IDLE)
    assert worker.code == 0, worker.log()
    assert len(worker.messages("done")) == 2
    assert queue.depth() == 0  # both deleted
    # The same rows as `batchjob run` over the same inputs.
    assert run_job(artifact, bucket.uri("in/"), bucket.uri("ref/")) == 0
    for rel in ("a.parquet", "sub/b.parquet"):
        assert table(bucket, f"out/{rel}").equals(table(bucket, f"ref/{rel}"))
    assert run_job(artifact, bucket.uri("one/c.jsonl"), bucket.uri("ref-c/")) == 0
    # An object: its whole key, relative to the bucket, under the output.
    assert table(bucket, "out/elsewhere/one/c.parquet").equals(table(bucket, "ref-c/c.parquet"))
    assert "batchjob worker: 2 messages done" in worker.stdout


def test_inline_documents_with_bad_ones_become_error_rows(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = queues.make()
    documents = [
        {"id": "d1", "text": "first document"},
        {"id": "d2"},  # no text
        "not an object",
        {"id": "d4", "text": "fourth document", "extra": 1},
    ]
    queue.send({"id": "batch-7", "documents": documents})
    message_id = queue.send({"documents": [{"text": "no id of its own"}]})
    worker = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *IDLE)
    assert worker.code == 0, worker.log()
    rows = table(bucket, "out/inline/batch-7.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["d1", "inline/batch-7:2", "inline/batch-7:3", "d4"]
    assert [r["error"] is None for r in rows] == [True, False, False, True]
    assert rows[1]["error"] == "inline/batch-7 document 2: missing field 'text'"
    assert "document 3: expected a JSON object, got str" in rows[2]["error"]
    assert [r["label"] is None for r in rows] == [False, True, True, False]
    # Without an id of its own, the output is named by the SQS message id.
    [row] = table(bucket, f"out/inline/{message_id}.parquet").to_pylist()
    assert row["error"] is None
    assert queue.depth() == 0


def test_s3_notifications_odd_keys_and_the_test_event(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = queues.make()
    queue.notify_from(bucket, prefix="incoming/")  # moto queues its s3:TestEvent first
    bucket.put("incoming/a b+c.jsonl", jsonl("x", 12, 4))
    bucket.put("incoming/plain.jsonl.gz", gzip.compress(jsonl("y", 9, 5)))
    worker = run_worker(artifact, queue, bucket.uri("results/"), caplog, capsys, *IDLE)
    assert worker.code == 0, worker.log()
    assert len(worker.messages("ignored")) == 1  # the TestEvent
    assert len(worker.messages("done")) == 2
    first = table(bucket, "results/incoming/a b+c.parquet")
    assert first.column("id").to_pylist() == [f"x{i}" for i in range(12)]
    assert table(bucket, "results/incoming/plain.parquet").num_rows == 9
    assert queue.depth() == 0


def test_events_for_the_workers_own_outputs_are_ignored(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Notifications for the whole bucket, outputs in the same bucket: no feedback loop."""
    queue = queues.make()
    queue.notify_from(bucket)
    bucket.put("doc.jsonl", jsonl("d", 5, 6))
    worker = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *IDLE)
    assert worker.code == 0, worker.log()
    assert sorted(bucket.keys()) == ["doc.jsonl", "out/doc.parquet"]
    # The TestEvent, and the events of out/doc.parquet and of the start's write check.
    assert len(worker.messages("ignored")) == 3
    assert "its own output" in worker.log()


def test_work_outlasting_three_visibility_timeouts_stays_hidden(
    artifact: str, bucket: Bucket, queues: Queues, proxy: FaultProxy, tmp_path: Path
) -> None:
    queue = queues.make(visibility=1)
    bucket.put("slow.jsonl", jsonl("s", 10, 7))
    proxy.faults.append(Fault("GET", "/slow.jsonl", delay=4.5))  # the download stalls
    queue.send({"input": bucket.uri("slow.jsonl")})
    with worker_process(artifact, queue, bucket.uri("out/"), tmp_path, *IDLE) as worker:
        wait_until(lambda: proxy.seen("GET", "/slow.jsonl"), 120, "the worker's GET")
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # another consumer polls through > 3 timeouts
            assert queue.receive() == []
            time.sleep(0.2)
        assert worker.finish() == 0, worker.log()
    assert worker.messages("done")
    heartbeats = [
        r
        for r in proxy.seen("POST")
        if "ChangeMessageVisibility" in r.headers.get("X-Amz-Target", "")
    ]
    assert len(heartbeats) >= 3
    assert table(bucket, "out/slow.parquet").num_rows == 10
    assert queue.depth() == 0


def test_poison_message_reaches_the_dead_letter_queue_while_others_flow(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = queues.make(max_receive_count=2)
    assert queue.dlq is not None
    queue.send("this is not JSON")
    for i in range(3):
        queue.send({"id": f"good-{i}", "documents": [{"text": f"document {i}"}]})
    bucket.put("there.jsonl", jsonl("t", 3, 8))
    queue.send({"input": bucket.uri("missing.jsonl")})  # no such object: a failure too
    w = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, "--exit-when-idle", "3")
    assert w.code == 0, w.log()
    assert sorted(bucket.keys("out/")) == [f"out/inline/good-{i}.parquet" for i in range(3)]
    log = w.log()
    assert "message body: not valid JSON" in log
    assert "(ApproximateReceiveCount 1 of 2 before the dead-letter queue)" in log
    assert "(ApproximateReceiveCount 2 of 2 before the dead-letter queue)" in log
    assert f"job input {bucket.uri('missing.jsonl')}: no such object" in log
    wait_until(lambda: queue.depth() == 0, 10, "the queue emptied")
    bodies = {m["Body"] for m in queue.dlq.receive()}
    assert bodies == {"this is not JSON", json.dumps({"input": bucket.uri("missing.jsonl")})}


def test_duplicate_deliveries_give_one_output_and_count_as_done(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket.client.put_bucket_versioning(
        Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    proxy.serialize_writes = True  # S3's atomic If-None-Match (moto's check is not atomic)
    bucket.put("dup.jsonl", jsonl("d", 40, 9))
    queue = queues.make()
    for _ in range(3):  # at once: the three race inside one worker
        queue.send({"input": bucket.uri("dup.jsonl")})
    worker = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *IDLE)
    assert worker.code == 0, worker.log()
    queue.send({"input": bucket.uri("dup.jsonl")})  # a late redelivery: only a HEAD
    late = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *IDLE)
    assert late.code == 0, late.log()
    assert bucket.versions("out/") == {"out/dup.parquet": 1}
    assert len(worker.messages("done")) + len(worker.messages("duplicate")) == 3
    assert len(late.messages("duplicate")) == 1
    assert queue.depth() == 0


def test_sigterm_releases_a_message_to_a_second_worker(
    artifact: str, bucket: Bucket, queues: Queues, proxy: FaultProxy, tmp_path: Path
) -> None:
    queue = queues.make(visibility=120)  # only a release lets another worker have it soon
    bucket.put("long.jsonl", jsonl("l", 10, 10))
    proxy.faults.append(Fault("GET", "/long.jsonl", delay=60, times=1))
    queue.send({"input": bucket.uri("long.jsonl")})
    flags = ("--drain-seconds", "1")
    with worker_process(artifact, queue, bucket.uri("out/"), tmp_path, *flags) as first:
        wait_until(lambda: proxy.seen("GET", "/long.jsonl"), 120, "the first worker's GET")
        first.signal(signal.SIGTERM)
        assert first.finish(timeout=30) == 0, first.log()
    assert "released: visible again" in first.log()
    assert "1 released" in first.stdout.read_text()
    started = time.monotonic()
    with worker_process(artifact, queue, bucket.uri("out/"), tmp_path, *IDLE) as second:
        assert second.finish() == 0, second.log()
    assert time.monotonic() - started < 100  # before the 120 s visibility would have lapsed
    assert second.messages("done")
    assert table(bucket, "out/long.parquet").num_rows == 10
    assert queue.depth() == 0


def test_two_workers_on_one_queue_process_every_message_once(
    artifact: str, bucket: Bucket, queues: Queues, tmp_path: Path
) -> None:
    queue = queues.make()
    ids = [queue.send({"id": f"m{i}", "documents": [{"text": t} for t in make_texts(20, i)]})
           for i in range(24)]  # fmt: skip
    flags = ("--exit-when-idle", "3", "--max-messages-in-flight", "4")
    with (
        worker_process(artifact, queue, bucket.uri("out/"), tmp_path, *flags) as a,
        worker_process(artifact, queue, bucket.uri("out/"), tmp_path, *flags) as b,
    ):
        assert a.finish() == 0, a.log()
        assert b.finish() == 0, b.log()
    done = a.messages("done") + b.messages("done")
    assert sorted(done) == sorted(ids)  # each exactly once, none lost
    assert sorted(bucket.keys("out/")) == sorted(f"out/inline/m{i}.parquet" for i in range(24))
    assert queue.depth() == 0


def test_metrics_and_a_clean_sigterm_when_idle(
    artifact: str, bucket: Bucket, queues: Queues, tmp_path: Path
) -> None:
    queue = queues.make()
    queue.send({"id": "m", "documents": [{"text": "one"}, {"text": "two"}, {"no": "text"}]})
    queue.send(json.dumps({"Event": "s3:TestEvent"}))
    with worker_process(artifact, queue, bucket.uri("out/"), tmp_path, "--metrics-port", "0") as w:
        port = int(w.wait_for_log(r"metrics on http://[\d.]+:(\d+)/metrics").group(1))
        wait_until(lambda: queue.depth() == 0, 120, "both messages deleted")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        w.signal(signal.SIGTERM)
        assert w.finish(timeout=30) == 0, w.log()
    text = metrics.decode()
    for line in (
        'batchjob_messages_total{outcome="done"} 1.0',
        'batchjob_messages_total{outcome="ignored"} 1.0',
        'batchjob_messages_total{outcome="failed"} 0.0',
        "batchjob_documents_total 3.0",
        "batchjob_document_errors_total 1.0",
        "batchjob_windows_total 2.0",
        "batchjob_replica_restarts_total 0.0",
        "batchjob_messages_in_progress 0.0",
    ):
        assert line in text.splitlines(), line
    fill = float(re.search(r"^batchjob_batch_fill_ratio (\S+)$", text, re.M).group(1))
    assert 0 < fill <= 1


def test_work_past_the_visibility_ceiling_fails_cleanly_and_is_retried(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-process, with a ceiling of 8 s (SQS's is 12 h): the first delivery's download
    stalls past it, is abandoned and the message made visible; the second completes."""
    queue = queues.make(visibility=1)
    bucket.put("endless.jsonl", jsonl("e", 5, 11))
    proxy.faults.append(Fault("GET", "/endless.jsonl", delay=30, times=1))
    queue.send({"input": bucket.uri("endless.jsonl")})
    spec = WorkerSpec(
        queue=queue.url,
        output=bucket.uri("out/"),
        compile=CompileSpec(model=artifact),
        replicas=1,
        exit_when_idle=2,
        visibility_ceiling=8,
        allow_input=(bucket.uri(),),
    )
    caplog.set_level(logging.INFO, logger="batchjob")
    assert work(spec) == 0
    assert "would outlast SQS's 8 s visibility ceiling" in caplog.text
    assert "(ApproximateReceiveCount 1)" in caplog.text
    assert table(bucket, "out/endless.parquet").num_rows == 5
    assert queue.depth() == 0


def worker_argv(artifact: str, queue: Queue, bucket: Bucket, *extra: str) -> list[str]:
    argv = ["worker", "--model", artifact, "--queue", queue.url, "--output", bucket.uri("out/")]
    return [*argv, "--replicas", "1", "--allow-input", bucket.uri(), *extra]


BAD_WORKER_FLAGS = {
    "no-queue": (("--queue", ""), "--queue is required"),
    "no-such-queue": (("--queue", "no-such-queue"), "--queue no-such-queue: "),
    "no-such-bucket": (("--output", "s3://no-such-bucket/out/"), "NoSuchBucket"),
    "metrics-port": (("--metrics-port", "70000"), "--metrics-port must be 0..65535, got 70000"),
    "drain-seconds": (("--drain-seconds", "-1"), "--drain-seconds must be ≥ 0, got -1"),
    "idle": (("--exit-when-idle", "-5"), "--exit-when-idle must be ≥ 0 seconds, got -5"),
    "in-flight": (("--max-messages-in-flight", "0"), "--max-messages-in-flight must be ≥ 1"),
    "model": (("--model", "/nonexistent/model"), "/nonexistent/model"),
}


@pytest.mark.parametrize("case", list(BAD_WORKER_FLAGS))
def test_bad_worker_invocations_are_one_line_exit_2(
    case: str,
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags, needle = BAD_WORKER_FLAGS[case]
    queue = queues.make()
    queue.send({"input": bucket.uri("x.jsonl")})
    code, out, err = invoke(worker_argv(artifact, queue, bucket, *flags), capsys)
    assert_usage_error(code, out, err, (needle,))
    assert queue.receive() != []  # nothing was received


def test_replicas_that_keep_dying_stop_the_worker_and_release_its_messages(
    compiled: CompileFn, classifier_dir: Path, bucket: Bucket, queues: Queues
) -> None:
    """In-process, with a stand-in model that kills its replica on every batch (each holds
    the [CLS] id 101): the pool gives up, the worker fails the message it was working on,
    releases the others, and reports why (the CLI then exits 1)."""
    artifact = compiled(classifier_dir)
    queue = queues.make()
    for i in range(3):
        queue.send({"id": f"doomed-{i}", "documents": [{"text": "hello"}]})
    spec = WorkerSpec(
        queue=queue.url,
        output=bucket.uri("out/"),
        compile=CompileSpec(model=artifact.path),
        allow_input=(bucket.uri(),),
    )

    async def main() -> tuple[Summary, str | None]:
        async with SqsQueue(queue.url) as sqs, Storage() as storage:
            pool = ReplicaPool(Toy(die_on=101), plan_placements(1, 1, "cpu"))
            async with pool, Engine(artifact, pool) as engine:
                worker = Worker(spec, sqs, storage, engine, pool, WorkerMetrics())
                return await asyncio.wait_for(worker.run(), 120), worker.fatal

    summary, fatal = asyncio.run(main())
    assert fatal is not None
    assert "the replicas failed" in fatal
    # Each made visible again: failed (those in the doomed batches), or released (any
    # received later; the long poll in progress at the stop may take failed ones back).
    assert summary.failed >= 1
    assert summary.done == 0
    assert bucket.keys("out/") == []
    assert len(queue.receive()) == 3  # every message visible again at once


def test_a_prefix_with_an_unreadable_shard_fails_but_keeps_the_good_outputs(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = queues.make(max_receive_count=1)
    assert queue.dlq is not None
    bucket.put_many({"in/good.jsonl": jsonl("g", 6, 12), "in/bad.jsonl.gz": b"not gzip at all"})
    queue.send({"input": bucket.uri("in/")})
    worker = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *IDLE)
    assert worker.code == 0, worker.log()
    assert "1 of 2 shards failed (1 written): bad.jsonl.gz: " in worker.log()
    assert "corrupt gzip" in worker.log()
    assert bucket.keys("out/") == ["out/good.parquet"]
    wait_until(lambda: queue.dlq is not None and queue.dlq.depth() == 1, 30, "moved to the DLQ")


def test_a_head_refused_403_without_list_permission_still_does_the_work(
    artifact: str,
    bucket: Bucket,
    queues: Queues,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without s3:ListBucket on the output, S3 answers a missing key's HEAD with 403."""
    proxy.faults.append(Fault("HEAD", "/out/w.parquet", status=403, code="AccessDenied"))
    bucket.put("w.jsonl", jsonl("w", 4, 13))
    queue = queues.make()
    queue.send({"input": bucket.uri("w.jsonl")})
    worker = run_worker(artifact, queue, bucket.uri("out/"), caplog, capsys, *IDLE)
    assert worker.code == 0, worker.log()
    assert proxy.seen("HEAD", "/out/w.parquet")
    assert table(bucket, "out/w.parquet").num_rows == 4
    assert queue.depth() == 0

"""`make bench`'s SQS row: the bench corpus sent as S3 event notifications to a queue that
`batchjob worker --replicas 2` consumes, compared with `batchjob run --replicas 2` on the same
corpus in the same script (moto's S3 and SQS on loopback, in their own process).

The bucket notifies the queue of every object created under `corpus-*` (moto sends the
events itself, plus the `s3:TestEvent` the worker ignores); outputs go elsewhere, so they
don't trigger it. Each pair uploads the shards under a fresh `corpus-<i>/` (one event each),
then runs both, in alternating order between pairs: `batchjob run` over that prefix, its
throughput documents ÷ the manifest's `pipeline_seconds` (replicas ready → last output
committed); and the worker until it is idle for a few seconds, its throughput documents ÷
its `busy` seconds (first message received → last message deleted). The worker must write
one Parquet file per shard, fail none, and count run's documents. Target: the worker's
median ≥ 0.85 × run's.

    .venv/bin/python bench/sqs_bench.py [--docs 2400] [--shards 8] [--pairs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixtures, s3_bench
import fixtures
from s3_bench import BUCKET, aws_environment, moto_server

TARGET = 0.85  # the worker's throughput ≥ this × run's
REPLICAS = "2"
IDLE_SECONDS = "3"
TIMEOUT = 1800.0  # seconds for one `batchjob run` or worker
_SUMMARY = re.compile(
    r"batchjob worker: (?P<done>\d+) messages done, (?P<duplicate>\d+) duplicate, "
    r"(?P<ignored>\d+) ignored, (?P<failed>\d+) failed, (?P<released>\d+) released; "
    r"(?P<documents>\d+) documents, (?P<errors>\d+) errors; (?P<wall>[\d.]+)s, "
    r"busy (?P<busy>[\d.]+)s"
)


def _batchjob(args: list[str], env: dict[str, str], log: Path) -> str:
    """`python -m batchjob ARGS`, its stderr to `log`; its stdout. Raises unless it exits 0."""
    command = [sys.executable, "-m", "batchjob", *args]
    with open(log, "w") as err:
        proc = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=err, env=env, text=True, timeout=TIMEOUT
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{_tail(log)}")
    return proc.stdout


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


class _Bench:
    """moto's bucket and queue, the bucket notifying the queue; a run and a worker per pair."""

    def __init__(self, url: str, home: Path, artifact: Path, shards: list[Path]) -> None:
        import boto3

        self.home, self.shards, self.env = home, shards, aws_environment(url, str(home))
        self.model = ["--model", str(artifact), "--replicas", REPLICAS]
        keys = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
        aws = {"endpoint_url": url, "region_name": "us-east-1"} | keys
        self.s3, sqs = boto3.client("s3", **aws), boto3.client("sqs", **aws)
        self.s3.create_bucket(Bucket=BUCKET)
        self.queue = sqs.create_queue(QueueName="batchjob-bench")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["QueueArn"])
        rule = {"QueueArn": arn["Attributes"]["QueueArn"], "Events": ["s3:ObjectCreated:*"]}
        rule["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": "corpus-"}]}}
        self.s3.put_bucket_notification_configuration(
            Bucket=BUCKET, NotificationConfiguration={"QueueConfigurations": [rule]}
        )

    def upload(self, i: int) -> None:
        for path in self.shards:  # one event notification per shard
            key = f"corpus-{i}/{path.name}"
            self.s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())

    def run(self, i: int) -> dict[str, Any]:
        load, out = _load(), f"run-{i}/"
        args = ["run", *self.model, "--input", f"s3://{BUCKET}/corpus-{i}/"]
        args += ["--output", f"s3://{BUCKET}/{out}", "--progress", "none"]
        _batchjob(args, self.env, self.home / f"run-{i}.log")
        body = self.s3.get_object(Bucket=BUCKET, Key=f"{out}_manifest.json")["Body"].read()
        manifest = json.loads(body)
        if manifest["shards"]["failed"]:
            raise RuntimeError(f"batchjob run failed shards: {manifest['shards']['failed']}")
        documents = manifest["counts"]["documents"]
        seconds = manifest["timings"]["pipeline_seconds"]
        rate, loads = documents / seconds, {"load_before": load, "load_after": _load()}
        return {"documents": documents, "seconds": seconds, "docs_per_s": rate} | loads

    def worker(self, i: int) -> dict[str, Any]:
        load, out, log = _load(), f"worker-{i}/", self.home / f"worker-{i}.log"
        args = ["worker", *self.model, "--queue", self.queue]
        args += ["--output", f"s3://{BUCKET}/{out}", "--exit-when-idle", IDLE_SECONDS]
        args += ["--allow-input", f"s3://{BUCKET}/"]
        stdout = _batchjob(args, self.env, log)
        if not (found := _SUMMARY.search(stdout)):
            raise RuntimeError(f"no summary line in the worker's stdout: {stdout!r}")
        summary = {k: float(v) if "." in v else int(v) for k, v in found.groupdict().items()}
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=out).get("Contents", [])
        keys = sorted(o["Key"] for o in listed)
        expected = sorted(f"{out}corpus-{i}/{path.stem}.parquet" for path in self.shards)
        if keys != expected or summary["failed"] or summary["done"] != len(self.shards):
            raise RuntimeError(f"worker: {summary}; wrote {keys}, not {expected}\n{_tail(log)}")
        errors = [line for line in log.read_text().splitlines() if "ERROR" in line]
        summary["docs_per_s"] = summary["documents"] / summary["busy"]
        return summary | {"load_before": load, "load_after": _load(), "error_lines": errors[:5]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=2400, help="documents in the corpus (2400)")
    p.add_argument("--shards", type=int, default=8, help="jsonl shards (8)")
    p.add_argument("--pairs", type=int, default=1, help="run + worker, alternating (1)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = fixtures.cache_root(Path(__file__).resolve().parent.parent)
    artifact, _ = fixtures.ensure_artifact(root, fixtures.ensure_model(root), "default", [])
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="batchjob-sqs-bench-") as tmp, moto_server() as url:
        shards = fixtures.make_corpus(args.docs).write(Path(tmp) / "corpus", args.shards)
        bench = _Bench(url, Path(tmp), artifact, shards)
        for i in range(args.pairs):
            bench.upload(i)
            order = ("run", "worker") if i % 2 == 0 else ("worker", "run")
            measured = {name: getattr(bench, name)(i) for name in order}
            if measured["worker"]["documents"] != measured["run"]["documents"]:
                raise RuntimeError(f"documents differ: {measured}")
            ratio = measured["worker"]["docs_per_s"] / measured["run"]["docs_per_s"]
            pairs.append({"pair": i, "order": f"{order[0]} first", "ratio": ratio} | measured)
            print(json.dumps(pairs[-1]), file=sys.stderr, flush=True)
    run_rate = statistics.median(p["run"]["docs_per_s"] for p in pairs)
    worker_rate = statistics.median(p["worker"]["docs_per_s"] for p in pairs)
    ratio = worker_rate / run_rate
    result = {
        "label": "SQS worker (S3 event notifications, moto): documents / busy seconds",
        "documents": pairs[0]["run"]["documents"],
        "shards": len(shards),
        "replicas": int(REPLICAS),
        "run_docs_per_s": run_rate,
        "worker_docs_per_s": worker_rate,
        "ratio": ratio,
        "target": TARGET,
        "passed": ratio >= TARGET,
        "pairs": pairs,
    }
    print(json.dumps(result, indent=2))
    print(
        f"batchjob run {run_rate:.1f} docs/s, SQS worker {worker_rate:.1f} docs/s while busy "
        f"(medians of {len(pairs)}, {REPLICAS} replicas each): {ratio:.2f} x "
        f"({'PASS' if result['passed'] else 'MISS'}, target >= {TARGET})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

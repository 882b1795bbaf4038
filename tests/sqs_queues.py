"""Real SQS queues for tests, on the moto server of tests/s3_server.py: a fresh queue per
test (with a dead-letter queue and a short visibility timeout where asked), S3→SQS
notifications configured through moto's own S3, and a worker process to run against them.

Fixture: `queues` (import `queues_fixture`): `queues.make(...)` → `Queue`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.s3_server import Bucket, MotoServer

_names = itertools.count()
STARTUP = 120.0  # seconds: imports and replica start of a worker process on a busy machine


@dataclass
class Queue:
    url: str
    arn: str
    client: Any  # a boto3 SQS client talking to moto directly
    dlq: Queue | None = None

    def send(self, body: str | dict[str, Any]) -> str:
        text = body if isinstance(body, str) else json.dumps(body)
        message_id: str = self.client.send_message(QueueUrl=self.url, MessageBody=text)["MessageId"]
        return message_id

    def receive(self, wait: int = 0) -> list[dict[str, Any]]:
        """What another consumer would get now (and then hold for the visibility timeout)."""
        response = self.client.receive_message(
            QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=wait
        )
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    def depth(self) -> int:
        """Messages in the queue, visible or in flight."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attributes = self.client.get_queue_attributes(QueueUrl=self.url, AttributeNames=names)
        return sum(int(attributes["Attributes"][n]) for n in names)

    def notify_from(self, bucket: Bucket, prefix: str = "") -> None:
        """S3 → this queue on every ObjectCreated in `bucket` (moto sends its TestEvent)."""
        rule: dict[str, Any] = {"QueueArn": self.arn, "Events": ["s3:ObjectCreated:*"]}
        if prefix:
            rule["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
        bucket.client.put_bucket_notification_configuration(
            Bucket=bucket.name, NotificationConfiguration={"QueueConfigurations": [rule]}
        )


@dataclass
class Queues:
    client: Any

    def make(self, visibility: int = 30, max_receive_count: int | None = None) -> Queue:
        name = f"bj-{os.getpid()}-{next(_names)}"
        attributes = {"VisibilityTimeout": str(visibility)}
        dlq = None
        if max_receive_count is not None:
            dlq = self.make()
            policy = {"deadLetterTargetArn": dlq.arn, "maxReceiveCount": str(max_receive_count)}
            attributes["RedrivePolicy"] = json.dumps(policy)
        url = self.client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        arn = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return Queue(url, arn["Attributes"]["QueueArn"], self.client, dlq)


@pytest.fixture(name="queues")
def queues_fixture(moto_server: MotoServer, s3_env: dict[str, str]) -> Queues:
    import boto3

    return Queues(boto3.client("sqs", endpoint_url=moto_server.url))


# -- a worker process ---------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]
    stdout: Path
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text()

    def wait_for_log(self, pattern: str, timeout: float = STARTUP) -> re.Match[str]:
        found = wait_until(lambda: re.search(pattern, self.log()), timeout, pattern)
        return found

    def finish(self, timeout: float = STARTUP) -> int:
        """Its exit code, once it exits on its own (idle) or after a signal."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout} s:\n{self.log()}") from None

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def messages(self, outcome: str = "done") -> list[str]:
        """Ids of the messages the log says ended with `outcome`."""
        return re.findall(rf"message (\S+) {outcome}\b", self.log())


@contextlib.contextmanager
def worker_process(
    artifact: str, queue: Queue, output: str, tmp: Path, *flags: str
) -> Iterator[WorkerProcess]:
    """`python -m batchjob worker` in its own process group, killed with its replicas on the
    way out. The AWS environment (moto, or the proxy in front of it) comes from os.environ."""
    name = f"worker-{next(_names)}"
    cmd = [sys.executable, "-m", "batchjob", "--log-level", "INFO", "worker", "--model", artifact]
    cmd += ["--queue", queue.url, "--output", output, "--replicas", "1", *flags]
    cmd += _allow(output, flags)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    stdout, stderr = tmp / f"{name}.out", tmp / f"{name}.err"
    with stdout.open("w") as out_file, stderr.open("w") as err_file:
        proc = subprocess.Popen(
            cmd, stdout=out_file, stderr=err_file, env=env, text=True, start_new_session=True
        )
        try:
            yield WorkerProcess(proc, stdout, stderr)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)
    return value


@dataclass
class WorkerRun:
    """A worker run in-process to its end (idle): its exit code, stdout and log."""

    code: int
    stdout: str
    text: str

    def log(self) -> str:
        return self.text

    def messages(self, outcome: str = "done") -> list[str]:
        return re.findall(rf"message (\S+) {outcome}\b", self.text)


def run_worker(
    artifact: str,
    queue: Queue,
    output: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    *flags: str,
) -> WorkerRun:
    """`batchjob worker` in this process, until it exits (give it --exit-when-idle)."""
    from batchjob.cli import main

    caplog.set_level(logging.INFO, logger="batchjob")
    caplog.clear()
    argv = ["worker", "--model", artifact, "--queue", queue.url, "--output", output]
    argv += ["--replicas", "1", *flags, *_allow(output, flags)]
    code = main(argv)
    out, _ = capsys.readouterr()
    return WorkerRun(code, out, caplog.text)


def _allow(output: str, flags: tuple[str, ...]) -> list[str]:
    """The output's bucket as the allowed input, unless the flags say otherwise."""
    if any(f.startswith("--allow-") for f in flags):
        return []
    return ["--allow-input", output[: output.index("/", len("s3://")) + 1]]

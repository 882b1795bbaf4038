"""The specs of `batchjob submit` and `batchjob status` (config.py holds the drivers'): frozen,
validated on construction, errors that name the flag and the value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchjob.config import check_account_id, require, require_one_input
from batchjob.job_records import check_job_id, default_job_id
from batchjob.prices import hourly_price

MAX_SHARDS_PER_MESSAGE = 100  # what a worker accepts in one message (messages.py)


def _s3(flag: str, value: str) -> None:
    require(
        value.startswith("s3://") and bool(value[len("s3://") :].split("/")[0]),
        f"{flag} must be an s3://bucket/prefix/ URI, got {value!r}",
    )


@dataclass(frozen=True)
class SubmitSpec:
    """What `batchjob submit` sends: the shards of an S3 input, in job messages."""

    queue: str
    output: str
    input: str = ""
    input_manifest: str | None = None
    shards_per_message: int = 1  # one: the finest spread over workers, a failure per shard
    job_id: str = ""  # "": derived from the input (or manifest) and the output
    expected_bucket_owner: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.queue), "--queue is required")
        require(bool(self.output), "--output is required")
        _s3("--output", self.output)
        require_one_input(self.input, self.input_manifest)
        if self.input:
            _s3("--input", self.input)
        require(
            1 <= self.shards_per_message <= MAX_SHARDS_PER_MESSAGE,
            f"--shards-per-message must be 1..{MAX_SHARDS_PER_MESSAGE}, "
            f"got {self.shards_per_message}",
        )
        check_account_id(self.expected_bucket_owner)
        if self.job_id:
            check_job_id(self.job_id, "--job-id")
        else:
            source = self.input or str(self.input_manifest)
            object.__setattr__(self, "job_id", default_job_id(source, self.output))


@dataclass(frozen=True)
class StatusSpec:
    """What `batchjob status` reads: the records under an output."""

    output: str
    job_id: str | None = None  # None: every job and run on the output
    price_per_hour: float | None = None
    instance_type: str | None = None
    expected_bucket_owner: str | None = None
    failed_shown: int = 10  # failed shards listed with their reasons

    def __post_init__(self) -> None:
        require(bool(self.output), "--output is required")
        if self.job_id is not None:
            check_job_id(self.job_id, "--job-id")
        hourly_price(self.price_per_hour, self.instance_type)
        check_account_id(self.expected_bucket_owner)

    @property
    def price(self) -> float | None:
        return hourly_price(self.price_per_hour, self.instance_type)


def _fields(fields: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: fields[name] for name in names if name in fields}


def submit_spec(fields: dict[str, Any]) -> SubmitSpec:
    names = ("input", "input_manifest", "shards_per_message", "job_id")
    return SubmitSpec(
        queue=fields.get("queue", ""),
        output=fields.get("output", ""),
        expected_bucket_owner=fields.get("expected_bucket_owner"),
        **_fields(fields, names),
    )


def status_spec(fields: dict[str, Any]) -> StatusSpec:
    names = ("job_id", "price_per_hour", "instance_type", "expected_bucket_owner")
    return StatusSpec(output=fields.get("output", ""), **_fields(fields, names))

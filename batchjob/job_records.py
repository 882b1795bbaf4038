"""What runs, submissions and queue messages record under an output, and what they add up to:
pure functions, no I/O (record_store.py reads and writes them).

Every record is a JSON object under `<output>/_batchjob/`, at a key no other writer uses
(a timestamp and random bits in its name), so concurrent writers never overwrite each other:

    _batchjob/runs/<run-id>.json                          one per `batchjob run`
    _batchjob/jobs/<job-id>/submissions/<id>.json         one per `batchjob submit`: every
                                                          shard the job expects, those sent
    _batchjob/jobs/<job-id>/messages/<id>.json            one per delivery of a job message
                                                          that ended: shards written, failed

`_manifest.json` is no record: it is the summary of the run records (`summarize_runs`): the
latest run's record and the list of every run, a function of the records alone, rewritten
after each run until it lists every run.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from batchjob.errors import UsageError
from batchjob.prices import Cost, cost
from batchjob.sinks import output_rel

RECORDS = "_batchjob/"
RUNS = RECORDS + "runs/"
JOBS = RECORDS + "jobs/"
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}")


def new_id(now: float | None = None) -> str:
    """A record's name: its UTC time (so names sort by time), then random bits."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(4)}"


def default_job_id(source: str, output: str) -> str:
    """The same input (or input manifest) and output: the same job, however often submitted."""
    digest = hashlib.sha256(f"{source}\n{output}".encode()).hexdigest()
    return f"job-{digest[:12]}"


def check_job_id(value: str, where: str) -> str:
    """A job id names a directory: one path component, nothing surprising. UsageError."""
    if not _JOB_ID.fullmatch(value):
        raise UsageError(
            f"{where} {value!r}: a job id is 1-128 letters, digits and ._=- (it names a "
            "directory under the output)"
        )
    return value


def job_prefix(job_id: str) -> str:
    return f"{JOBS}{job_id}/"


def submission_key(job_id: str, record_id: str) -> str:
    return f"{job_prefix(job_id)}submissions/{record_id}.json"


def message_key(job_id: str, record_id: str) -> str:
    return f"{job_prefix(job_id)}messages/{record_id}.json"


def run_key(run_id: str) -> str:
    return f"{RUNS}{run_id}.json"


# -- `_manifest.json`: the runs, summed up ----------------------------------------------------


def _by_time(records: Iterable[dict[str, Any]], at: str) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (float(r.get(at) or 0), str(r.get("run_id", ""))))


class Each:
    """A record's object whose keys are names (shards), each value of `shape`."""

    def __init__(self, shape: object) -> None:
        self.shape = shape


_NUMBER = (int, float)
_COUNTS = {"documents": int, "errors": int, "real_tokens": int}
# What readers of each kind of record take from it: a record that doesn't fit (edited by
# hand, or by someone who shouldn't) is skipped with a warning, never a traceback.
_SHAPES: dict[str, dict[str, object]] = {
    "runs": {
        "run_id": str,
        "started": _NUMBER,
        "finished": _NUMBER,
        "shards": {"done": [str], "skipped": [str], "failed": [{"shard": str, "error": str}]},
        "counts": _COUNTS,
        "timings": {"seconds": _NUMBER},
    },
    "submissions": {"shards": [str], "sent": [str], "submitted": _NUMBER},
    "messages": {
        "started": _NUMBER,
        "finished": _NUMBER,
        "final": bool,
        "failed": Each(str),
        "shards": Each({"written": bool, "documents": int, "errors": int}),
        "worker": str,
        "worker_totals": {"busy_seconds": _NUMBER, **_COUNTS},
    },
}


def misfit(key: str, record: dict[str, Any]) -> str | None:
    """Why the record at `key` doesn't have its kind's shape; None when it does."""
    kind = "runs" if key.startswith(RUNS) else key.rstrip("/").rsplit("/", 2)[-2]
    return _misfit(record, _SHAPES.get(kind, {}), "")


def _misfit(value: object, shape: object, where: str) -> str | None:
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where or 'the record'} is not an object"
        required = {"shard", "error"} & set(shape)  # a run's failures are read by name
        if missing := sorted(required - set(value)):
            return f"{where} lacks {missing[0]}"
        for name, inner in shape.items():
            path = f"{where}.{name}".lstrip(".")
            if name in value and (why := _misfit(value[name], inner, path)):
                return why
        return None
    if isinstance(shape, Each):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        found = (_misfit(v, shape.shape, f"{where}[{k!r}]") for k, v in value.items())
        return next((why for why in found if why), None)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        found = (_misfit(v, shape[0], f"{where}[{i}]") for i, v in enumerate(value))
        return next((why for why in found if why), None)
    assert isinstance(shape, type | tuple)
    if not isinstance(value, shape) or (isinstance(value, bool) and shape is not bool):
        return f"{where} has the wrong type ({type(value).__name__})"
    return None


def summarize_runs(records: list[dict[str, Any]]) -> dict[str, Any]:
    """`_manifest.json`: what the latest run to finish did (its record, as the manifest always
    said: its shards done, skipped and failed, its counts and times), and the list of every
    run's record. A function of the records alone: whichever run writes it, the same. The
    shards of every run together are `batchjob status`'s."""
    runs = _by_time(records, "finished")
    summary = dict(runs[-1])
    summary["runs"] = [
        {
            "run_id": r.get("run_id"),
            "record": run_key(str(r.get("run_id"))),
            "started": r.get("started"),
            "finished": r.get("finished"),
            "documents": r.get("counts", {}).get("documents", 0),
            "shards_done": len(r.get("shards", {}).get("done", ())),
            "shards_failed": len(r.get("shards", {}).get("failed", ())),
            **({"partition": r["partition"]} if "partition" in r else {}),
        }
        for r in runs
    ]
    return summary


# -- `batchjob status`: records and outputs → where the work stands ----------------------------


@dataclass
class Status:
    """Where a job (or every job and run on an output) stands."""

    expected: int = 0
    done: int = 0
    documents: int = 0  # in the outputs the records account for
    errors: int = 0  # error rows among them
    failed: dict[str, str] = field(default_factory=dict)  # for good: rel → why
    retrying: dict[str, str] = field(default_factory=dict)  # failed, to be delivered again
    seconds: float = 0.0  # from the first record's start to the last one's end
    shards_recorded: int = 0  # shards written in that time (the rate's numerator)
    machine_seconds: float = 0.0
    tokens: int = 0
    cost: Cost | None = None

    @property
    def remaining(self) -> int:
        return self.expected - self.done - len(self.failed)

    @property
    def eta_seconds(self) -> float | None:
        """The shards left at the rate shards were written so far; None before any was."""
        if not self.remaining:
            return 0.0
        if not self.shards_recorded or self.seconds <= 0:
            return None
        return self.remaining / (self.shards_recorded / self.seconds)

    @property
    def exit_code(self) -> int:
        """0 complete; 3 work remains (poll again); 1 nothing remains but shards that failed
        for good."""
        if self.remaining:
            return 3
        return 1 if self.failed else 0


@dataclass
class _Shard:
    done: bool = False
    at: float = -1.0  # when its latest failure or (re)submission happened
    failure: str | None = None  # the latest one, unless a submission came after it
    final: bool = False


def job_status(
    submissions: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    outputs: set[str],
    price_per_hour: float | None = None,
) -> Status:
    """Every shard a submission or a run listed, against the outputs that exist: done (an
    output), failed for good (its latest event is a final failure: a run's, or a worker's on
    the last delivery before the dead-letter queue), or remaining (retrying, in the queue,
    or not started). Throughput, ETA and cost from the records' times and worker totals."""
    shards: dict[str, _Shard] = {}

    def event(rel: str, at: float, failure: str | None, final: bool = False) -> None:
        shard = shards.setdefault(rel, _Shard())
        if at >= shard.at:
            shard.at, shard.failure, shard.final = at, failure, final

    for submission in submissions:
        for rel in submission.get("shards", ()):
            shards.setdefault(rel, _Shard())
        for rel in submission.get("sent", ()):
            event(rel, float(submission.get("submitted", 0)), None)
    status = Status()
    starts, ends = [], []
    for message in messages:
        at = float(message.get("finished", 0))
        for rel, reason in message.get("failed", {}).items():
            event(rel, at, reason, bool(message.get("final")))
        for rel, done in message.get("shards", {}).items():
            shards.setdefault(rel, _Shard())
            if done.get("written"):
                status.documents += int(done.get("documents", 0))
                status.errors += int(done.get("errors", 0))
                status.shards_recorded += 1
        starts.append(float(message.get("started", at)))
        ends.append(at)
    for run in runs:
        at = float(run.get("finished", 0))
        listed = run.get("shards", {})
        for rel in (*listed.get("done", ()), *listed.get("skipped", ())):
            shards.setdefault(rel, _Shard())
        for failure in listed.get("failed", ()):
            event(failure["shard"], at, failure["error"], True)  # a run doesn't try again
        counts = run.get("counts", {})
        status.documents += int(counts.get("documents", 0))
        status.errors += int(counts.get("errors", 0))
        status.shards_recorded += len(listed.get("done", ()))
        status.machine_seconds += float(run.get("timings", {}).get("seconds", 0))
        status.tokens += int(counts.get("real_tokens", 0))
        starts.append(float(run.get("started", at)))
        ends.append(at)
    status.expected = len(shards)
    for rel, shard in shards.items():
        if output_rel(rel) in outputs:
            status.done += 1
        elif shard.failure is not None:
            (status.failed if shard.final else status.retrying)[rel] = shard.failure
    if starts:
        status.seconds = max(ends) - min(starts)
    seconds, tokens = _worker_share(messages)
    status.machine_seconds += seconds
    status.tokens += tokens
    if price_per_hour is not None:
        status.cost = cost(price_per_hour, status.machine_seconds, status.documents, status.tokens)
    return status


def _worker_share(messages: list[dict[str, Any]]) -> tuple[float, int]:
    """The machine time and tokens of the job's messages. Each record carries its worker's
    totals so far (busy seconds, documents, tokens); a worker's latest totals, times the
    share of its documents that were this job's, are this job's part of that worker."""
    latest: dict[str, dict[str, Any]] = {}
    ours: dict[str, int] = {}
    for message in messages:
        worker, totals = str(message.get("worker", "")), message.get("worker_totals", {})
        if totals.get("busy_seconds", 0) >= latest.get(worker, {}).get("busy_seconds", -1):
            latest[worker] = totals
        written = message.get("shards", {}).values()
        ours[worker] = ours.get(worker, 0) + sum(int(s.get("documents", 0)) for s in written)
    seconds, tokens = 0.0, 0
    for worker, totals in latest.items():
        documents = int(totals.get("documents", 0))
        share = min(1.0, ours[worker] / documents) if documents else 1.0
        seconds += share * float(totals.get("busy_seconds", 0))
        tokens += round(share * int(totals.get("real_tokens", 0)))
    return seconds, tokens


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"
    )


def render(status: Status, what: str, shown: int = 10) -> list[str]:
    """`batchjob status`'s lines: a summary, then the failed shards with their reasons."""
    rate = status.documents / status.seconds if status.seconds > 0 else 0.0
    eta = status.eta_seconds
    state = {0: "complete", 1: "failed", 3: "in progress"}[status.exit_code]
    lines = [
        f"{what}: {state}: {status.done}/{status.expected} shards done, "
        f"{status.remaining} remaining, {len(status.failed)} failed",
        f"{status.documents} documents, {status.errors} error rows; "
        f"{rate:.1f} documents/s over {_duration(status.seconds)}; ETA "
        + ("unknown (no shard finished yet)" if eta is None else _duration(eta)),
    ]
    if status.cost is not None:
        lines.append(f"{status.cost.line()} ({status.machine_seconds / 3600:.3f} machine-hours)")
    if status.retrying:
        lines.append(f"{len(status.retrying)} shard(s) failed and will be delivered again")
    for rel, why in sorted(status.failed.items())[:shown]:
        lines.append(f"failed: {rel}: {why}")
    if len(status.failed) > shown:
        lines.append(f"... and {len(status.failed) - shown} more failed")
    return lines

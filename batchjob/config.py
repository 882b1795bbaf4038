"""Frozen job specs, validated on construction, built once at start-up and passed down.

Every field has a flag of the same name (`sort_window` ↔ `--sort-window`); a job file
(`--job FILE.yaml`) uses the same names, with dashes or underscores. Error messages name
the flag and the value.
"""

from __future__ import annotations

import itertools
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchjob.batching import Shape
from batchjob.errors import UsageError

TASKS = ("text-classification", "feature-extraction")
BACKENDS = ("cpu", "neuron", "neuronx")
DTYPES = ("auto", "fp32", "bf16")
POOLINGS = ("auto", "mean", "cls", "max")

# With no shape option at all, compile these buckets with a token budget per batch: on the
# typical short-document corpus this wastes little on padding (BENCHMARKS.md).
DEFAULT_BUCKETS = (16, 24, 32, 48, 64, 96, 128)
DEFAULT_MAX_BATCH_TOKENS = 1024
# Packing's one shape when nothing else decides it: rows of 128 tokens, the token budget's
# worth of rows, up to 16 documents a row.
DEFAULT_PACKING_LENGTH = 128
CLASSIC_BATCH_SIZE = 6
CLASSIC_SEQUENCE_LENGTH = 128


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def parse_buckets(text: str) -> tuple[int, ...]:
    """`"16,32,64"` → (16, 32, 64); sorted, distinct, each ≥ 2 (room for the special tokens)."""
    try:
        buckets = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--buckets must be integers separated by commas, got {text!r}") from None
    _require(bool(buckets), f"--buckets must name at least one length, got {text!r}")
    _require(
        all(a < b for a, b in itertools.pairwise(buckets)),
        f"--buckets must be strictly increasing, got {text}",
    )
    _require(buckets[0] >= 2, f"--buckets lengths must be ≥ 2, got {buckets[0]}")
    return buckets


def resolve_shapes(
    batch_size: int | None,
    sequence_length: int | None,
    buckets: tuple[int, ...] | None,
    max_batch_tokens: int | None,
) -> tuple[Shape, ...]:
    """The compiled shapes from the shape flags.

    `--buckets` gives one shape per length, each batch `--max-batch-tokens // length` rows
    (or `--batch-size` rows when only that is given). `--batch-size`/`--sequence-length`
    alone give the classic single shape, 6×128 by default. No shape flag at all gives the
    fast default: DEFAULT_BUCKETS with DEFAULT_MAX_BATCH_TOKENS.
    """
    for flag, value in (
        ("--batch-size", batch_size),
        ("--sequence-length", sequence_length),
        ("--max-batch-tokens", max_batch_tokens),
    ):
        _require(value is None or value >= 1, f"{flag} must be ≥ 1, got {value}")
    if buckets is None and (batch_size is not None or sequence_length is not None):
        _require(max_batch_tokens is None, "--max-batch-tokens goes with --buckets")
        length = sequence_length or CLASSIC_SEQUENCE_LENGTH
        _require(length >= 2, f"--sequence-length must be ≥ 2, got {length}")
        return (Shape(length, batch_size or CLASSIC_BATCH_SIZE),)
    _require(sequence_length is None, "--sequence-length and --buckets exclude each other")
    lengths = buckets or DEFAULT_BUCKETS
    _require(
        batch_size is None or max_batch_tokens is None,
        "--batch-size and --max-batch-tokens exclude each other",
    )
    if batch_size is not None:
        return tuple(Shape(n, batch_size) for n in lengths)
    budget = max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS
    _require(
        budget >= lengths[-1],
        f"--max-batch-tokens must be ≥ the largest bucket ({lengths[-1]}), got {budget}",
    )
    return tuple(Shape(n, budget // n) for n in lengths)


@dataclass(frozen=True)
class CompileSpec:
    """What `batchjob compile` builds (and what `run` builds from a plain model)."""

    model: str
    task: str | None = None  # None: inferred from the model's config
    backend: str = "cpu"
    dtype: str = "auto"
    shapes: tuple[Shape, ...] = ()  # () = the strategy's default shapes
    compiler_args: tuple[str, ...] = ()
    pooling: str = "auto"
    normalize: bool = True
    packing: bool | None = None  # None: packing where the model family allows it
    max_segments: int | None = None  # packing: documents a row may hold (default S // 8)
    calibrate: str | None = None  # a sample of the input: its lengths decide the shape

    def __post_init__(self) -> None:
        _require(bool(self.model), "--model is required")
        if self.task is not None:
            _choice("--task", self.task, TASKS)
        _choice("--backend", self.backend, BACKENDS)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--pooling", self.pooling, POOLINGS)
        lengths = [s.seq_len for s in self.shapes]
        _require(
            all(a < b for a, b in itertools.pairwise(lengths)),
            f"shapes must have strictly increasing lengths, got {','.join(map(str, lengths))}",
        )
        _require(
            self.max_segments is None or self.max_segments >= 1,
            f"--max-segments must be ≥ 1, got {self.max_segments}",
        )
        _require(
            not (self.packing and len(self.shapes) > 1),
            "--packing compiles one shape: give --sequence-length (and --batch-size), "
            "not --buckets",
        )
        _require(
            self.backend != "cpu" or not self.compiler_args,
            "--compiler-args only applies to the neuron and neuronx backends",
        )


@dataclass(frozen=True)
class RunSpec:
    """What `batchjob run` does: read shards, infer, write one Parquet file per shard."""

    model: str
    input: str
    output: str
    compile: CompileSpec
    format: str = "auto"
    text_field: str = "text"
    text_pair_field: str | None = None
    id_field: str = "id"
    resume: bool = False
    replicas: int | None = None
    cores_per_replica: int = 1
    sort_window: int = 4096
    chunk_size: int = 1024
    replica_start_timeout: float = 300.0
    cache_dir: str = ""
    progress: str = "auto"  # auto: a bar on a terminal, log lines otherwise
    input_manifest: str | None = None  # instead of --input: a list of shards (local or s3://)
    max_shards_in_flight: int = 8  # shards open at once: S3 objects download ahead
    expected_bucket_owner: str | None = None  # sent with every S3 call (ExpectedBucketOwner)

    def __post_init__(self) -> None:
        check_account_id(self.expected_bucket_owner)
        _require(
            bool(self.input) or bool(self.input_manifest),
            "--input is required (or --input-manifest)",
        )
        _require(
            not (self.input and self.input_manifest),
            "--input and --input-manifest exclude each other",
        )
        _require(bool(self.output), "--output is required")
        _choice("--format", self.format, ("auto", "jsonl", "csv", "parquet", "txt"))
        _choice("--progress", self.progress, ("auto", "bar", "log", "none"))
        check_replica_options(self.replicas, self.cores_per_replica, self.replica_start_timeout)
        for flag, value in (
            ("--sort-window", self.sort_window),
            ("--chunk-size", self.chunk_size),
            ("--max-shards-in-flight", self.max_shards_in_flight),
        ):
            _require(value >= 1, f"{flag} must be ≥ 1, got {value}")
        if not self.cache_dir:
            object.__setattr__(self, "cache_dir", default_cache_dir())


@dataclass(frozen=True)
class WorkerSpec:
    """What `batchjob worker` does: consume an SQS queue, write Parquet for each message."""

    queue: str  # a queue URL (or name)
    output: str  # where results go unless a job message names its own output
    compile: CompileSpec
    exit_when_idle: float | None = None  # seconds with no message: exit 0 (cron, batch use)
    drain_seconds: float = 25.0  # SIGTERM → exit: under Kubernetes' 30 s grace period
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    max_batch_delay_ms: float = 5.0  # a partial batch waits this long for more documents
    max_messages_in_flight: int = 16  # backpressure: received and not yet finished
    replicas: int | None = None
    cores_per_replica: int = 1
    text_field: str = "text"
    text_pair_field: str | None = None
    id_field: str = "id"
    replica_start_timeout: float = 300.0
    cache_dir: str = ""
    visibility_ceiling: float = 12 * 3600  # SQS's: work that would outlast it is failed
    # What S3 events and job messages may read: anyone who can send to the queue can
    # otherwise make the worker read whatever its role can (and write it out).
    allow_input: tuple[str, ...] = ()
    allow_any_input: bool = False
    expected_bucket_owner: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.queue), "--queue is required")
        _require(bool(self.output), "--output is required")
        _require(
            self.output.startswith("s3://") and len(self.output) > len("s3://"),
            f"--output must be an s3:// URI for the worker, got {self.output!r}",
        )
        for prefix in self.allow_input:
            _require(
                prefix.startswith("s3://") and bool(prefix[len("s3://") :].split("/")[0]),
                f"--allow-input must be an s3://bucket/prefix/ URI, got {prefix!r}",
            )
        _require(
            bool(self.allow_input) or self.allow_any_input,
            "--allow-input s3://bucket/prefix/ is required (repeatable): the objects queue "
            "messages may ask for; --allow-any-input allows whatever the worker's role can read",
        )
        _require(
            not (self.allow_input and self.allow_any_input),
            "--allow-input and --allow-any-input exclude each other",
        )
        check_account_id(self.expected_bucket_owner)
        _require(
            self.exit_when_idle is None or self.exit_when_idle >= 0,
            f"--exit-when-idle must be ≥ 0 seconds, got {self.exit_when_idle}",
        )
        _require(self.drain_seconds >= 0, f"--drain-seconds must be ≥ 0, got {self.drain_seconds}")
        _require(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            f"--metrics-port must be 0..65535, got {self.metrics_port}",
        )
        _require(
            0 <= self.max_batch_delay_ms <= 10_000,
            f"--max-batch-delay-ms must be 0..10000, got {self.max_batch_delay_ms:g}",
        )
        _require(
            self.max_messages_in_flight >= 1,
            f"--max-messages-in-flight must be ≥ 1, got {self.max_messages_in_flight}",
        )
        check_replica_options(self.replicas, self.cores_per_replica, self.replica_start_timeout)
        if not self.cache_dir:
            object.__setattr__(self, "cache_dir", default_cache_dir())


def check_replica_options(
    replicas: int | None, cores_per_replica: int, start_timeout: float
) -> None:
    """The flags every command that starts replicas shares."""
    _require(replicas is None or replicas >= 1, f"--replicas must be ≥ 1, got {replicas}")
    _require(cores_per_replica >= 1, f"--cores-per-replica must be ≥ 1, got {cores_per_replica}")
    _require(start_timeout > 0, f"--replica-start-timeout must be > 0, got {start_timeout}")


_ACCOUNT_ID = re.compile(r"[0-9]{12}")


def check_account_id(value: str | None) -> None:
    _require(
        value is None or bool(_ACCOUNT_ID.fullmatch(value)),
        f"--expected-bucket-owner must be a 12-digit AWS account id, got {value!r}",
    )


def default_cache_dir() -> str:
    """Where compiled plain models are kept: $XDG_CACHE_HOME/batchjob or ~/.cache/batchjob."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "batchjob")


# Job-file fields that are not spec fields: the shape flags, whose values become `shapes`.
_SHAPE_TYPES: dict[str, Any] = {
    "batch_size": int,
    "sequence_length": int,
    "max_batch_tokens": int,
    "buckets": str | int | list[int],
}
_NOT_JOB_FIELDS = {"compile", "shapes", "visibility_ceiling"}


def _field_types(*specs: type) -> dict[str, Any]:
    types_: dict[str, Any] = dict(_SHAPE_TYPES)
    for spec in specs:
        types_.update(typing.get_type_hints(spec))
    types_["compiler_args"] = str | list[str]  # a job file gives a string or a list
    for name in _NOT_JOB_FIELDS:
        types_.pop(name, None)
    return types_


def _matches(value: object, expected: Any) -> bool:
    """isinstance for the annotations specs use: bool is not an int, an int is a float."""
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, t) for t in typing.get_args(expected))
    if origin in (tuple, list):
        inner = typing.get_args(expected)[0]
        return isinstance(value, list | tuple) and all(_matches(v, inner) for v in value)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(t) for t in typing.get_args(expected))
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(expected)[0]).split(' ', 1)[1]}s"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return "null" if expected is type(None) else names.get(expected, str(expected))


def load_job_file(path: str, command: str = "run") -> dict[str, Any]:
    """A job file's fields, keys normalised to underscores, each checked against the type of
    its spec field (so `batch_size: "8"` is refused, not coerced)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--job {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--job {path}: not valid YAML: {e}".replace("\n", " ")) from None
    _require(isinstance(data, dict), f"--job {path}: expected a mapping of fields, got {data!r}")
    fields = {str(k).replace("-", "_"): v for k, v in data.items()}
    spec = WorkerSpec if command == "worker" else RunSpec
    known = _field_types(spec, CompileSpec)
    unknown = sorted(set(fields) - set(known))
    _require(not unknown, f"--job {path}: unknown field(s) {', '.join(unknown)}")
    for name in ("allow_input",):  # one prefix may be written without a list
        if isinstance(fields.get(name), str):
            fields[name] = [fields[name]]
    for name, value in fields.items():
        _require(
            _matches(value, known[name]),
            f"--job {path}: {name} must be {_describe(known[name])}, got {value!r}",
        )
    if "allow_input" in fields:
        fields["allow_input"] = tuple(fields["allow_input"])
    return fields

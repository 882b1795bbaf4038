"""Frozen job specs, validated on construction, built once at start-up and passed down.

Every field has a flag of the same name (`sort_window` ↔ `--sort-window`); a job file
(`--job FILE.yaml`) uses the same names, with dashes or underscores. Error messages name
the flag and the value.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchjob.batching import Shape
from batchjob.errors import UsageError
from batchjob.output_format import OUTPUT_FIELDS, OutputFormat, output_format
from batchjob.pair_tasks import run_task_of
from batchjob.partitions import Partition, parse_partition, resolve_partition
from batchjob.prices import hourly_price

log = logging.getLogger("batchjob.config")

TASKS = ("text-classification", "feature-extraction", "token-classification")
BACKENDS = ("cpu", "neuron", "neuronx")
DTYPES = ("auto", "fp32", "bf16")
# sentence-transformers' pooling modes (its Pooling.POOLING_MODES), in its order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
POOLINGS = ("auto", *POOLING_MODES)
LONG_DOCUMENTS = ("truncate", "chunk", "mean")  # long_documents.py says what each does
DEFAULT_CHUNK_OVERLAP = 32

# With no shape option at all, the compiled length is the model's own (compile_plan.model_length),
# at most MAX_DEFAULT_LENGTH. Buckets are the standard lengths below it and that length,
# each batch a token budget's worth of rows: on the typical short-document corpus this
# wastes little on padding (BENCHMARKS.md). Packing compiles one row of that length.
STANDARD_LENGTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MAX_DEFAULT_LENGTH = 512
DEFAULT_BUCKETS = (16, 24, 32, 48, 64, 96, 128)  # --buckets' lengths when only a budget is given
DEFAULT_MAX_BATCH_TOKENS = 1024
# What --calibrate assumes of an empty sample.
DEFAULT_PACKING_LENGTH = 128
CLASSIC_BATCH_SIZE = 6
CLASSIC_SEQUENCE_LENGTH = 128


def require(ok: bool, message: str) -> None:
    """UsageError(message) unless `ok`: every spec check is one of these."""
    if not ok:
        raise UsageError(message)


def require_one_input(input: str, input_manifest: str | None) -> None:
    """`--input` or `--input-manifest`: one of them, not both."""
    require(bool(input) or bool(input_manifest), "--input is required (or --input-manifest)")
    require(not (input and input_manifest), "--input and --input-manifest exclude each other")


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def parse_buckets(text: str) -> tuple[int, ...]:
    """`"16,32,64"` → (16, 32, 64); sorted, distinct, each ≥ 2 (room for the special tokens)."""
    try:
        buckets = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--buckets must be integers separated by commas, got {text!r}") from None
    require(bool(buckets), f"--buckets must name at least one length, got {text!r}")
    require(
        all(a < b for a, b in itertools.pairwise(buckets)),
        f"--buckets must be strictly increasing, got {text}",
    )
    require(buckets[0] >= 2, f"--buckets lengths must be ≥ 2, got {buckets[0]}")
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
    alone give the classic single shape, 6×128 by default. `--max-batch-tokens` alone gives
    DEFAULT_BUCKETS with that budget. No shape flag at all is decided by the model (its
    length: compile_plan.plan), not here.
    """
    for flag, value in (
        ("--batch-size", batch_size),
        ("--sequence-length", sequence_length),
        ("--max-batch-tokens", max_batch_tokens),
    ):
        require(value is None or value >= 1, f"{flag} must be ≥ 1, got {value}")
    if buckets is None and (batch_size is not None or sequence_length is not None):
        require(max_batch_tokens is None, "--max-batch-tokens goes with --buckets")
        length = sequence_length or CLASSIC_SEQUENCE_LENGTH
        require(length >= 2, f"--sequence-length must be ≥ 2, got {length}")
        return (Shape(length, batch_size or CLASSIC_BATCH_SIZE),)
    require(sequence_length is None, "--sequence-length and --buckets exclude each other")
    lengths = buckets or DEFAULT_BUCKETS
    require(
        batch_size is None or max_batch_tokens is None,
        "--batch-size and --max-batch-tokens exclude each other",
    )
    if batch_size is not None:
        return tuple(Shape(n, batch_size) for n in lengths)
    budget = max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS
    require(
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
    source: str = ""  # where `model` was fetched from (an s3:// URL: model_location.py)

    def __post_init__(self) -> None:
        require(bool(self.model), "--model is required")
        if self.task is not None:
            _choice("--task", self.task, TASKS)
        _choice("--backend", self.backend, BACKENDS)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--pooling", self.pooling, POOLINGS)
        lengths = [s.seq_len for s in self.shapes]
        require(
            all(a < b for a, b in itertools.pairwise(lengths)),
            f"shapes must have strictly increasing lengths, got {','.join(map(str, lengths))}",
        )
        require(
            self.max_segments is None or self.max_segments >= 1,
            f"--max-segments must be ≥ 1, got {self.max_segments}",
        )
        require(
            not (self.packing and len(self.shapes) > 1),
            "--packing compiles one shape: give --sequence-length (and --batch-size), "
            "not --buckets",
        )
        require(
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
    records_per_read: int = 1024
    chunk_size: int | None = None  # deprecated alias of records_per_read (one release)
    replica_start_timeout: float = 300.0
    cache_dir: str = ""
    progress: str = "auto"  # auto: a bar on a terminal, log lines otherwise
    long_documents: str = "truncate"
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP  # tokens, with --long-documents chunk or mean
    prompt: str | None = None  # prepended to every text
    prompt_name: str | None = None  # the model's prompt of that name
    input_manifest: str | None = None  # instead of --input: a list of shards (local or s3://)
    max_shards_in_flight: int = 8  # shards open at once: S3 objects download ahead
    expected_bucket_owner: str | None = None  # sent with every S3 call (ExpectedBucketOwner)
    price_per_hour: float | None = None  # USD per machine-hour: the summary's cost figures
    instance_type: str | None = None  # instead: its On-Demand price (prices.py)
    # --keep-columns, --embedding-*
    output_format: OutputFormat = field(default_factory=OutputFormat)
    # "I/N": run part I of N of the shards (partitions.py); run_spec resolves --partitions N
    # and the schedulers' index variables into it.
    partition: str | None = None

    @property
    def part(self) -> Partition | None:
        return parse_partition(self.partition) if self.partition is not None else None

    def __post_init__(self) -> None:
        check_account_id(self.expected_bucket_owner)
        _ = self.part  # a malformed --partition is refused here
        hourly_price(self.price_per_hour, self.instance_type)  # and a bad price
        require_one_input(self.input, self.input_manifest)
        require(bool(self.output), "--output is required")
        _choice("--format", self.format, ("auto", "jsonl", "csv", "parquet", "txt"))
        _choice("--progress", self.progress, ("auto", "bar", "log", "none"))
        check_replica_options(self.replicas, self.cores_per_replica, self.replica_start_timeout)
        check_text_options(self.long_documents, self.chunk_overlap, self.prompt, self.prompt_name)
        self.output_format.pairs.check_records(self.long_documents, self.text_pair_field)
        if self.chunk_size is not None:
            # "chunk" is a window of a long document now (--long-documents chunk).
            log.warning("--chunk-size is deprecated: it is --records-per-read now")
            object.__setattr__(self, "records_per_read", self.chunk_size)
        for flag, value in (
            ("--sort-window", self.sort_window),
            ("--records-per-read", self.records_per_read),
            ("--max-shards-in-flight", self.max_shards_in_flight),
        ):
            require(value >= 1, f"{flag} must be ≥ 1, got {value}")
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
    # Defaults for every message; a job or inline message may set its own.
    long_documents: str = "truncate"
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    prompt: str | None = None
    prompt_name: str | None = None
    # --keep-columns, --embedding-*; a job message may name other columns to keep
    output_format: OutputFormat = field(default_factory=OutputFormat)

    def __post_init__(self) -> None:
        require(bool(self.queue), "--queue is required")
        check_text_options(self.long_documents, self.chunk_overlap, self.prompt, self.prompt_name)
        self.output_format.pairs.check_records(self.long_documents, self.text_pair_field)
        require(bool(self.output), "--output is required")
        require(
            self.output.startswith("s3://") and len(self.output) > len("s3://"),
            f"--output must be an s3:// URI for the worker, got {self.output!r}",
        )
        for prefix in self.allow_input:
            require(
                prefix.startswith("s3://") and bool(prefix[len("s3://") :].split("/")[0]),
                f"--allow-input must be an s3://bucket/prefix/ URI, got {prefix!r}",
            )
        require(
            bool(self.allow_input) or self.allow_any_input,
            "--allow-input s3://bucket/prefix/ is required (repeatable): the objects queue "
            "messages may ask for; --allow-any-input allows whatever the worker's role can read",
        )
        require(
            not (self.allow_input and self.allow_any_input),
            "--allow-input and --allow-any-input exclude each other",
        )
        check_account_id(self.expected_bucket_owner)
        require(
            self.exit_when_idle is None or self.exit_when_idle >= 0,
            f"--exit-when-idle must be ≥ 0 seconds, got {self.exit_when_idle}",
        )
        require(self.drain_seconds >= 0, f"--drain-seconds must be ≥ 0, got {self.drain_seconds}")
        require(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            f"--metrics-port must be 0..65535, got {self.metrics_port}",
        )
        require(
            0 <= self.max_batch_delay_ms <= 10_000,
            f"--max-batch-delay-ms must be 0..10000, got {self.max_batch_delay_ms:g}",
        )
        require(
            self.max_messages_in_flight >= 1,
            f"--max-messages-in-flight must be ≥ 1, got {self.max_messages_in_flight}",
        )
        check_replica_options(self.replicas, self.cores_per_replica, self.replica_start_timeout)
        if not self.cache_dir:
            object.__setattr__(self, "cache_dir", default_cache_dir())


def check_text_options(
    long_documents: str, chunk_overlap: int, prompt: str | None, prompt_name: str | None
) -> None:
    """The flags of long documents and prompts (checked against the model once it is open:
    prompts.resolve_text_options)."""
    _choice("--long-documents", long_documents, LONG_DOCUMENTS)
    require(chunk_overlap >= 0, f"--chunk-overlap must be ≥ 0, got {chunk_overlap}")
    require(prompt is None or prompt_name is None, "--prompt and --prompt-name exclude each other")
    require(prompt_name is None or bool(prompt_name), "--prompt-name must not be empty")


MAX_REPLICAS = 1024  # a process each: more would exhaust memory before any started


def check_replica_options(
    replicas: int | None, cores_per_replica: int, start_timeout: float
) -> None:
    """The flags every command that starts replicas shares."""
    require(replicas is None or replicas >= 1, f"--replicas must be ≥ 1, got {replicas}")
    require(
        replicas is None or replicas <= MAX_REPLICAS,
        f"--replicas must be ≤ {MAX_REPLICAS}, got {replicas}",
    )
    require(cores_per_replica >= 1, f"--cores-per-replica must be ≥ 1, got {cores_per_replica}")
    require(start_timeout > 0, f"--replica-start-timeout must be > 0, got {start_timeout}")


_ACCOUNT_ID = re.compile(r"[0-9]{12}")


def check_account_id(value: str | None) -> None:
    require(
        value is None or bool(_ACCOUNT_ID.fullmatch(value)),
        f"--expected-bucket-owner must be a 12-digit AWS account id, got {value!r}",
    )


def default_cache_dir() -> str:
    """Where compiled plain models are kept: $XDG_CACHE_HOME/batchjob or ~/.cache/batchjob."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "batchjob")


# The flags that give the compiled shapes (`resolve_shapes`), and CompileSpec's other fields.
SHAPE_FIELDS = ("batch_size", "sequence_length", "buckets", "max_batch_tokens")
COMPILE_FIELDS = (
    "task",
    "backend",
    "dtype",
    "compiler_args",
    "pooling",
    "normalize",
    "packing",
    "max_segments",
    "calibrate",
)
_NOT_SPEC_FIELDS = {
    "job",
    "partitions",  # resolved into `partition` (run_spec)
    "command",
    "log_level",
    *SHAPE_FIELDS,
    *COMPILE_FIELDS,
    *OUTPUT_FIELDS,
}


def compile_spec(fields: dict[str, Any]) -> CompileSpec:
    """The CompileSpec from flags or job-file fields (absent ones missing)."""
    buckets = fields.get("buckets")
    if isinstance(buckets, str | int):  # from a job file
        fields["buckets"] = parse_buckets(str(buckets))
    elif isinstance(buckets, list):
        fields["buckets"] = parse_buckets(",".join(map(str, buckets)))
    given = [fields.get(name) for name in SHAPE_FIELDS]
    shapes = resolve_shapes(*given) if any(v is not None for v in given) else ()
    options = {k: fields[k] for k in COMPILE_FIELDS if k in fields}
    if "task" in options:  # zero-shot-classification, text-ranking: a classifier's graphs
        options["task"] = run_task_of(options["task"])
    if isinstance(options.get("compiler_args"), str):
        options["compiler_args"] = shlex.split(options["compiler_args"])
    options["compiler_args"] = tuple(options.get("compiler_args", ()))
    return CompileSpec(model=fields.get("model", ""), shapes=shapes, **options)


def run_spec(fields: dict[str, Any], env: Mapping[str, str] | None = None) -> RunSpec:
    """`env`: where a scheduler's part index is read (the CLI passes os.environ); None reads
    none."""
    require(
        not ("chunk_size" in fields and "records_per_read" in fields),
        "--chunk-size is the deprecated name of --records-per-read: give one of them",
    )
    options = {k: v for k, v in fields.items() if k not in _NOT_SPEC_FIELDS}
    part = resolve_partition(fields.get("partition"), fields.get("partitions"), env or {})
    options["partition"] = None if part is None else str(part)
    for name in ("model", "input", "output"):
        options.setdefault(name, "")
    return RunSpec(compile=compile_spec(fields), output_format=output_format(fields), **options)


def worker_spec(fields: dict[str, Any]) -> WorkerSpec:
    options = {k: v for k, v in fields.items() if k not in _NOT_SPEC_FIELDS | {"model"}}
    if "allow_input" in options:
        options["allow_input"] = tuple(options["allow_input"])
    return WorkerSpec(
        queue=options.pop("queue", ""),
        output=options.pop("output", ""),
        compile=compile_spec(fields),
        output_format=output_format(fields),
        **options,
    )

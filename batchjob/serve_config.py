"""`batchjob serve`'s spec: flags first, then the environment (Batch Transform can pass
nothing else), read once here at start-up. Every flag has its variable, and a flag wins over
it; a variable's value is checked as the flag's is, and a bad one is named in the one-line
refusal (`BATCHJOB_REPLICAS=0: --replicas must be ≥ 1, got 0`). `true`/`false` variables
also take 1/0, yes/no, on/off. An empty variable is not set.

| flag                       | environment                                               |
|----------------------------|-----------------------------------------------------------|
| --model                    | BATCHJOB_MODEL, else /opt/ml/model, else HF_MODEL_ID      |
| --task                     | BATCHJOB_TASK, else HF_TASK (the toolkit's names)         |
| --backend                  | BATCHJOB_BACKEND (the neuronx image sets it)              |
| --dtype                    | BATCHJOB_DTYPE                                            |
| --batch-size               | BATCHJOB_BATCH_SIZE                                       |
| --sequence-length          | BATCHJOB_SEQUENCE_LENGTH                                  |
| --buckets                  | BATCHJOB_BUCKETS (e.g. 16,32,64,128)                      |
| --max-batch-tokens         | BATCHJOB_MAX_BATCH_TOKENS                                 |
|   (no shape flag or        | config.json's `neuron` section, else                      |
|   BATCHJOB_ shape variable)| HF_OPTIMUM_SEQUENCE_LENGTH, HF_OPTIMUM_BATCH_SIZE         |
| --compiler-args            | BATCHJOB_COMPILER_ARGS                                    |
| --pooling                  | BATCHJOB_POOLING                                          |
| --no-normalize             | BATCHJOB_NORMALIZE (true/false)                           |
| --packing, --no-packing    | BATCHJOB_PACKING (true/false)                             |
| --max-segments             | BATCHJOB_MAX_SEGMENTS                                     |
| --calibrate                | BATCHJOB_CALIBRATE                                        |
| --replicas                 | BATCHJOB_REPLICAS                                         |
| --cores-per-replica        | BATCHJOB_CORES_PER_REPLICA                                |
| --replica-start-timeout    | BATCHJOB_REPLICA_START_TIMEOUT                            |
| --cache-dir                | BATCHJOB_CACHE_DIR                                        |
| --host                     | BATCHJOB_HOST                                             |
| --port                     | SAGEMAKER_BIND_TO_PORT, else 8080                         |
| (payload limit, no flag)   | SAGEMAKER_MAX_PAYLOAD_IN_MB, else 6                       |
| --max-batch-delay-ms       | BATCHJOB_MAX_BATCH_DELAY_MS                               |
| --text-field               | BATCHJOB_TEXT_FIELD                                       |
| --long-documents           | BATCHJOB_LONG_DOCUMENTS                                   |
| --chunk-overlap            | BATCHJOB_CHUNK_OVERLAP                                    |
| --prompt, --prompt-name    | BATCHJOB_PROMPT, BATCHJOB_PROMPT_NAME (either flag        |
|                            | replaces both)                                            |
| --keep-columns             | BATCHJOB_KEEP_COLUMNS                                     |
| --embedding-type           | BATCHJOB_EMBEDDING_TYPE                                   |
| --embedding-dim            | BATCHJOB_EMBEDDING_DIM                                    |
| --embedding-precision      | BATCHJOB_EMBEDDING_PRECISION                              |
| --embedding-ranges         | BATCHJOB_EMBEDDING_RANGES (a file in the model)           |
| --multi-label              | BATCHJOB_MULTI_LABEL (true/false)                         |
| --threshold                | BATCHJOB_THRESHOLD                                        |
| --candidate-labels         | BATCHJOB_CANDIDATE_LABELS (a,b,c)                         |
| --candidate-labels-field   | BATCHJOB_CANDIDATE_LABELS_FIELD                           |
| --hypothesis-template      | BATCHJOB_HYPOTHESIS_TEMPLATE                              |
| --group-field              | BATCHJOB_GROUP_FIELD                                      |
| --aggregation              | BATCHJOB_AGGREGATION                                      |
| --drain-seconds            | BATCHJOB_DRAIN_SECONDS                                    |
| --max-concurrent-requests  | BATCHJOB_MAX_CONCURRENT_REQUESTS                          |
| --queue-timeout            | BATCHJOB_QUEUE_TIMEOUT                                    |
| --header-timeout           | BATCHJOB_HEADER_TIMEOUT                                   |
| --body-timeout             | BATCHJOB_BODY_TIMEOUT                                     |

The shape, as the Hugging Face inference toolkit reads it: a `neuron` section with both
`static_batch_size` and `static_sequence_length`, else HF_OPTIMUM_SEQUENCE_LENGTH with
HF_OPTIMUM_BATCH_SIZE (default 1; alone it is refused, as the toolkit refuses it). With
none of these the toolkit fails on Inferentia, and batchjob compiles its own shapes (the
model's length, in buckets). The shape settings apply to a plain model, compiled at start-up:
an artifact keeps the shapes it was compiled with.

Limits (serve_limits.py says how each is enforced): --max-concurrent-requests (default: the
MaxConcurrentTransforms advertised), --queue-timeout, --header-timeout, --body-timeout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchjob.config import (
    DEFAULT_CHUNK_OVERLAP,
    CompileSpec,
    check_replica_options,
    check_text_options,
    compile_spec,
    default_cache_dir,
    require,
)
from batchjob.errors import UsageError
from batchjob.output_format import (
    OUTPUT_FIELDS,
    OutputFormat,
    output_format,
    output_format_from_env,
)
from batchjob.serve_environment import (
    GENERIC_VARIABLES,
    SERVE_VARIABLES,
    env_int,
    environment_fields,
    fill_shapes,
    parse_variable,
    text_options_from_env,
)

DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_PORT = 8080
DEFAULT_MAX_PAYLOAD_MB = 6
MAX_PAYLOAD_MB_LIMIT = 100  # SageMaker's own ceiling for MaxPayloadInMB
# Batch Transform never sends more concurrent requests than the MaxConcurrentTransforms
# advertised, so requests wait only when a job sets it higher, or a client ignores it. Half
# of InvocationsTimeoutInSeconds' default (600 s): a request that waited that long still has
# time to run, and one refused then has time for SageMaker's retries (InvocationsMaxRetries).
DEFAULT_QUEUE_TIMEOUT = 300.0
# nginx's client_header_timeout; here it is also the keep-alive idle time (serve_limits.py).
DEFAULT_HEADER_TIMEOUT = 60.0
# The grace before a body (or an answer) must flow at serve_limits.MIN_TRANSFER_RATE:
# nginx's client_body_timeout and Apache's RequestReadTimeout body=20 are of this order.
DEFAULT_BODY_TIMEOUT = 30.0
# HF_TASK values of the toolkit (and transformers' aliases) → batchjob's tasks.
HF_TASKS = {
    "text-classification": "text-classification",
    "sentiment-analysis": "text-classification",
    "feature-extraction": "feature-extraction",
    "sentence-embeddings": "feature-extraction",
    "zero-shot-classification": "zero-shot-classification",  # pair_tasks.py
    "text-ranking": "text-ranking",
    "sentence-ranking": "text-ranking",  # the toolkit's name for a CrossEncoder
    "token-classification": "token-classification",
    "ner": "token-classification",
}


@dataclass(frozen=True)
class ServeSpec:
    compile: CompileSpec
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    replicas: int | None = None
    cores_per_replica: int = 1
    max_batch_delay_ms: float = 5.0
    max_payload_mb: int = DEFAULT_MAX_PAYLOAD_MB
    text_field: str = "inputs"
    drain_seconds: float = 25.0  # SIGTERM → exit: below the 30 s Kubernetes and ECS defaults
    replica_start_timeout: float = 300.0
    cache_dir: str = ""
    max_concurrent_requests: int | None = None  # None: MaxConcurrentTransforms
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    long_documents: str = "truncate"
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    prompt: str | None = None
    prompt_name: str | None = None
    output_format: OutputFormat = field(default_factory=OutputFormat)

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, f"--port must be 0..65535, got {self.port}")
        check_text_options(self.long_documents, self.chunk_overlap, self.prompt, self.prompt_name)
        self.output_format.pairs.check_long_documents(self.long_documents)
        check_replica_options(self.replicas, self.cores_per_replica, self.replica_start_timeout)
        require(
            0 <= self.max_batch_delay_ms <= 10_000,
            f"--max-batch-delay-ms must be 0..10000, got {self.max_batch_delay_ms:g}",
        )
        require(
            1 <= self.max_payload_mb <= MAX_PAYLOAD_MB_LIMIT,
            f"SAGEMAKER_MAX_PAYLOAD_IN_MB must be 1..{MAX_PAYLOAD_MB_LIMIT}, "
            f"got {self.max_payload_mb}",
        )
        require(bool(self.text_field), "--text-field must not be empty")
        require(self.drain_seconds >= 0, f"--drain-seconds must be ≥ 0, got {self.drain_seconds}")
        require(
            self.max_concurrent_requests is None or self.max_concurrent_requests >= 1,
            f"--max-concurrent-requests must be ≥ 1, got {self.max_concurrent_requests}",
        )
        require(
            0 <= self.queue_timeout <= 3600,
            f"--queue-timeout must be 0..3600 seconds, got {self.queue_timeout:g}",
        )
        for flag, value in (
            ("--header-timeout", self.header_timeout),
            ("--body-timeout", self.body_timeout),
        ):
            require(0 < value <= 3600, f"{flag} must be over 0 and ≤ 3600 seconds, got {value:g}")
        if not self.cache_dir:
            object.__setattr__(self, "cache_dir", default_cache_dir())

    @property
    def max_payload_bytes(self) -> int:
        return self.max_payload_mb << 20


def _has_files(path: str) -> bool:
    return os.path.isdir(path) and any(not n.startswith(".") for n in os.listdir(path))


def _model(fields: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    if fields.get("model"):
        return str(fields["model"])
    if _has_files(DEFAULT_MODEL_DIR):
        return DEFAULT_MODEL_DIR
    if hub_id := environ.get("HF_MODEL_ID", "").strip():
        return hub_id
    raise UsageError(
        f"no model: {DEFAULT_MODEL_DIR} is empty or missing and HF_MODEL_ID is not set; "
        "pass --model ARTIFACT_OR_MODEL (or BATCHJOB_MODEL)"
    )


def _task(fields: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    if fields.get("task"):
        return str(fields["task"])
    hf_task = environ.get("HF_TASK", "").strip()
    if not hf_task:
        return None
    if hf_task not in HF_TASKS:
        raise UsageError(
            f"HF_TASK must be one of {', '.join(HF_TASKS)} for batchjob, got {hf_task!r}"
        )
    return HF_TASKS[hf_task]


def serve_spec(flags: Mapping[str, Any], environ: Mapping[str, str]) -> ServeSpec:
    """The spec from parsed flags (absent ones missing) and the process environment. A value
    refused that came from a variable is refused naming it (`BATCHJOB_X=v: --x must be...`)."""
    from_environment = environment_fields(flags, environ)
    try:
        return _serve_spec(flags, environ, from_environment)
    except UsageError as e:
        message = str(e)
        flag = re.search(r"--[a-z][a-z-]*", message)
        name = flag.group(0)[2:].replace("-", "_") if flag else ""
        name = "normalize" if name == "no_normalize" else name
        if name in from_environment and not message.startswith(SERVE_VARIABLES[name]):
            raise UsageError(f"{from_environment[name]}: {message}") from None
        raise


def _serve_spec(
    flags: Mapping[str, Any], environ: Mapping[str, str], from_environment: dict[str, str]
) -> ServeSpec:
    fields = dict(flags)
    for name, setting in from_environment.items():
        variable, _, text = setting.partition("=")
        fields[name] = parse_variable(variable, GENERIC_VARIABLES[name], text)
    fields["model"] = _model(fields, environ)
    if task := _task(fields, environ):
        fields["task"] = task
    fill_shapes(fields, fields["model"], environ)
    port = fields.get("port")
    if port is None:
        port = env_int(environ, "SAGEMAKER_BIND_TO_PORT")
        require(
            port is None or 1 <= port <= 65535,
            f"SAGEMAKER_BIND_TO_PORT must be 1..65535, got {port}",
        )
    payload = env_int(environ, "SAGEMAKER_MAX_PAYLOAD_IN_MB")
    text_options_from_env(fields, environ)
    # The task too: zero-shot-classification and text-ranking are heads (pair_tasks.py).
    given = {name: fields[name] for name in (*OUTPUT_FIELDS, "task") if name in fields}
    formats = output_format({**output_format_from_env(environ), **given})
    options = {
        name: fields[name]
        for name in (
            "host",
            "replicas",
            "cores_per_replica",
            "max_batch_delay_ms",
            "text_field",
            "drain_seconds",
            "replica_start_timeout",
            "cache_dir",
            "max_concurrent_requests",
            "queue_timeout",
            "header_timeout",
            "body_timeout",
            "long_documents",
            "chunk_overlap",
            "prompt",
            "prompt_name",
        )
        if name in fields
    }
    return ServeSpec(
        compile=compile_spec(fields),
        port=DEFAULT_PORT if port is None else port,
        max_payload_mb=DEFAULT_MAX_PAYLOAD_MB if payload is None else payload,
        output_format=formats,
        **options,
    )

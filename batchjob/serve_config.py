"""`batchjob serve`'s spec: flags first, then the environment that SageMaker and the Hugging
Face inference toolkit define, read once here at start-up.

| setting       | flag                         | environment, where no flag                   |
|---------------|------------------------------|----------------------------------------------|
| port          | --port                       | SAGEMAKER_BIND_TO_PORT, else 8080            |
| payload limit | —                            | SAGEMAKER_MAX_PAYLOAD_IN_MB, else 6          |
| model         | --model                      | /opt/ml/model; HF_MODEL_ID when it is empty  |
| task          | --task                       | HF_TASK                                      |
| shapes        | --batch-size, --buckets, ... | config.json's `neuron` section, else         |
|               |                              | HF_OPTIMUM_BATCH_SIZE, _SEQUENCE_LENGTH      |
| backend       | --backend                    | BATCHJOB_BACKEND (the neuronx image sets it) |
| long documents| --long-documents             | BATCHJOB_LONG_DOCUMENTS                      |
|               | --chunk-overlap              | BATCHJOB_CHUNK_OVERLAP                       |
| prompt        | --prompt, --prompt-name      | BATCHJOB_PROMPT, BATCHJOB_PROMPT_NAME        |
| kept columns  | --keep-columns               | BATCHJOB_KEEP_COLUMNS                        |
| embeddings    | --embedding-dim, -precision, | BATCHJOB_EMBEDDING_DIM, _PRECISION, _RANGES  |
|               | -ranges, -type               | (a file in the model), _TYPE (Parquet only)  |
| multi-label   | --multi-label, --threshold   | BATCHJOB_MULTI_LABEL (true/false),           |
|               |                              | BATCHJOB_THRESHOLD                           |

Limits (serve_limits.py says how each is enforced): --max-concurrent-requests (default: the
MaxConcurrentTransforms advertised), --queue-timeout, --header-timeout, --body-timeout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchjob.config import (
    DEFAULT_CHUNK_OVERLAP,
    LONG_DOCUMENTS,
    SHAPE_FIELDS,
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


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {text!r}") from None


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
        "pass --model ARTIFACT_OR_MODEL"
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


def neuron_shape(model: str) -> tuple[int | None, int | None]:
    """(static_batch_size, static_sequence_length) from config.json's `neuron` section."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable model config: {e}") from None
    neuron = config.get("neuron") if isinstance(config, dict) else None
    if not isinstance(neuron, dict):
        return None, None
    found = []
    for key in ("static_batch_size", "static_sequence_length"):
        value = neuron.get(key)
        require(
            value is None or (isinstance(value, int) and value >= 1),
            f"{path}: neuron.{key} must be an integer ≥ 1, got {value!r}",
        )
        found.append(value)
    return found[0], found[1]


def _shapes(fields: dict[str, Any], model: str, environ: Mapping[str, str]) -> None:
    """Fill the shape fields from the environment where no shape flag was given."""
    if any(name in fields for name in SHAPE_FIELDS):
        return
    # A model compiled by optimum-neuron has these in its config; the toolkit prefers them.
    batch, length = neuron_shape(model)
    if batch is None and length is None:
        batch = _env_int(environ, "HF_OPTIMUM_BATCH_SIZE")
        length = _env_int(environ, "HF_OPTIMUM_SEQUENCE_LENGTH")
        for name, value in (
            ("HF_OPTIMUM_BATCH_SIZE", batch),
            ("HF_OPTIMUM_SEQUENCE_LENGTH", length),
        ):
            require(value is None or value >= 1, f"{name} must be ≥ 1, got {value}")
    if batch is not None:
        fields["batch_size"] = batch
    if length is not None:
        fields["sequence_length"] = length


def _text_options(fields: dict[str, Any], environ: Mapping[str, str]) -> None:
    """--long-documents, --chunk-overlap, --prompt/--prompt-name from the environment where no
    flag gave them (a prompt flag replaces both prompt variables)."""
    mode = environ.get("BATCHJOB_LONG_DOCUMENTS", "").strip()
    if "long_documents" not in fields and mode:
        require(
            mode in LONG_DOCUMENTS,
            f"BATCHJOB_LONG_DOCUMENTS must be one of {', '.join(LONG_DOCUMENTS)}, got {mode!r}",
        )
        fields["long_documents"] = mode
    overlap = _env_int(environ, "BATCHJOB_CHUNK_OVERLAP")
    if "chunk_overlap" not in fields and overlap is not None:
        require(overlap >= 0, f"BATCHJOB_CHUNK_OVERLAP must be ≥ 0, got {overlap}")
        fields["chunk_overlap"] = overlap
    if "prompt" in fields or "prompt_name" in fields:
        return
    # The prompt is taken as it is (a trailing space is part of it); an empty name is none.
    if "BATCHJOB_PROMPT" in environ:
        fields["prompt"] = environ["BATCHJOB_PROMPT"]
    if name := environ.get("BATCHJOB_PROMPT_NAME", "").strip():
        fields["prompt_name"] = name
    require(
        not ("prompt" in fields and "prompt_name" in fields),
        "BATCHJOB_PROMPT and BATCHJOB_PROMPT_NAME exclude each other",
    )


def serve_spec(flags: Mapping[str, Any], environ: Mapping[str, str]) -> ServeSpec:
    """The spec from parsed flags (absent ones missing) and the process environment."""
    fields = dict(flags)
    fields["model"] = _model(fields, environ)
    if task := _task(fields, environ):
        fields["task"] = task
    if "backend" not in fields and (backend := environ.get("BATCHJOB_BACKEND", "").strip()):
        fields["backend"] = backend
    _shapes(fields, fields["model"], environ)
    port = fields.get("port")
    if port is None:
        port = _env_int(environ, "SAGEMAKER_BIND_TO_PORT")
        require(
            port is None or 1 <= port <= 65535,
            f"SAGEMAKER_BIND_TO_PORT must be 1..65535, got {port}",
        )
    payload = _env_int(environ, "SAGEMAKER_MAX_PAYLOAD_IN_MB")
    _text_options(fields, environ)
    given = {name: fields[name] for name in OUTPUT_FIELDS if name in fields}
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

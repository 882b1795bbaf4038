"""How `batchjob serve` reads its variables: one per flag (the table is serve_config.py's
docstring), each parsed as its flag's type and checked by the spec as the flag is."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from batchjob.config import LONG_DOCUMENTS, SHAPE_FIELDS, parse_buckets, require
from batchjob.errors import UsageError
from batchjob.output_format import OUTPUT_ENVIRONMENT

# The flags read from BATCHJOB_<FLAG> by `_environment_fields`, and how each is parsed (as
# its flag's type is); the others' variables have their own rules below.
GENERIC_VARIABLES: dict[str, str] = {
    "model": "str",
    "task": "str",
    "backend": "str",
    "dtype": "str",
    "batch_size": "int",
    "sequence_length": "int",
    "buckets": "buckets",
    "max_batch_tokens": "int",
    "compiler_args": "str",
    "pooling": "str",
    "normalize": "bool",
    "packing": "bool",
    "max_segments": "int",
    "calibrate": "str",
    "replicas": "int",
    "cores_per_replica": "int",
    "replica_start_timeout": "float",
    "cache_dir": "str",
    "host": "str",
    "max_batch_delay_ms": "float",
    "text_field": "str",
    "drain_seconds": "float",
    "max_concurrent_requests": "int",
    "queue_timeout": "float",
    "header_timeout": "float",
    "body_timeout": "float",
}
# Every flag of `serve` → its variable (the module docstring's table).
SERVE_VARIABLES: dict[str, str] = {
    "port": "SAGEMAKER_BIND_TO_PORT",
    "long_documents": "BATCHJOB_LONG_DOCUMENTS",
    "chunk_overlap": "BATCHJOB_CHUNK_OVERLAP",
    "prompt": "BATCHJOB_PROMPT",
    "prompt_name": "BATCHJOB_PROMPT_NAME",
    **OUTPUT_ENVIRONMENT,
    **{name: f"BATCHJOB_{name.upper()}" for name in GENERIC_VARIABLES},
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {text!r}") from None


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
    if None in found:  # the toolkit uses the section only when it has both
        return None, None
    return found[0], found[1]


def fill_shapes(fields: dict[str, Any], model: str, environ: Mapping[str, str]) -> None:
    """Fill the shape fields from the model or the toolkit's variables where no shape flag
    (or BATCHJOB_ shape variable) was given: as the toolkit, the `neuron` section first."""
    if any(name in fields for name in SHAPE_FIELDS):
        return
    batch, length = neuron_shape(model)
    if batch is None and length is None:
        batch = env_int(environ, "HF_OPTIMUM_BATCH_SIZE")
        length = env_int(environ, "HF_OPTIMUM_SEQUENCE_LENGTH")
        for name, value in (
            ("HF_OPTIMUM_BATCH_SIZE", batch),
            ("HF_OPTIMUM_SEQUENCE_LENGTH", length),
        ):
            require(value is None or value >= 1, f"{name} must be ≥ 1, got {value}")
        if length is None:
            require(
                batch is None,
                "HF_OPTIMUM_BATCH_SIZE needs HF_OPTIMUM_SEQUENCE_LENGTH, the compiled length "
                "(as the inference toolkit requires)",
            )
            return
        batch = 1 if batch is None else batch  # the toolkit's default
    if batch is not None and length is not None:
        fields["batch_size"] = batch
        fields["sequence_length"] = length


def parse_variable(variable: str, kind: str, text: str) -> Any:
    """A variable's text as its flag's type: UsageError naming the variable if it isn't."""
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        noun = "an integer" if kind == "int" else "a number"
        raise UsageError(f"{variable} must be {noun}, got {text!r}") from None
    if kind == "bool":
        require(text.lower() in _TRUE + _FALSE, f"{variable} must be true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind == "buckets":
        return parse_buckets(text)
    return text


def environment_fields(flags: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """The GENERIC_VARIABLES that are set and have no flag, parsed into `fields` form; returns
    them as field → "VARIABLE=value", for the refusal that names one."""
    given: dict[str, str] = {}
    shape_flag = any(name in flags for name in SHAPE_FIELDS)
    for name in GENERIC_VARIABLES:
        variable = SERVE_VARIABLES[name]
        text = environ.get(variable, "").strip()
        if not text or name in flags or (shape_flag and name in SHAPE_FIELDS):
            continue  # a shape flag replaces every shape variable, as a prompt flag does
        given[name] = f"{variable}={text}"
    return given


def text_options_from_env(fields: dict[str, Any], environ: Mapping[str, str]) -> None:
    """--long-documents, --chunk-overlap, --prompt/--prompt-name from the environment where no
    flag gave them (a prompt flag replaces both prompt variables)."""
    mode = environ.get("BATCHJOB_LONG_DOCUMENTS", "").strip()
    if "long_documents" not in fields and mode:
        require(
            mode in LONG_DOCUMENTS,
            f"BATCHJOB_LONG_DOCUMENTS must be one of {', '.join(LONG_DOCUMENTS)}, got {mode!r}",
        )
        fields["long_documents"] = mode
    overlap = env_int(environ, "BATCHJOB_CHUNK_OVERLAP")
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

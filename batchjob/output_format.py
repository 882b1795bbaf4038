"""What goes into an output beside the task's results, and how embeddings are written: the
flags `--keep-columns`, `--embedding-type`, `--embedding-dim`, `--embedding-precision` and
`--embedding-ranges`, shared by `run`, `worker` and `serve` (there from BATCHJOB_* variables).

Everything a reader needs to interpret a file is recorded with it (`output_metadata`): in the
Parquet schema's metadata under `batchjob` and in `_manifest.json`: the labels in the order of
`scores`, the prompt and how long documents were run, and the embeddings' pooling,
normalisation, dimensions and precision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchjob.embeddings import Embedder, EmbeddingSpec, model_dim
from batchjob.errors import UsageError

if TYPE_CHECKING:  # config.py imports this module, and artifact.py imports config.py
    from batchjob.artifact import Artifact
    from batchjob.long_documents import TextOptions

# Flags (and job-file fields) → their types in a job file.
OUTPUT_FIELD_TYPES: dict[str, Any] = {
    "keep_columns": str | list[str],
    "embedding_type": str,
    "embedding_dim": int,
    "embedding_precision": str,
    "embedding_ranges": str,
}
OUTPUT_FIELDS = tuple(OUTPUT_FIELD_TYPES)
# serve: Batch Transform passes only the environment.
OUTPUT_ENVIRONMENT = {name: f"BATCHJOB_{name.upper()}" for name in OUTPUT_FIELDS}


@dataclass(frozen=True)
class OutputFormat:
    keep_columns: tuple[str, ...] = ()
    embedding: EmbeddingSpec = field(default_factory=EmbeddingSpec)


def parse_keep_columns(value: object, where: str = "--keep-columns") -> tuple[str, ...]:
    """`"a,b"` or `["a", "b"]` → ("a", "b"): each named once, none empty."""
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")] if value.strip() else []
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        names = list(value)
    else:
        raise UsageError(f"{where} must be column names separated by commas, got {value!r}")
    if any(not name for name in names):
        raise UsageError(f"{where}: an empty column name in {value!r}")
    if len(set(names)) != len(names):
        raise UsageError(f"{where}: a column is named twice in {value!r}")
    return tuple(names)


def output_format(fields: Mapping[str, Any]) -> OutputFormat:
    """The OutputFormat from flags or job-file fields (absent ones missing)."""
    keep = parse_keep_columns(fields.get("keep_columns", ""))
    options = {
        name.removeprefix("embedding_"): fields[name]
        for name in ("embedding_type", "embedding_dim", "embedding_precision", "embedding_ranges")
        if fields.get(name) is not None
    }
    return OutputFormat(keep, EmbeddingSpec(**options))


def output_format_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The BATCHJOB_* variables that are set, as fields for `output_format` (serve)."""
    fields: dict[str, Any] = {}
    for name, variable in OUTPUT_ENVIRONMENT.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        if name == "embedding_dim":
            try:
                fields[name] = int(text)
            except ValueError:
                raise UsageError(f"{variable} must be an integer, got {text!r}") from None
        else:
            fields[name] = text
    return fields


def make_embedder(artifact: Artifact, spec: EmbeddingSpec, *, calibrate: bool) -> Embedder | None:
    """The artifact's embedder as `spec` asks (None for a classifier). UsageError, before any
    work, for what can't be: --embedding-dim above the model's, a classifier given them.
    `calibrate`: int8 ranges may come from the first batch (`run`: one process)."""
    if artifact.task != "feature-extraction":
        if not spec.is_default:
            raise UsageError(
                f"--embedding-* options apply to feature-extraction, not {artifact.task}"
            )
        return None
    return Embedder(
        spec,
        model_dim=model_dim(f"{artifact.path}/config.json"),
        normalize=artifact.normalize,
        pooling=artifact.pooling,
        calibrate=calibrate,
    )


def output_metadata(
    artifact: Artifact, embedder: Embedder | None, keep: Sequence[str], text: TextOptions
) -> dict[str, Any]:
    """What a reader needs to interpret an output, with nothing else at hand. `text`: the
    options its records were run with (resolved: the prompt actually put before each text,
    and the name it came by; how long documents were run)."""
    metadata: dict[str, Any] = {
        "task": artifact.task,
        "model": artifact.source_model,
        "keep_columns": list(keep),
        **text.describe(),
    }
    if artifact.task == "text-classification":
        metadata["labels"] = list(artifact.labels)  # the order of `scores`
        metadata["function_to_apply"] = artifact.function_to_apply
    if embedder is not None:
        metadata["embedding"] = embedder.describe()
    return metadata

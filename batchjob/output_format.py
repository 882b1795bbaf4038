"""What goes into an output beside the task's results, how embeddings are written and how
classifiers label: the flags `--keep-columns`, `--embedding-type`, `--embedding-dim`,
`--embedding-precision`, `--embedding-ranges`, `--multi-label`, `--threshold` and
`--aggregation` (token-classification: how tokens become entities), shared by
`run`, `worker` and `serve` (there from BATCHJOB_* variables, a flag winning). `make_head`
turns them into the run's head (`tasks.py`), beside the artifact.

Everything a reader needs to interpret a file is recorded with it (`output_metadata`): in the
Parquet schema's metadata under `batchjob` and in `_manifest.json`: the labels in the order of
`scores`, the prompt and how long documents were run, and the embeddings' pooling,
normalisation, dimensions and precision; whether labels are multi-label and at what threshold.

Multi-label is a run-time choice, as the pipeline's `function_to_apply="sigmoid"`: the compiled
graphs give logits, so `--multi-label` on a model compiled for softmax applies sigmoid to them
(the metadata's `function_to_apply` says which). A model whose config says
`problem_type: multi_label_classification` is multi-label without the flag.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchjob.embeddings import Embedder, EmbeddingSpec, model_dim
from batchjob.entities import AGGREGATIONS, DEFAULT_AGGREGATION
from batchjob.errors import UsageError
from batchjob.pair_tasks import PAIR_TASKS, PairOptions, make_pair_head, pair_options
from batchjob.tasks import Classification, Embeddings, Head
from batchjob.token_classification import TokenClassification, token_head

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
    "multi_label": bool,
    "threshold": float,
    # pair_tasks.py: zero-shot-classification, text-ranking
    "candidate_labels": str | list[str],
    "candidate_labels_field": str,
    "hypothesis_template": str,
    "group_field": str,
    "aggregation": str,
}
OUTPUT_FIELDS = tuple(OUTPUT_FIELD_TYPES)
# serve: Batch Transform passes only the environment.
OUTPUT_ENVIRONMENT = {name: f"BATCHJOB_{name.upper()}" for name in OUTPUT_FIELDS}
DEFAULT_THRESHOLD = 0.5  # the score a label needs to be in `labels`
MULTI_LABEL_PROBLEM = "multi_label_classification"  # a config's problem_type
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class OutputFormat:
    keep_columns: tuple[str, ...] = ()
    embedding: EmbeddingSpec = field(default_factory=EmbeddingSpec)
    multi_label: bool = False  # False: as the model's config says
    threshold: float | None = None  # None: DEFAULT_THRESHOLD; only with multi-label
    pairs: PairOptions = field(default_factory=PairOptions)  # --task zero-shot, text-ranking
    aggregation: str | None = None  # token-classification; None: DEFAULT_AGGREGATION

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UsageError(f"--threshold must be in [0, 1], got {self.threshold:g}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise UsageError(
                f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"
            )


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
    threshold = fields.get("threshold")
    aggregation = fields.get("aggregation")
    return OutputFormat(
        keep,
        EmbeddingSpec(**options),
        multi_label=bool(fields.get("multi_label", False)),
        threshold=None if threshold is None else float(threshold),
        pairs=pair_options(fields),
        aggregation=None if aggregation is None else str(aggregation),
    )


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
        elif name == "threshold":
            try:
                fields[name] = float(text)
            except ValueError:
                raise UsageError(f"{variable} must be a number, got {text!r}") from None
        elif name == "multi_label":
            if text.lower() not in _TRUE + _FALSE:
                raise UsageError(f"{variable} must be true or false, got {text!r}")
            fields[name] = text.lower() in _TRUE
        else:
            fields[name] = text
    return fields


def config_multi_label(artifact: Artifact) -> bool:
    """Whether the model's config says `problem_type: multi_label_classification`."""
    try:
        with open(os.path.join(artifact.path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):  # an artifact without one: the flag decides
        return False
    return isinstance(config, dict) and config.get("problem_type") == MULTI_LABEL_PROBLEM


def make_head(artifact: Artifact, fmt: OutputFormat, *, calibrate: bool) -> Head:
    """This run's head for the artifact, as `fmt` asks. UsageError, before any work, for what
    can't be: embedding options or --embedding-dim above the model's for a classifier,
    --multi-label for embeddings, --threshold without multi-label. `calibrate`: int8 ranges
    may come from the first batch (`run`: one process)."""
    if fmt.pairs.task is not None:
        if not fmt.embedding.is_default or fmt.threshold is not None:
            raise UsageError(f"--embedding-* and --threshold don't apply to {fmt.pairs.task}")
        return make_pair_head(artifact, fmt.pairs, fmt.multi_label)
    if artifact.task == TokenClassification.task:
        return _token_head(artifact, fmt)
    if fmt.aggregation is not None:
        raise UsageError(f"--aggregation applies to token-classification, not {artifact.task}")
    if artifact.task == "text-classification":
        if not fmt.embedding.is_default:
            raise UsageError(
                f"--embedding-* options apply to feature-extraction, not {artifact.task}"
            )
        return _classification(artifact, fmt)
    if fmt.multi_label or fmt.threshold is not None:
        raise UsageError(
            f"--multi-label and --threshold apply to text-classification, not {artifact.task}"
        )
    embedder = Embedder(
        fmt.embedding,
        model_dim=model_dim(f"{artifact.path}/config.json"),
        normalize=artifact.normalize,
        pooling=artifact.pooling,
        calibrate=calibrate,
    )
    return Embeddings(embedder, artifact.normalize)


def _token_head(artifact: Artifact, fmt: OutputFormat) -> TokenClassification:
    if not fmt.embedding.is_default:
        raise UsageError(f"--embedding-* options apply to feature-extraction, not {artifact.task}")
    if fmt.multi_label or fmt.threshold is not None:
        raise UsageError(
            f"--multi-label and --threshold apply to text-classification, not {artifact.task}"
        )
    return token_head(artifact, fmt.aggregation or DEFAULT_AGGREGATION)


def _classification(artifact: Artifact, fmt: OutputFormat) -> Classification:
    """Multi-label (by `--multi-label` or the model's config) is sigmoid scores and `labels`."""
    if not (fmt.multi_label or config_multi_label(artifact)):
        if fmt.threshold is not None:
            raise UsageError(
                "--threshold applies to multi-label classification: add --multi-label "
                "(the model's config is not problem_type: multi_label_classification)"
            )
        return Classification(artifact.labels, artifact.function_to_apply)
    threshold = DEFAULT_THRESHOLD if fmt.threshold is None else fmt.threshold
    return Classification(artifact.labels, "sigmoid", multi_label=True, threshold=threshold)


def format_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How `now` (an output_metadata) differs from an earlier run's, field by field (a
    field that run did not record, from an older batchjob, is not compared)."""
    old, new = _fields(before), _fields(json.loads(json.dumps(now, default=str)))
    return [
        f"{k} {_short(old[k])} then, {_short(v)} now" for k, v in new.items() if old.get(k, v) != v
    ]


def _fields(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted names (embedding.precision), provenance left out."""
    if not isinstance(value, Mapping):
        return {prefix.removesuffix("."): value}
    found: dict[str, Any] = {}
    for k, v in value.items():
        if k != "ranges_from":  # where int8 ranges came from, not what they are
            found |= _fields(v, f"{prefix}{k}.")
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def output_metadata(
    artifact: Artifact, head: Head, keep: Sequence[str], text: TextOptions
) -> dict[str, Any]:
    """What a reader needs to interpret an output, with nothing else at hand. `text`: the
    options its records were run with (resolved: the prompt actually put before each text,
    and the name it came by; how long documents were run)."""
    return {
        "task": head.task if head.task in PAIR_TASKS else artifact.task,
        "model": artifact.source_model,
        "keep_columns": list(keep),
        **text.describe(),
        **head.describe(),
    }

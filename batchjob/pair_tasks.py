"""Tasks over text pairs, run by a text-classification artifact with a head of their own:
`zero-shot-classification` (an NLI model) and `text-ranking` (a cross-encoder).

Both are run-time choices (`--task`), as multi-label is: the graphs of a sequence classifier
give logits whatever the task, so the artifact is compiled, and recorded, as
text-classification (`run_task_of`), and the head makes the task's columns of them.

- zero-shot-classification: the transformers pipeline's. Each record is run as one
  (premise, hypothesis) pair per candidate label (`zero_shot.py`: those pairs share the
  packed batches of every record); `labels` are the candidates sorted by score, `scores`
  theirs. Single-label: softmax of the entailment logits over the candidates; multi-label
  (or one candidate): each candidate's softmax of (contradiction, entailment). The
  entailment id is the first label of the model's label2id starting with "entail"
  (case-insensitive), contradiction id 0 (or the last when entailment is 0), as the pipeline.
- text-ranking: sentence-transformers' `CrossEncoder.predict` on (query, passage) pairs, a
  one-logit model's `score` after the CrossEncoder's activation (its saved `activation_fn`,
  else sigmoid); `--group-field` adds `rank` (1 = best) within each group of a shard.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import numpy as np
import pyarrow as pa

from batchjob.errors import InputError, UsageError

if TYPE_CHECKING:  # artifact.py imports config.py, which imports output_format.py and this
    from batchjob.artifact import Artifact
    from batchjob.records import Fields as Fields_

Fields: TypeAlias = "list[pa.Field[pa.DataType]]"

ZERO_SHOT = "zero-shot-classification"
TEXT_RANKING = "text-ranking"
# The run-time tasks → the task their artifact is compiled for.
PAIR_TASKS = {ZERO_SHOT: "text-classification", TEXT_RANKING: "text-classification"}
DEFAULT_TEMPLATE = "This example is {}."  # the pipeline's hypothesis_template


def run_task_of(task: str | None) -> str | None:
    """The task an artifact is compiled for, to run `task`."""
    return PAIR_TASKS.get(task, task) if task is not None else None


def parse_candidate_labels(value: object, where: str) -> tuple[str, ...]:
    """`"a, b"` (the pipeline splits at commas and strips) or `["a", "b"]` → ("a", "b")."""
    if isinstance(value, str):
        labels = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        labels = list(value)
    else:
        raise UsageError(f"{where} must be labels separated by commas, got {value!r}")
    if not labels:
        raise UsageError(f"{where} must name at least one label, got {value!r}")
    return tuple(labels)


def check_template(template: str, where: str = "--hypothesis-template") -> None:
    """The pipeline's test: the template must change when a label is put into it."""
    try:
        formatted = template.format("label")
    except (IndexError, KeyError, ValueError) as e:
        raise UsageError(f"{where} {template!r} can't be formatted with a label: {e}") from None
    if formatted == template:
        raise UsageError(f"{where} {template!r} has no {{}} where the label should go")


@dataclass(frozen=True)
class PairOptions:
    """The run-time task and its flags: --candidate-labels, --candidate-labels-field,
    --hypothesis-template (zero-shot), --group-field (text-ranking)."""

    task: str | None = None  # ZERO_SHOT, TEXT_RANKING, or None: the artifact's task
    candidate_labels: tuple[str, ...] = ()
    candidate_labels_field: str | None = None
    hypothesis_template: str = DEFAULT_TEMPLATE
    group_field: str | None = None

    def __post_init__(self) -> None:
        zero_shot = self.task == ZERO_SHOT
        if not zero_shot and (
            self.candidate_labels
            or self.candidate_labels_field
            or self.hypothesis_template != DEFAULT_TEMPLATE
        ):
            raise UsageError(
                "--candidate-labels, --candidate-labels-field and --hypothesis-template apply "
                f"to --task {ZERO_SHOT}"
            )
        if self.group_field is not None and self.task != TEXT_RANKING:
            raise UsageError(f"--group-field applies to --task {TEXT_RANKING}")
        if self.candidate_labels and self.candidate_labels_field:
            raise UsageError("--candidate-labels and --candidate-labels-field exclude each other")
        if zero_shot:
            check_template(self.hypothesis_template)
        for flag, name in (
            ("--candidate-labels-field", self.candidate_labels_field),
            ("--group-field", self.group_field),
        ):
            if name is not None and not name:
                raise UsageError(f"{flag} must not be empty")

    def check_long_documents(self, long_documents: str) -> None:
        if self.task is not None and long_documents != "truncate":
            raise UsageError(
                f"--task {self.task} truncates long texts (as the pipeline): "
                f"--long-documents {long_documents} is not supported with it"
            )

    def check_records(self, long_documents: str, text_pair_field: str | None) -> None:
        """What `run` and `worker` need of records for the task (serve's come per request)."""
        if self.task is None:
            return
        self.check_long_documents(long_documents)
        if self.task == ZERO_SHOT:
            if text_pair_field is not None:
                raise UsageError(
                    f"--task {ZERO_SHOT} pairs each text with its hypotheses: "
                    "--text-pair-field can't be used with it"
                )
            if not (self.candidate_labels or self.candidate_labels_field):
                raise UsageError(
                    f"--task {ZERO_SHOT} needs --candidate-labels a,b,c or "
                    "--candidate-labels-field FIELD"
                )
        elif text_pair_field is None:
            raise UsageError(
                f"--task {TEXT_RANKING} scores (query, passage) pairs: give --text-field QUERY "
                "and --text-pair-field PASSAGE"
            )


def pair_options(fields: Mapping[str, Any]) -> PairOptions:
    """The PairOptions from flags, job-file fields or BATCHJOB_* variables (absent: missing)."""
    task = fields.get("task")
    labels = fields.get("candidate_labels")
    template = fields.get("hypothesis_template")
    return PairOptions(
        task=task if task in PAIR_TASKS else None,
        candidate_labels=()
        if labels is None
        else parse_candidate_labels(labels, "--candidate-labels"),
        candidate_labels_field=fields.get("candidate_labels_field"),
        hypothesis_template=DEFAULT_TEMPLATE if template is None else str(template),
        group_field=fields.get("group_field"),
    )


# -- zero-shot-classification -----------------------------------------------------------------


def nli_ids(labels: Sequence[str], model: str) -> tuple[int, int]:
    """(entailment id, contradiction id) as the pipeline finds them in label2id (whose order
    is id2label's: the artifact's labels). UsageError when no label starts with "entail"."""
    for i, label in enumerate(labels):
        if label.lower().startswith("entail"):
            return i, -1 if i == 0 else 0
    raise UsageError(
        f"--task {ZERO_SHOT} needs an NLI model with an entailment label: {model} has labels "
        f"{', '.join(labels)}"
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    # As the pipeline computes it (no max shift): the same float32 values, the same order.
    exp = np.exp(logits)
    probs: np.ndarray = exp / exp.sum(-1, keepdims=True)
    return probs


@dataclass(frozen=True)
class ZeroShot:
    """One record's logits per candidate → `labels` (by score, best first) and `scores`."""

    entailment: int
    contradiction: int
    multi_label: bool = False
    candidate_labels: tuple[str, ...] = ()  # (): each record's own (--candidate-labels-field)
    hypothesis_template: str = DEFAULT_TEMPLATE
    labels_field: str | None = None
    task: ClassVar[str] = ZERO_SHOT
    embedder: ClassVar[None] = None
    expands: ClassVar[bool] = True  # a record runs as one row per candidate label

    def fields(self) -> Fields:
        return [
            pa.field("labels", pa.list_(pa.string())),
            pa.field("scores", pa.list_(pa.float32())),
        ]

    def hypotheses(self, candidates: Sequence[str]) -> list[str]:
        return [self.hypothesis_template.format(label) for label in candidates]

    def values(self, logits: np.ndarray, candidates: Sequence[str]) -> dict[str, Any]:
        """The pipeline's postprocess for one record: logits (candidates, NLI labels)."""
        outputs = logits.astype(np.float32)[None]
        if self.multi_label or len(candidates) == 1:
            pair = outputs[..., [self.contradiction, self.entailment]]
            scores = _softmax(pair)[..., 1]
        else:
            scores = _softmax(outputs[..., self.entailment])
        top = list(reversed(scores[0].argsort()))
        return {"labels": [candidates[i] for i in top], "scores": scores[0, top]}

    def columns(self, outputs: np.ndarray) -> dict[str, list[Any]]:
        raise TypeError("zero-shot rows are put together per record (zero_shot.py)")

    def combine(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        raise TypeError("zero-shot records are not split into windows")

    def describe(self) -> dict[str, Any]:
        return {
            "candidate_labels": list(self.candidate_labels) or None,
            "candidate_labels_field": self.labels_field,
            "hypothesis_template": self.hypothesis_template,
            "multi_label": self.multi_label,
            "entailment_id": self.entailment,
            "contradiction_id": self.contradiction,
        }


# -- text-ranking -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranking:
    """A cross-encoder's one logit → `score` (the CrossEncoder's activation); with a group
    field, `rank` (filled in per shard: `assign_ranks`)."""

    activation: str = "sigmoid"  # sigmoid or none
    group_field: str | None = None
    task: ClassVar[str] = TEXT_RANKING
    embedder: ClassVar[None] = None

    def fields(self) -> Fields:
        fields: Fields = [pa.field("score", pa.float32())]
        if self.group_field is not None:
            fields.append(pa.field("rank", pa.int32()))
        return fields

    def columns(self, outputs: np.ndarray) -> dict[str, list[Any]]:
        logits = outputs.astype(np.float32)[:, 0]
        scores = 1.0 / (1.0 + np.exp(-logits)) if self.activation == "sigmoid" else logits
        columns: dict[str, list[Any]] = {"score": list(scores.astype(np.float32))}
        if self.group_field is not None:
            columns["rank"] = [None] * len(scores)
        return columns

    def combine(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        raise TypeError("text-ranking pairs are not split into windows")

    def describe(self) -> dict[str, Any]:
        return {"activation_fn": self.activation, "group_field": self.group_field}


def assign_ranks(values: Sequence[dict[str, Any] | None], groups: Sequence[str | None]) -> None:
    """`rank` within each group (1: the highest score); ties keep input order. Rows without
    values (errors) or without a group get no rank. In place."""
    members: dict[str, list[int]] = {}
    for i, (row, group) in enumerate(zip(values, groups, strict=True)):
        if row is not None and group is not None:
            members.setdefault(group, []).append(i)
    for indices in members.values():
        order = sorted(indices, key=lambda i: -float(values[i]["score"]))  # type: ignore[index]
        for rank, i in enumerate(order, 1):
            values[i]["rank"] = rank  # type: ignore[index]


def make_pair_head(
    artifact: Artifact, options: PairOptions, multi_label: bool
) -> ZeroShot | Ranking:
    """The head for `options.task` over a text-classification artifact."""
    if artifact.task != "text-classification":
        raise UsageError(
            f"--task {options.task} runs a sequence-classification model; {artifact.path} was "
            f"compiled for {artifact.task}"
        )
    if options.task == ZERO_SHOT:
        entailment, contradiction = nli_ids(artifact.labels, artifact.source_model)
        return ZeroShot(
            entailment,
            contradiction,
            multi_label,
            options.candidate_labels,
            options.hypothesis_template,
            options.candidate_labels_field,
        )
    if multi_label:
        raise UsageError(f"--multi-label applies to text-classification and {ZERO_SHOT}")
    if len(artifact.labels) != 1:
        raise UsageError(
            f"--task {TEXT_RANKING} needs a cross-encoder with one output (num_labels=1): "
            f"{artifact.source_model} has {len(artifact.labels)} labels"
        )
    from batchjob.cross_encoders import cross_encoder_activation

    return Ranking(cross_encoder_activation(artifact), options.group_field)


def candidate_labels_of(values: Mapping[str, object], name: str) -> tuple[str, ...]:
    """A record's candidate labels (zero-shot): a list of strings (JSON, Parquet), or in a CSV
    cell a JSON array or labels separated by commas. InputError names the field."""
    if name not in values:
        raise InputError(f"missing field {name!r} (the candidate labels)")
    value = values[name]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                raise InputError(
                    f"field {name!r}: not a JSON array of labels: {text[:80]!r}"
                ) from None
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"field {name!r} must be a list of strings (the candidate labels)")
    if not value:
        raise InputError(f"field {name!r} holds no candidate labels")
    return tuple(value)


def group_text(value: object) -> str | None:
    """A group value as text: strings as they are, other JSON values as their JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def pair_fields(fields: Fields_, options: PairOptions) -> Fields_:
    """`fields` with the records' fields the task reads (candidate labels, group)."""
    return dataclasses.replace(
        fields, candidate_labels=options.candidate_labels_field, group=options.group_field
    )

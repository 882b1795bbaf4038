"""`batchjob serve` from the environment alone (Batch Transform passes nothing else): every
flag has its variable, listed in serve_config.py's one table; a variable sets exactly what
its flag sets, a flag wins, a bad value is refused on one line naming the variable; and the
toolkit's HF_OPTIMUM_* shape as the toolkit reads it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

import batchjob.serve_config
from batchjob.batching import Shape
from batchjob.cli import build_parser, main
from batchjob.errors import UsageError
from batchjob.serve_config import serve_spec
from batchjob.serve_environment import GENERIC_VARIABLES, SERVE_VARIABLES


def serve_actions() -> list[argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return [a for a in serve._actions if a.dest != "help"]


def test_every_serve_flag_has_its_variable_in_the_one_table() -> None:
    actions = serve_actions()
    assert {a.dest for a in actions} == set(SERVE_VARIABLES)
    table = [line for line in (batchjob.serve_config.__doc__ or "").splitlines() if "|" in line]
    for action in actions:
        variable = SERVE_VARIABLES[action.dest]
        rows = [
            row
            for row in table
            if variable in row and any(f"{flag} " in row or f"{flag}," in row
                                       for flag in action.option_strings)
        ]  # fmt: skip
        assert rows, f"{action.option_strings} and {variable} share no row of the table"


# (variable, its text) ↔ the flags that set the same: each pair must give the same spec.
EQUIVALENTS: list[tuple[str, str, list[str]]] = [
    ("BATCHJOB_DTYPE", "bf16", ["--dtype", "bf16"]),
    ("BATCHJOB_BATCH_SIZE", "4", ["--batch-size", "4"]),
    ("BATCHJOB_SEQUENCE_LENGTH", "64", ["--sequence-length", "64"]),
    ("BATCHJOB_BUCKETS", "16,32", ["--buckets", "16,32"]),
    ("BATCHJOB_MAX_BATCH_TOKENS", "512", ["--max-batch-tokens", "512"]),
    ("BATCHJOB_COMPILER_ARGS", "--auto-cast none", ["--compiler-args", "--auto-cast none"]),
    ("BATCHJOB_POOLING", "cls", ["--pooling", "cls"]),
    ("BATCHJOB_NORMALIZE", "false", ["--no-normalize"]),
    ("BATCHJOB_PACKING", "true", ["--packing"]),
    ("BATCHJOB_PACKING", "off", ["--no-packing"]),
    ("BATCHJOB_MAX_SEGMENTS", "4", ["--max-segments", "4"]),
    ("BATCHJOB_CALIBRATE", "sample.jsonl", ["--calibrate", "sample.jsonl"]),
    ("BATCHJOB_REPLICAS", "2", ["--replicas", "2"]),
    ("BATCHJOB_CORES_PER_REPLICA", "2", ["--cores-per-replica", "2"]),
    ("BATCHJOB_REPLICA_START_TIMEOUT", "60", ["--replica-start-timeout", "60"]),
    ("BATCHJOB_CACHE_DIR", "/var/cache/bj", ["--cache-dir", "/var/cache/bj"]),
    ("BATCHJOB_HOST", "127.0.0.1", ["--host", "127.0.0.1"]),
    ("BATCHJOB_MAX_BATCH_DELAY_MS", "7.5", ["--max-batch-delay-ms", "7.5"]),
    ("BATCHJOB_TEXT_FIELD", "body", ["--text-field", "body"]),
    ("BATCHJOB_DRAIN_SECONDS", "10", ["--drain-seconds", "10"]),
    ("BATCHJOB_MAX_CONCURRENT_REQUESTS", "3", ["--max-concurrent-requests", "3"]),
    ("BATCHJOB_QUEUE_TIMEOUT", "20", ["--queue-timeout", "20"]),
    ("BATCHJOB_HEADER_TIMEOUT", "5", ["--header-timeout", "5"]),
    ("BATCHJOB_BODY_TIMEOUT", "9", ["--body-timeout", "9"]),
    ("BATCHJOB_TASK", "feature-extraction", ["--task", "feature-extraction"]),
    ("BATCHJOB_MODEL", "org/model", ["--model", "org/model"]),
    ("BATCHJOB_BACKEND", "neuronx", ["--backend", "neuronx"]),
    ("SAGEMAKER_BIND_TO_PORT", "9000", ["--port", "9000"]),
    ("BATCHJOB_LONG_DOCUMENTS", "mean", ["--long-documents", "mean"]),
    ("BATCHJOB_CHUNK_OVERLAP", "8", ["--chunk-overlap", "8"]),
    ("BATCHJOB_PROMPT", "query: ", ["--prompt", "query: "]),
    ("BATCHJOB_PROMPT_NAME", "query", ["--prompt-name", "query"]),
    ("BATCHJOB_KEEP_COLUMNS", "url,lang", ["--keep-columns", "url,lang"]),
    ("BATCHJOB_EMBEDDING_TYPE", "list", ["--embedding-type", "list"]),
    ("BATCHJOB_EMBEDDING_DIM", "16", ["--embedding-dim", "16"]),
    ("BATCHJOB_EMBEDDING_PRECISION", "int8", ["--embedding-precision", "int8"]),
    ("BATCHJOB_EMBEDDING_RANGES", "ranges.json", ["--embedding-ranges", "ranges.json"]),
    ("BATCHJOB_MULTI_LABEL", "true", ["--multi-label"]),
    ("BATCHJOB_THRESHOLD", "0.3", ["--multi-label", "--threshold", "0.3"]),
    ("BATCHJOB_CANDIDATE_LABELS", "a,b", ["--candidate-labels", "a,b"]),
    ("BATCHJOB_CANDIDATE_LABELS_FIELD", "labels", ["--candidate-labels-field", "labels"]),
    ("BATCHJOB_HYPOTHESIS_TEMPLATE", "It is {}.", ["--hypothesis-template", "It is {}."]),
    ("BATCHJOB_GROUP_FIELD", "qid", ["--group-field", "qid"]),
    ("BATCHJOB_AGGREGATION", "first", ["--aggregation", "first"]),
]
# The task each pair option belongs to (pair_tasks.py).
PAIR_TASKS = {
    "BATCHJOB_CANDIDATE_LABELS": "zero-shot-classification",
    "BATCHJOB_CANDIDATE_LABELS_FIELD": "zero-shot-classification",
    "BATCHJOB_HYPOTHESIS_TEMPLATE": "zero-shot-classification",
    "BATCHJOB_GROUP_FIELD": "text-ranking",
    "BATCHJOB_AGGREGATION": "token-classification",
}


def flags(argv: list[str]) -> dict[str, Any]:
    return vars(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize(
    ("variable", "text", "argv"), EQUIVALENTS, ids=[f"{v}={t}" for v, t, _ in EQUIVALENTS]
)
def test_a_variable_sets_what_its_flag_sets(
    variable: str, text: str, argv: list[str], tmp_path: Path
) -> None:
    base = ["--model", str(tmp_path)]
    if variable == "BATCHJOB_COMPILER_ARGS":
        base += ["--backend", "neuronx"]  # compiler arguments are the Neuron compilers'
    if variable == "BATCHJOB_EMBEDDING_RANGES":
        base += ["--embedding-precision", "int8"]  # ranges are int8's
    if variable == "BATCHJOB_THRESHOLD":
        base += ["--multi-label"]
        argv = argv[1:]
    if variable in PAIR_TASKS:
        base += ["--task", PAIR_TASKS[variable]]
    if variable == "BATCHJOB_MODEL":
        base = []  # (no /opt/ml/model here: without it, no model at all)
    from_environment = serve_spec(flags(base), {variable: text})
    from_flags = serve_spec(flags(base + argv), {})
    assert from_environment == from_flags
    if base:
        assert from_environment != serve_spec(flags(base), {}), f"{variable} changed nothing"


def test_the_equivalence_list_covers_every_variable() -> None:
    assert {v for v, _, _ in EQUIVALENTS} == set(SERVE_VARIABLES.values())
    assert set(GENERIC_VARIABLES) <= set(SERVE_VARIABLES)


def test_flags_win_and_a_shape_flag_replaces_every_shape_variable(tmp_path: Path) -> None:
    env = {"BATCHJOB_REPLICAS": "2", "BATCHJOB_BUCKETS": "16,32", "BATCHJOB_MODEL": "elsewhere"}
    spec = serve_spec(flags(["--model", str(tmp_path), "--replicas", "3"]), env)
    assert (spec.replicas, spec.compile.model) == (3, str(tmp_path))
    assert [s.seq_len for s in spec.compile.shapes] == [16, 32]
    spec = serve_spec(flags(["--model", str(tmp_path), "--batch-size", "4"]), env)
    assert spec.compile.shapes == (Shape(128, 4),)
    assert serve_spec({}, env).compile.model == "elsewhere"  # before /opt/ml/model


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BATCHJOB_REPLICAS": "0"}, "BATCHJOB_REPLICAS=0: --replicas must be ≥ 1, got 0"),
        ({"BATCHJOB_REPLICAS": "two"}, "BATCHJOB_REPLICAS must be an integer, got 'two'"),
        ({"BATCHJOB_DTYPE": "fp8"}, "BATCHJOB_DTYPE=fp8: --dtype must be one of auto, fp32"),
        ({"BATCHJOB_POOLING": "sum"}, "BATCHJOB_POOLING=sum: --pooling must be one of auto"),
        ({"BATCHJOB_BUCKETS": "32,16"}, "BATCHJOB_BUCKETS=32,16: --buckets must be strictly"),
        ({"BATCHJOB_NORMALIZE": "maybe"}, "BATCHJOB_NORMALIZE must be true or false, got 'maybe'"),
        ({"BATCHJOB_QUEUE_TIMEOUT": "-1"}, "BATCHJOB_QUEUE_TIMEOUT=-1: --queue-timeout must be"),
        ({"BATCHJOB_BODY_TIMEOUT": "soon"}, "BATCHJOB_BODY_TIMEOUT must be a number, got 'soon'"),
        (
            {"BATCHJOB_SEQUENCE_LENGTH": "64", "BATCHJOB_MAX_BATCH_TOKENS": "512"},
            "BATCHJOB_MAX_BATCH_TOKENS=512: --max-batch-tokens goes with --buckets",
        ),
        ({"HF_OPTIMUM_BATCH_SIZE": "4"}, "HF_OPTIMUM_BATCH_SIZE needs HF_OPTIMUM_SEQUENCE_LENGTH"),
        ({"BATCHJOB_TASK": "ner"}, "BATCHJOB_TASK=ner: --task must be one of text-classification"),
    ],
)
def test_a_bad_variable_exits_2_on_one_line_naming_it(
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("batchjob serve: error: ")
    assert message in err, err


def test_the_toolkit_shape_variables_mean_what_they_mean_there(tmp_path: Path) -> None:
    model = {"model": str(tmp_path)}
    length_only = {"HF_OPTIMUM_SEQUENCE_LENGTH": "64"}
    assert serve_spec(model, length_only).compile.shapes == (Shape(64, 1),)  # batch default 1
    both = length_only | {"HF_OPTIMUM_BATCH_SIZE": "8"}
    assert serve_spec(model, both).compile.shapes == (Shape(64, 8),)
    assert serve_spec(model, {}).compile.shapes == ()  # batchjob's own: the model's buckets
    # The neuron section is used only whole, as in the toolkit; then it wins.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"neuron": {"static_sequence_length": 48}}))
    assert serve_spec(model, both).compile.shapes == (Shape(64, 8),)
    config.write_text(
        json.dumps({"neuron": {"static_batch_size": 2, "static_sequence_length": 48}})
    )
    assert serve_spec(model, both).compile.shapes == (Shape(48, 2),)
    # batchjob's own shape variables are flags: they win over both.
    assert serve_spec(model, both | {"BATCHJOB_SEQUENCE_LENGTH": "32"}).compile.shapes == (
        Shape(32, 6),
    )
    with pytest.raises(UsageError, match="HF_OPTIMUM_SEQUENCE_LENGTH must be ≥ 1, got 0"):
        serve_spec({"model": str(tmp_path / "none")}, {"HF_OPTIMUM_SEQUENCE_LENGTH": "0"})

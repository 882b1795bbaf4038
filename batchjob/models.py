"""Hugging Face models as traceable graphs: fixed-shape tensors in, task outputs out.

The graph takes `(input_ids, attention_mask, token_type_ids)` and builds the additive
4-D attention mask itself, so no data-dependent mask logic of the model is frozen into the
trace. Text classification returns the logits; feature extraction returns the pooled
(and by default L2-normalised) sentence embedding, as sentence-transformers does.
"""

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
    try:
        return fn(model, **kwargs)
    except (OSError, ValueError, KeyError) as e:
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
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    # sdpa takes the additive float mask as given; the graph is traced once per shape.
    hf_model = _load(auto.from_pretrained, model, dtype=dtype, attn_implementation="sdpa")
    hf_model.eval()
    mode = read_pooling(model, pooling) if task == "feature-extraction" else None
    return LoadedModel(task, hf_model, tokenizer, config, mode, normalize)


class EncoderGraph(nn.Module):
    """What gets traced: fixed-shape int tensors in, float32 task outputs out."""

    def __init__(self, loaded: LoadedModel, uses_token_types: bool) -> None:
        super().__init__()
        self.model = loaded.model
        self.task = loaded.task
        self.pooling = loaded.pooling
        self.normalize = loaded.normalize
        self.uses_token_types = uses_token_types
        self.dtype = next(loaded.model.parameters()).dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        keep = attention_mask[:, None, None, :].to(self.dtype)
        additive = (1.0 - keep) * torch.finfo(self.dtype).min
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": additive}
        if self.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        if self.task == "text-classification":
            logits: torch.Tensor = out.logits.float()
            return logits
        return pool(out.last_hidden_state.float(), attention_mask, self.pooling, self.normalize)


def pool(
    hidden: torch.Tensor, mask: torch.Tensor, mode: str | None, normalize: bool
) -> torch.Tensor:
    """sentence-transformers' pooling over the real tokens of each row."""
    real = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        pooled = hidden.masked_fill(real == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    else:
        pooled = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1e-9)
    if normalize:
        pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
    result: torch.Tensor = pooled
    return result

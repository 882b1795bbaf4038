"""How the packed graphs compute attention: the model's own SDPA, or two batched matmuls.

For the families that compute attention through transformers' attention functions (all the
packing families but MPNet, whose own attention is plain matmuls already), attention can be
computed as two batched matmuls (`ATTENTION_BMM`) instead of the model's SDPA: in a packed
bf16 bert-base graph on one CPU thread that halves attention's time (SDPA's flash kernel for
CPU is slow in bf16 at these lengths) and `batchjob run` is ~6% faster end to end
(BENCHMARKS.md, "The graph").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTENTION_SDPA = "sdpa"  # the model's own attention implementation, as loaded
ATTENTION_BMM = "bmm"  # bmm_attention below
ATTENTIONS = (ATTENTION_SDPA, ATTENTION_BMM)
_BMM_NAME = "batchjob_bmm"


def takes_attention_function(model: Any) -> bool:
    """Whether `model` computes attention through transformers' AttentionInterface, so that
    `use_attention` can swap it (MPNet has its own matmuls, which bmm_attention mirrors)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def bmm_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Softmax(Q Kᵀ · scale + mask) V as baddbmm, softmax, bmm over (batch × heads).

    The additive mask and the scale ride in the first matmul; the output is laid out as the
    models' attention functions return it, (B, S, heads, D). Eval only: no dropout.
    """
    b, h, s, d = query.shape
    n = key.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b * h, s, d)
    k = key.reshape(b * h, n, d).transpose(1, 2)
    if attention_mask is None:
        scores = torch.bmm(q, k) * scale
    else:
        # A view when the mask comes expanded over the heads already (EncoderGraph does that
        # once for every layer), else a copy per layer.
        bias = attention_mask[..., :n].expand(b, h, s, n).reshape(b * h, s, n)
        scores = torch.baddbmm(bias.to(q.dtype), q, k, alpha=scale)
    out = torch.bmm(scores.softmax(dim=-1), value.reshape(b * h, n, d))
    return out.view(b, h, s, d).transpose(1, 2).contiguous(), None


def use_attention(model: Any, attention: str) -> None:
    """Make `model` (loaded for tracing) compute attention the `attention` way."""
    if attention == ATTENTION_SDPA:
        return
    if attention != ATTENTION_BMM:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if not takes_attention_function(model):
        # transformers would only warn and keep the model's own attention.
        raise ValueError(f"attention {attention!r}: {type(model).__name__} has its own attention")
    from transformers import AttentionInterface

    AttentionInterface.register(_BMM_NAME, bmm_attention)
    model.set_attn_implementation(_BMM_NAME)

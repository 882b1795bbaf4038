"""What gets traced: fixed-shape int tensors in, float32 task outputs out.

Two graph kinds, one per batching strategy:

- buckets: `(input_ids, attention_mask, token_type_ids)`, one record per row → `(B, ...)`;
- packing: `(input_ids, position_ids, token_type_ids, segment_ids, segment_index)`, up to K
  records per row, each attending only to itself → `(B, K, ...)`, one output per slot.

Token classification answers per token either way, `(B, S, labels)`: the model's own head
applies to every token, so a packed row needs nothing of it per segment.

Both build the attention mask inside the graph from int inputs, so no data-dependent mask
logic of the model is frozen into the trace. The packed graph applies the model's own head
to each segment: for classification the first token of the segment through the family's
pooler and classifier (or its mean, where the model pools by mean); for embeddings the
model's pooling over the segment's real tokens, then its Dense and Normalize modules.

How attention is computed is attention.py's; classification and CLS pooling compute the last
layer for each segment's first token only (first_tokens.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchjob import first_tokens
from batchjob.attention import ATTENTION_BMM, ATTENTION_SDPA, use_attention
from batchjob.models import LoadedModel

# Families whose encoder honours a 4-D mask and explicit position ids, and whose heads are
# mirrored below; packed == unpacked is proven for each in tests/test_packing.py. MPNet's
# relative position bias comes from places in the row, not from the position ids: within a
# segment the distances j - i are those of the document alone, and the mask hides the rest.
PACKING_FAMILIES = (
    "bert",
    "distilbert",
    "roberta",
    "xlm-roberta",
    "electra",
    "modernbert",
    "mpnet",
)
_ROBERTA_POSITIONS = ("roberta", "xlm-roberta", "camembert")
# MPNet's embeddings fix padding_idx at 1, whatever the config's pad_token_id says.
_MPNET_PADDING_IDX = 1


def supports_packing(config: Any) -> bool:
    return str(config.model_type) in PACKING_FAMILIES


def position_offset(config: Any) -> int:
    """Where position ids start: RoBERTa-style models (and MPNet) count from padding_idx + 1."""
    if config.model_type == "mpnet":
        return _MPNET_PADDING_IDX + 1
    return int(config.pad_token_id) + 1 if config.model_type in _ROBERTA_POSITIONS else 0


def attention_mask(config: Any, keep: torch.Tensor, dtype: torch.dtype) -> Any:
    """`keep` (B, 1, S, S) bool → the additive mask the model takes (per layer type)."""
    additive = (~keep).to(dtype) * torch.finfo(dtype).min
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()) or window is None:
        return additive
    # A 4-D mask bypasses the model's own sliding-window logic (ModernBERT's local layers),
    # so the window is applied here.
    s = keep.shape[-1]
    pos = torch.arange(s, device=keep.device)
    near = (pos[:, None] - pos[None, :]).abs() <= window
    local = (~(keep & near)).to(dtype) * torch.finfo(dtype).min
    return {"full_attention": additive, "sliding_attention": local}


def classify(model: Any, first: torch.Tensor, mean: torch.Tensor | None) -> Any:
    """The family's classification head on pooled segments `(N, H)` → logits `(N, C)`;
    `mean` is needed only where the head pools by mean (ModernBERT's option)."""
    kind = model.config.model_type
    if kind == "bert":
        return model.classifier(model.dropout(model.bert.pooler(first[:, None])))
    if kind in ("roberta", "xlm-roberta", "electra", "mpnet"):
        return model.classifier(first[:, None])
    if kind == "distilbert":
        return model.classifier(model.dropout(nn.functional.relu(model.pre_classifier(first))))
    if kind == "modernbert":
        pooled = mean if model.config.classifier_pooling == "mean" else first
        assert pooled is not None
        return model.classifier(model.drop(model.head(pooled)))
    raise ValueError(f"no packed classification head for model type {kind!r}")


def pool(hidden: torch.Tensor, member: torch.Tensor, modes: str) -> torch.Tensor:
    """sentence-transformers' pooling: `hidden` (B, S, H), `member` (B, K, S) 0/1 → (B, K, H
    per mode), each of the `+`-joined modes over each segment's own tokens, concatenated."""
    return torch.cat([_pool_one(hidden, member, mode) for mode in modes.split("+")], dim=-1)


def _pool_one(hidden: torch.Tensor, member: torch.Tensor, mode: str) -> torch.Tensor:
    weights = member.to(hidden.dtype)
    count = weights.sum(-1, keepdim=True)  # (B, K, 1) the segment's real tokens
    if mode == "max":
        masked = hidden[:, None].masked_fill(weights[..., None] == 0, torch.finfo(hidden.dtype).min)
        return masked.amax(dim=2)
    # Each token's place in its segment, 1..n (0 outside it): a packed row's segments start
    # wherever they were put, so positions are counted per segment, not per row.
    place = weights.cumsum(-1) * weights
    if mode == "cls":
        return place.eq(1).to(hidden.dtype) @ hidden
    if mode == "lasttoken":
        return (place.eq(count) & member.bool()).to(hidden.dtype) @ hidden
    if mode == "weightedmean":
        # The library weighs the tokens 1..n from the first real one.
        return (place @ hidden) / place.sum(-1, keepdim=True).clamp(min=1e-9)
    total = weights @ hidden
    if mode == "mean_sqrt_len_tokens":
        return total / count.clamp(min=1e-9).sqrt()
    if mode != "mean":
        raise ValueError(f"no pooling mode {mode!r}")
    return total / count.clamp(min=1e-9)


class EncoderGraph(nn.Module):
    """Buckets (`packed=False`, one record per row) or packing (up to K records per row)."""

    def __init__(
        self,
        loaded: LoadedModel,
        uses_token_types: bool,
        packed: bool,
        attention: str = ATTENTION_SDPA,
    ) -> None:
        super().__init__()
        self.model: Any = loaded.model
        self.config = loaded.config
        self.task = loaded.task
        self.pooling = loaded.pooling or "mean"
        # What runs on the pooled embedding (Dense layers, Normalize): part of the graph.
        self.after = nn.Sequential(*loaded.after)
        self.uses_token_types = uses_token_types
        self.packed = packed
        # Families mirrored here get the 4-D mask and their head applied per segment; any
        # other (buckets only) gets its usual 2-D mask and runs whole.
        self.mirrored = packed or supports_packing(loaded.config)
        self.dtype = next(loaded.model.parameters()).dtype
        if attention != ATTENTION_SDPA and not self.mirrored:
            raise ValueError(f"attention {attention!r} needs a family packing supports")
        use_attention(self.model, attention)
        self.attention = attention
        self.heads = int(getattr(loaded.config, "num_attention_heads", 0) or loaded.config.n_heads)
        # The model stops one layer short, and this computes the last one for each segment's
        # first token only, where nothing else of it is read (first_tokens.py).
        self.last = (
            first_tokens.FirstTokenLayer(self.model.base_model, self.heads)
            if self.mirrored and first_tokens.applies(loaded.config, self.task, self.pooling)
            else None
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.packed:
            input_ids, position_ids, token_type_ids, segment_ids, segment_index = inputs
        else:
            input_ids, segment_ids, token_type_ids = inputs  # the attention mask: 1 segment
            position_ids, segment_index = None, torch.zeros_like(input_ids[:, :1])
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": segment_ids}
        if self.mirrored:
            mask = attention_mask(self.config, self.keep(segment_ids), self.dtype)
            if self.attention == ATTENTION_BMM:
                mask = self.per_head(mask)
            kwargs["attention_mask"] = mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.task == "token-classification" or (
            self.task == "text-classification" and not self.mirrored
        ):
            # Token classification: the model's own per-token logits (B, S, labels), packed
            # or not; the host cuts each record's tokens out of its row (token_spans.py).
            out: torch.Tensor = self.model(**kwargs).logits.float()
            return out
        slots = torch.arange(1, segment_index.shape[1] + 1, device=input_ids.device)
        member = segment_ids[:, None, :] == slots[None, :, None]  # (B, K, S)
        encoder: Any = self.model.base_model if self.task == "text-classification" else self.model
        hidden = encoder(**kwargs).last_hidden_state
        b, k = segment_index.shape
        if self.last is not None:
            first = self.last(hidden, kwargs["attention_mask"], segment_index)  # (B, K, H)
        else:
            first = hidden.gather(1, segment_index[..., None].expand(b, k, hidden.shape[-1]))
        if self.task == "text-classification":
            mean = None if self.last is not None else pool(hidden, member, "mean").flatten(0, 1)
            logits = classify(self.model, first.flatten(0, 1), mean)
            out = logits.float().view(b, k, -1)
        elif self.last is not None:
            out = self.after(first.float())  # CLS pooling
        else:
            out = self.after(pool(hidden.float(), member, self.pooling))
        return out if self.packed else out[:, 0]

    def per_head(self, mask: Any) -> Any:
        """The mask expanded over the heads once, so that no layer copies it again."""
        if isinstance(mask, dict):
            return {name: self.per_head(m) for name, m in mask.items()}
        b, _, s, n = mask.shape
        return mask.expand(b, self.heads, s, n).contiguous()

    def keep(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) bool: a token sees the tokens of its own segment."""
        keep = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        if self.packed:
            return keep
        # One record a row: real tokens see real tokens; padding sees only itself, so no
        # row of the mask is empty (an empty softmax row is NaN in some kernels).
        s = segment_ids.shape[1]
        eye = torch.eye(s, dtype=torch.bool, device=segment_ids.device)
        return keep & ((segment_ids[:, None, None, :] > 0) | eye)

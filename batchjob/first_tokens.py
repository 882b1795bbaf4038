"""The encoder's last layer, computed for each segment's first token only.

A classifier (and CLS pooling) reads one token a segment from the last layer. Every earlier
layer needs every token, since they are the next layer's keys and values; in the last one,
only the first tokens' queries, attention, output projection and feed-forward matter. So
the graph runs every layer but the last as the model does, and the last one as below: keys
and values for the whole row, the rest for the first tokens only. That skips 10 of the last
layer's 12·H² multiply-adds a token: 1/14 of a 12-layer BERT's linear work (BENCHMARKS.md,
"The graph").

The families mirrored here share one post-norm layout (attention, add & norm, feed-forward,
add & norm); they differ in their modules' names. ModernBERT (pre-norm, rotary positions,
mean pooling for some heads) runs whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchjob.attention import bmm_attention

FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet")


def applies(config: Any, task: str, pooling: str) -> bool:
    """Whether the graph reads only each segment's first token of the last layer."""
    reads_first = task == "text-classification" or (
        task == "feature-extraction" and pooling == "cls"
    )
    return reads_first and config.model_type in FAMILIES


class FirstTokenLayer(nn.Module):
    """The model's last encoder layer, taken out of it: the model then stops one layer short
    and this computes the last one for the rows at `index`."""

    def __init__(self, base_model: Any, heads: int) -> None:
        super().__init__()
        self.kind = base_model.config.model_type
        layers: Any = (
            base_model.transformer.layer if self.kind == "distilbert" else base_model.encoder.layer
        )
        self.layer: Any = layers[-1]
        del layers[-1]
        # MPNet adds a relative position bias to every layer's scores; its encoder makes it.
        self.position_bias = (
            base_model.encoder.compute_position_bias if self.kind == "mpnet" else None
        )
        self.heads = heads

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """`hidden` (B, S, H) the last layer's input, `mask` (B, 1 or heads, S, S) additive,
        `index` (B, K) each segment's first token → (B, K, H) the layer's output there."""
        b, k = index.shape
        first = hidden.gather(1, index[..., None].expand(b, k, hidden.shape[-1]))
        bias = _query_rows(mask, index)
        if self.position_bias is not None:
            bias = bias + _query_rows(self.position_bias(hidden), index)  # (B, heads, S, S)
        query, key, value, project = self._projections()
        context, _ = bmm_attention(
            self,
            self._heads(query(first)),
            self._heads(key(hidden)),
            self._heads(value(hidden)),
            bias,
        )
        context = context.reshape(b, k, -1)
        return self._rest(project, context, first)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        return x.view(b, s, self.heads, h // self.heads).transpose(1, 2)

    def _projections(self) -> tuple[Any, Any, Any, Any]:
        """Query, key, value, and the attention's output projection where it is separate."""
        layer = self.layer
        a: Any
        if self.kind == "distilbert":
            a = layer.attention
            return a.q_lin, a.k_lin, a.v_lin, a.out_lin
        if self.kind == "mpnet":
            a = layer.attention.attn
            return a.q, a.k, a.v, a.o
        a = layer.attention.self
        return a.query, a.key, a.value, None  # BERT's projection is in attention.output

    def _rest(self, project: Any, context: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Add & norm, feed-forward, add & norm: the layer after its attention."""
        layer = self.layer
        if self.kind == "distilbert":
            attended = layer.sa_layer_norm(project(context) + first)
            out: torch.Tensor = layer.output_layer_norm(layer.ffn(attended) + attended)
            return out
        if self.kind == "mpnet":
            attended = layer.attention.LayerNorm(project(context) + first)
        else:
            attended = layer.attention.output(context, first)
        out = layer.output(layer.intermediate(attended), attended)
        return out


def _query_rows(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, S) → (B, heads, K, S): the rows of the queries at `index` (B, K)."""
    b, h, _, n = scores.shape
    return scores.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], n))

"""Reading a sentence-transformers model as the library itself does.

`modules.json` lists the model's modules in the order they run; batchjob runs the ones that
make a text embedding: Transformer (the Hugging Face encoder), Pooling, Dense and Normalize.
Any other module is refused by name, since leaving it out would change every embedding.
Pooling's `1_Pooling/config.json` comes in two forms: the older `pooling_mode_mean_tokens:
true` flags and the `{"pooling_mode": "mean"}` that sentence-transformers 6 writes; both
are read, and several modes concatenate in the order the library concatenates them.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchjob.config import POOLING_MODES
from batchjob.errors import UsageError

# sentence-transformers' legacy flags, in the order it concatenates their modes.
_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The Transformer module's config, under the names the library has used for it.
_TRANSFORMER_CONFIGS = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
_EMBEDDING = "sentence_embedding"


class DenseLayer(nn.Module):
    """sentence-transformers' Dense: activation(linear(x)), plus an optional residual."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, activation: nn.Module, residual: bool
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation
        self.use_residual = residual
        # The library's own attribute names, so that its state dict loads as it is.
        if residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


class L2Normalize(nn.Module):
    """sentence-transformers' Normalize: each embedding to unit length."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, p=2.0, dim=-1)


@dataclass(frozen=True)
class SentenceTransformerModel:
    """What batchjob runs of a sentence-transformers model directory."""

    transformer: str  # the directory holding the Hugging Face encoder and its tokenizer
    pooling: tuple[str, ...]  # concatenated in this order
    after: tuple[nn.Module, ...]  # Dense and Normalize, in modules.json's order
    max_seq_length: int | None  # the Transformer module's own, where its config has one
    lowercase: bool  # its do_lower_case: the library lowercases the text before the tokenizer


def read_model(model: str) -> SentenceTransformerModel | None:
    """The model's modules, or None when `model` is not a sentence-transformers directory."""
    if not os.path.isdir(model):
        return None
    listing = os.path.join(model, "modules.json")
    if not os.path.exists(listing):
        # The library makes such a model a Transformer and a mean Pooling.
        pooling_config = os.path.join(model, "1_Pooling", "config.json")
        has_pooling = os.path.exists(pooling_config)
        if not has_pooling and not any(
            os.path.exists(os.path.join(model, name)) for name in _TRANSFORMER_CONFIGS
        ):
            return None
        modes = read_pooling(pooling_config) if has_pooling else ("mean",)
        return _transformer(model, modes, ())
    entries = _load_json(listing)
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{listing}: expected a list of modules, got {json.dumps(entries)[:80]}")
    kinds = [_kind(listing, entry) for entry in entries]
    if kinds[0] != "Transformer":
        raise UsageError(
            f"{listing}: the first module must be a Transformer, got {entries[0].get('type')}"
        )
    if kinds.count("Pooling") != 1 or kinds.count("Transformer") != 1:
        raise UsageError(
            f"{listing}: batchjob runs one Transformer then one Pooling, got {', '.join(kinds)}"
        )
    if kinds[1] != "Pooling":
        raise UsageError(f"{listing}: the Pooling module must follow the Transformer directly")
    transformer = os.path.join(model, entries[0].get("path", ""))
    pooling = read_pooling(os.path.join(model, entries[1].get("path", ""), "config.json"))
    after: list[nn.Module] = []
    for kind, entry in zip(kinds[2:], entries[2:], strict=True):
        folder = os.path.join(model, entry.get("path", ""))
        after.append(_dense(folder) if kind == "Dense" else _normalize(folder))
    return _transformer(transformer, pooling, tuple(after))


def _kind(listing: str, entry: Any) -> str:
    """`sentence_transformers.models.Pooling` (or 6's module path) → `Pooling`; else exit 2."""
    kind = str(entry.get("type", "")) if isinstance(entry, dict) else ""
    name = kind.rsplit(".", 1)[-1]
    if not kind.startswith("sentence_transformers.") or name not in SUPPORTED_MODULES:
        where = f" ({entry.get('path')})" if isinstance(entry, dict) and entry.get("path") else ""
        raise UsageError(
            f"{listing}: module {kind or json.dumps(entry)}{where} is not supported; batchjob runs "
            f"{', '.join(SUPPORTED_MODULES)}"
        )
    return name


def read_pooling(path: str) -> tuple[str, ...]:
    """The pooling modes of a `1_Pooling/config.json`, in either of its two forms."""
    config = _load_json(path)
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object")
    # include_prompt is read with the prompts (prompts.py): it matters only when there is one.
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for flag, m in _LEGACY_FLAGS.items() if config.get(flag))
        if not modes and not any(flag in config for flag in _LEGACY_FLAGS):
            raise UsageError(f"{path}: no pooling mode (pooling_mode or pooling_mode_*_tokens)")
        return modes or ("mean",)  # as the library: all flags false means mean
    modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else ()
    unknown = [m for m in modes if m not in POOLING_MODES]
    if not modes or unknown:
        raise UsageError(
            f"{path}: pooling_mode {json.dumps(mode)} is not supported; batchjob pools by "
            f"{', '.join(POOLING_MODES)}"
        )
    return modes


def _dense(folder: str) -> DenseLayer:
    path = os.path.join(folder, "config.json")
    config = _load_json(path)
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, _EMBEDDING) not in (_EMBEDDING, None):
            raise UsageError(
                f"{path}: a Dense layer on {config[key]!r} is not supported; batchjob runs "
                f"Dense on the {_EMBEDDING} only"
            )
    try:
        layer = DenseLayer(
            int(config["in_features"]),
            int(config["out_features"]),
            bool(config.get("bias", True)),
            _activation(
                path, config.get("activation_function", "torch.nn.modules.activation.Tanh")
            ),
            bool(config.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a Dense layer's config ({e})") from None
    weights = _weights(folder)
    try:
        layer.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{folder}: its weights don't fit its config.json: {first}") from None
    return layer.float().eval()


def _activation(path: str, name: object) -> nn.Module:
    """torch.nn's activation classes only, as the library allows without remote code."""
    if name is None:
        return nn.Identity()
    module, _, attr = str(name).rpartition(".")
    if module.startswith("torch."):
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls()
    raise UsageError(f"{path}: activation_function {name!r} is not a torch.nn module")


def _weights(folder: str) -> dict[str, torch.Tensor]:
    safetensors = os.path.join(folder, "model.safetensors")
    if os.path.exists(safetensors):
        from safetensors.torch import load_file

        return load_file(safetensors)
    legacy = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(legacy):
        loaded: dict[str, torch.Tensor] = torch.load(legacy, map_location="cpu", weights_only=True)
        return loaded
    raise UsageError(f"{folder}: no model.safetensors or pytorch_model.bin for its Dense layer")


def _normalize(folder: str) -> L2Normalize:
    path = os.path.join(folder, "config.json")
    config = _load_json(path) if os.path.exists(path) else {}
    for key in ("module_input_name", "module_output_name"):
        if isinstance(config, dict) and config.get(key, _EMBEDDING) != _EMBEDDING:
            raise UsageError(f"{path}: Normalize of {config[key]!r} is not supported")
    return L2Normalize()


def _transformer(
    folder: str, pooling: tuple[str, ...], after: tuple[nn.Module, ...]
) -> SentenceTransformerModel:
    """The model with its Transformer module's config read: `max_seq_length` where it names
    one, and `do_lower_case`."""
    for name in _TRANSFORMER_CONFIGS:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        config = _load_json(path)
        if not isinstance(config, dict):
            raise UsageError(f"{path}: expected a JSON object")
        value = config.get("max_seq_length")
        if value is not None and (not isinstance(value, int) or value < 2):
            raise UsageError(f"{path}: max_seq_length must be an integer ≥ 2, got {value!r}")
        lowercase = bool(config.get("do_lower_case", False))
        return SentenceTransformerModel(folder, pooling, after, value, lowercase)
    return SentenceTransformerModel(folder, pooling, after, None, False)


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: can't read it: {e}") from None


def lowercase_first(tokenizer: Any) -> None:
    """Lowercase before the tokenizer's own normalizer, as the library does for a model whose
    Transformer config says `do_lower_case` (idempotent where the tokenizer lowercases too).
    It rides in tokenizer.json, so the artifact's tokenizer does the same."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    steps: list[Any] = [normalizers.Lowercase()]
    if backend.normalizer is not None:
        steps.append(backend.normalizer)
    backend.normalizer = normalizers.Sequence(steps)

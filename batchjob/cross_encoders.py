"""Cross-encoders as sentence-transformers saves them: the activation `CrossEncoder.predict`
applies (kept in the artifact when compiling), and telling a CrossEncoder directory from a
SentenceTransformer one (both have a modules.json)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from batchjob.errors import UsageError
from batchjob.pair_tasks import TEXT_RANKING
from batchjob.prompts import config_json

if TYPE_CHECKING:
    from batchjob.artifact import Artifact

CROSS_ENCODER_FILE = "cross_encoder.json"  # in an artifact: the model's saved activation_fn
# CrossEncoder activations (torch class paths) → ours; only torch's are loaded (trust).
_ACTIVATIONS = {
    "Sigmoid": "sigmoid",
    "Identity": "none",
}


def cross_encoder_activation(artifact: Artifact) -> str:
    """The activation `CrossEncoder.predict` applies by default: the model's saved
    `activation_fn` (config_sentence_transformers.json, copied into the artifact as
    CROSS_ENCODER_FILE; or config.json's `sentence_transformers` of older versions), where
    it is torch's, else sigmoid for one label."""
    path = _saved_activation(artifact.path)
    if path is None or not path.startswith("torch."):  # CrossEncoder loads only torch's
        return "sigmoid"
    name = path.rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise UsageError(
            f"--task {TEXT_RANKING}: the model's activation_fn {path} is not supported "
            f"(supported: {', '.join(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[name]


def _saved_activation(root: str) -> str | None:
    saved = config_json(os.path.join(root, CROSS_ENCODER_FILE)).get("activation_fn")
    if isinstance(saved, str):
        return saved
    config = config_json(os.path.join(root, "config.json"))
    st = config.get("sentence_transformers")
    if isinstance(st, dict) and isinstance(st.get("activation_fn"), str):
        return str(st["activation_fn"])
    old = config.get("sbert_ce_default_activation_function")
    return old if isinstance(old, str) else None


def write_cross_encoder_config(model: str, artifact_dir: str) -> None:
    """Compiling: a sentence-transformers model directory's saved activation_fn, kept."""
    if not os.path.isdir(model):
        return
    found = config_json(os.path.join(model, "config_sentence_transformers.json")).get(
        "activation_fn"
    )
    if isinstance(found, str):
        with open(os.path.join(artifact_dir, CROSS_ENCODER_FILE), "w", encoding="utf-8") as f:
            json.dump({"activation_fn": found}, f)
            f.write("\n")


def is_cross_encoder(model: str) -> bool:
    """A directory sentence-transformers saved from a CrossEncoder (a sequence classifier,
    though it has a modules.json)."""
    config = config_json(os.path.join(model, "config_sentence_transformers.json"))
    module = config_json(os.path.join(model, "sentence_bert_config.json"))
    return (
        config.get("model_type") == "CrossEncoder"
        or module.get("transformer_task") == "sequence-classification"
    )

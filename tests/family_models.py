"""Tiny random models of every packing family, and their outputs packed (through the real
tokenizer, packing batcher and graph) and eager (each document alone): what the packing and
attention tests compare."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchjob.artifact import Artifact
from batchjob.batching import Item, PackingBatcher
from batchjob.records import Record
from batchjob.tokens import RecordTokenizer
from tests.conftest import minilm_path, outputs_by_key
from tests.tokenizer_families import MPNET_PAD_ID, MPNET_VOCAB, compiled_tokenizer, mpnet_directory

TINY = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 30522}


def family_config(kind: str, labels: int) -> Any:
    from transformers import AutoConfig

    extra: dict[str, Any] = {"num_labels": labels}
    if kind == "distilbert":
        extra |= {"dim": 32, "n_heads": 4, "hidden_dim": 64, "n_layers": 2, "vocab_size": 30522}
    elif kind == "modernbert":
        # A window of 16 tokens (8 each side): documents are longer, so it matters.
        extra |= TINY | {"num_hidden_layers": 3, "local_attention": 16, "pad_token_id": 0}
        extra |= {"global_attn_every_n_layers": 3}
    else:
        extra |= TINY | {"num_hidden_layers": 2}
        if kind in ("roberta", "xlm-roberta"):
            extra["pad_token_id"] = 0  # the tokenizer's; positions then start at 1
        if kind == "electra":
            extra["embedding_size"] = 32
        if kind == "mpnet":
            # all-mpnet-base-v2's tokenizer shape, its specials after MiniLM's vocabulary. The
            # config names its pad; the model's positions still count from its fixed 1 + 1.
            extra |= {"vocab_size": MPNET_VOCAB, "pad_token_id": MPNET_PAD_ID}
    return AutoConfig.for_model(kind, **extra)


def build(kind: str, task: str, root: Path) -> Path:
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = auto.from_config(family_config(kind, 3)).eval()
    path = root / f"{kind}-{task}"
    model.save_pretrained(path)
    save_tokenizer(kind, path)
    return path


def save_tokenizer(kind: str, path: Path) -> None:
    """The family's own tokenizer where it differs from BERT's (MPNet), else MiniLM's."""
    from transformers import AutoTokenizer

    if kind == "mpnet":
        # The hub directory holds a config.json of its own: built beside, saved into `path`.
        compiled_tokenizer(mpnet_directory(path.parent / f"{path.name}-tokenizer"), path)
        return
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)


def packed_outputs(artifact: Artifact, texts: list[str]) -> tuple[np.ndarray, float]:
    """Outputs per text, in order, through the real tokenizer, packing batcher and graph."""
    tokenizer = RecordTokenizer(artifact.tokenizer_path, artifact.max_length)
    encoded = tokenizer.encode([Record(str(i), t) for i, t in enumerate(texts)])
    batcher = PackingBatcher(
        artifact.shapes[0],
        max_segments=artifact.max_segments,
        position_offset=artifact.position_offset,
        sort_window=64,
        pad_id=tokenizer.pad_id,
    )
    items = [Item(i, e.ids, e.type_ids) for i, e in enumerate(encoded) if e is not None]
    batches = batcher.add(items) + batcher.flush()
    found = outputs_by_key(artifact, batches)
    fill = sum(b.real_tokens for b in batches) / sum(
        b.shape.batch_size * b.shape.seq_len for b in batches
    )
    return np.stack([found[i] for i in range(len(texts))]), fill


def eager_outputs(model_dir: Path, task: str, texts: list[str], max_length: int) -> np.ndarray:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = auto.from_pretrained(model_dir, attn_implementation="eager").eval()
    accepted = {"input_ids"} | (
        {"token_type_ids"} & set(inspect.signature(model.forward).parameters)
    )
    rows = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            out = model(**{k: v for k, v in enc.items() if k in accepted})
            if task == "text-classification":
                rows.append(out.logits[0].numpy())
            else:
                pooled = out.last_hidden_state[0].mean(0)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.stack(rows)

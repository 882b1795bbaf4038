"""The compiled artifact: a directory that `run`, `worker` and `serve` load.

batchjob.json        task, backend, dtype, strategy, shapes (batch size per bucket),
                     labels, pooling, library versions
graph_<S>.pt         one traced graph per compiled sequence length S
tokenizer/           the tokenizer, saved with save_pretrained
config.json          the model's config
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from batchjob.batching import Shape
from batchjob.errors import UsageError
from batchjob.replica_process import Predict

MANIFEST = "batchjob.json"
FORMAT_VERSION = 1
BUCKET_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PACKED_INPUTS = ("input_ids", "position_ids", "token_type_ids", "segment_ids", "segment_index")


@dataclass(frozen=True)
class Artifact:
    path: str
    task: str
    backend: str
    dtype: str
    strategy: str  # "buckets" or "packing": which batcher feeds the graphs
    shapes: tuple[Shape, ...]
    max_segments: int = 1  # packing: documents a row may hold (K)
    position_offset: int = 0  # packing: where each document's position ids start
    labels: tuple[str, ...] = ()
    function_to_apply: str = "none"  # classification: softmax, sigmoid or none, as the pipeline
    pooling: str | None = None
    normalize: bool = True
    source_model: str = ""
    compiler_args: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    max_abs_diff_vs_eager: float | None = None

    @property
    def max_length(self) -> int:
        return self.shapes[-1].seq_len

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.path, "tokenizer")

    def graph_path(self, shape: Shape) -> str:
        return os.path.join(self.path, graph_name(shape))

    def save(self) -> None:
        data = asdict(self)
        del data["path"]
        data["format_version"] = FORMAT_VERSION
        data["shapes"] = [
            {"seq_len": s.seq_len, "batch_size": s.batch_size, "graph": graph_name(s)}
            for s in self.shapes
        ]
        with open(os.path.join(self.path, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def graph_name(shape: Shape) -> str:
    return f"graph_{shape.seq_len}.pt"


def is_artifact(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def load_artifact(path: str) -> Artifact:
    manifest = os.path.join(path, MANIFEST)
    try:
        with open(manifest, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{manifest}: not a readable artifact manifest: {e}") from None
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{manifest}: artifact format {version}, this batchjob reads {FORMAT_VERSION}; "
            "compile the model again"
        )
    try:
        shapes = tuple(Shape(int(s["seq_len"]), int(s["batch_size"])) for s in data.pop("shapes"))
        return Artifact(
            path=path,
            shapes=shapes,
            labels=tuple(data.pop("labels", ())),
            compiler_args=tuple(data.pop("compiler_args", ())),
            **data,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{manifest}: malformed: {e}") from None


@dataclass(frozen=True)
class ArtifactLoader:
    """Picklable: each replica process calls it once to load every graph of the artifact."""

    path: str

    def __call__(self) -> Predict:
        import torch

        from batchjob.backends import get_backend

        artifact = load_artifact(self.path)
        backend = get_backend(artifact.backend)
        graphs = {s.seq_len: backend.load(artifact.graph_path(s)) for s in artifact.shapes}
        names = PACKED_INPUTS if artifact.strategy == "packing" else BUCKET_INPUTS

        def predict(arrays: dict[str, np.ndarray]) -> np.ndarray:
            inputs = [torch.from_numpy(arrays[name]) for name in names]
            with torch.inference_mode():
                out: torch.Tensor = graphs[inputs[0].shape[1]](*inputs)
            # Packed graphs answer (B, K, ...): one output row per segment slot.
            return out.float().flatten(0, 1).numpy() if out.dim() > 2 else out.float().numpy()

        # A frozen graph optimises itself on its first calls: pay that before reporting ready.
        for shape in artifact.shapes:
            dummy = {name: np.zeros((shape.batch_size, shape.seq_len), np.int64) for name in names}
            dummy["attention_mask"] = np.ones((shape.batch_size, shape.seq_len), np.int64)
            dummy["segment_ids"] = dummy["attention_mask"]
            dummy["segment_index"] = np.zeros((shape.batch_size, artifact.max_segments), np.int64)
            for _ in range(2):
                predict(dummy)
        return predict

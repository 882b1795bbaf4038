"""`batchjob compile`: a Hugging Face model → an artifact of fixed-shape traced graphs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from importlib import metadata

import torch

from batchjob.artifact import Artifact, is_artifact, load_artifact
from batchjob.backends import get_backend
from batchjob.batching import Shape
from batchjob.config import CompileSpec
from batchjob.errors import BatchJobError, UsageError
from batchjob.models import EncoderGraph, LoadedModel, infer_task, load_model

log = logging.getLogger("batchjob.compile")

# fp32 graphs must reproduce the eager model this closely (on the logits or embeddings).
FP32_TOLERANCE = 1e-4


def resolve_dtype(spec: CompileSpec) -> str:
    """`auto`: bf16 where the CPU has native bf16 matmuls (or on Neuron), else fp32."""
    if spec.dtype != "auto":
        return spec.dtype
    if spec.backend != "cpu":
        return "bf16"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native else "fp32"


def example_inputs(shape: Shape, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of the shape with ragged real lengths, so the trace sees padding."""
    g = torch.Generator().manual_seed(seed)
    b, s = shape.batch_size, shape.seq_len
    ids = torch.randint(5, max(6, vocab_size), (b, s), generator=g)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, torch.zeros_like(ids)


def compile_artifact(spec: CompileSpec, output: str) -> Artifact:
    """Trace one graph per shape into `output` (written whole, then renamed into place)."""
    if os.path.exists(output) and os.listdir(output):
        raise UsageError(f"--output {output} exists and is not empty")
    task = spec.task or infer_task(spec.model)
    dtype = resolve_dtype(spec)
    backend = get_backend(spec.backend)
    # Neuron compilers cast fp32 weights themselves; only the CPU needs bf16 weights.
    weights = torch.bfloat16 if dtype == "bf16" and backend.device == "cpu" else torch.float32
    started = time.monotonic()
    loaded = load_model(spec.model, task, weights, spec.pooling, spec.normalize)
    uses_token_types = "token_type_ids" in loaded.tokenizer.model_input_names
    graph = EncoderGraph(loaded, uses_token_types).eval()

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".compiling-", dir=parent)
    try:
        worst = 0.0
        for shape in spec.shapes:
            inputs = example_inputs(shape, loaded.config.vocab_size)
            with warnings.catch_warnings():
                # Tracing warns about every Python bool it freezes; the mask is built in-graph.
                warnings.simplefilter("ignore")
                traced = backend.trace(graph, inputs, spec.compiler_args, dtype)
            if backend.device == "cpu":
                worst = max(worst, _check_against_eager(graph, traced, inputs, dtype, shape))
            torch.jit.save(traced, os.path.join(staging, f"graph_{shape.seq_len}.pt"))
            log.info(
                "%.1fs traced %s graph %dx%d",
                time.monotonic() - started,
                backend.name,
                shape.batch_size,
                shape.seq_len,
            )
        loaded.tokenizer.save_pretrained(os.path.join(staging, "tokenizer"))
        loaded.config.save_pretrained(staging)
        artifact = Artifact(
            path=staging,
            task=task,
            backend=backend.name,
            dtype=dtype,
            strategy="buckets",
            shapes=spec.shapes,
            labels=_labels(loaded),
            function_to_apply=_function_to_apply(loaded),
            pooling=loaded.pooling,
            normalize=spec.normalize,
            source_model=spec.model,
            compiler_args=spec.compiler_args,
            versions=_versions(),
            max_abs_diff_vs_eager=worst if backend.device == "cpu" else None,
        )
        artifact.save()
        if os.path.exists(output):
            os.rmdir(output)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "%.1fs compiled %s (%s, %s, %s) to %s",
        time.monotonic() - started,
        spec.model,
        task,
        backend.name,
        dtype,
        output,
    )
    return load_artifact(output)


def _check_against_eager(
    graph: torch.nn.Module,
    traced: torch.jit.ScriptModule,
    inputs: tuple[torch.Tensor, ...],
    dtype: str,
    shape: Shape,
) -> float:
    with torch.inference_mode():
        diff = float((traced(*inputs) - graph(*inputs)).abs().max())
    if dtype == "fp32" and diff > FP32_TOLERANCE:
        raise BatchJobError(
            f"the traced {shape.batch_size}x{shape.seq_len} graph differs from the eager model "
            f"by {diff:.2e} (> {FP32_TOLERANCE}); this model may not trace faithfully"
        )
    return diff


def _labels(loaded: LoadedModel) -> tuple[str, ...]:
    if loaded.task != "text-classification":
        return ()
    id2label = loaded.config.id2label or {}
    return tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(loaded.config.num_labels))


def _function_to_apply(loaded: LoadedModel) -> str:
    """What the transformers text-classification pipeline applies to the logits by default."""
    if loaded.task != "text-classification":
        return "none"
    config = loaded.config
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def _versions() -> dict[str, str]:
    names = ("batchjob", "torch", "transformers", "tokenizers", "torch-neuron", "torch-neuronx")
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def ensure_artifact(spec: CompileSpec, cache_dir: str) -> Artifact:
    """An artifact for `spec.model`: itself if it is one, else compiled once into the cache."""
    if is_artifact(spec.model):
        return load_artifact(spec.model)
    path = os.path.join(cache_dir, "artifacts", _cache_key(spec))
    if is_artifact(path):
        log.info("using the cached compile of %s at %s", spec.model, path)
        return load_artifact(path)
    return compile_artifact(spec, path)


def _cache_key(spec: CompileSpec) -> str:
    """Model identity (a local model's files, by name, size and mtime) plus every option."""
    model = os.path.abspath(spec.model) if os.path.isdir(spec.model) else spec.model
    files = []
    if os.path.isdir(model):
        for root, _, names in os.walk(model):
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                files.append(
                    (os.path.relpath(os.path.join(root, name), model), st.st_size, st.st_mtime_ns)
                )
    options = {
        "model": model,
        "files": sorted(files),
        "task": spec.task,
        "backend": spec.backend,
        "dtype": resolve_dtype(spec),
        "shapes": [(s.seq_len, s.batch_size) for s in spec.shapes],
        "compiler_args": spec.compiler_args,
        "pooling": spec.pooling,
        "normalize": spec.normalize,
        "versions": _versions(),
    }
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    name = os.path.basename(model.rstrip("/")) or "model"
    return f"{name}-{digest}"

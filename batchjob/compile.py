"""`batchjob compile`: a Hugging Face model → an artifact of fixed-shape traced graphs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from batchjob.artifact import (
    PACKED_INPUTS,
    Artifact,
    is_artifact,
    load_artifact,
    write_weights,
)
from batchjob.artifact_manifest import FORMAT_VERSION, WEIGHTS_FILE, graph_name
from batchjob.backends import get_backend
from batchjob.backends.cpu import native_bf16
from batchjob.batching import Item, PackingBatcher, Shape
from batchjob.compile_plan import calibration_sample, plan, resolve_dtype
from batchjob.config import (
    CompileSpec,
)
from batchjob.cross_encoders import write_cross_encoder_config
from batchjob.errors import BatchJobError, UsageError
from batchjob.graphs import (
    EncoderGraph,
)
from batchjob.models import LoadedModel, infer_task, load_model
from batchjob.prompts import write_prompts
from batchjob.staging import make_staging, publish, remove_abandoned_staging

log = logging.getLogger("batchjob.compile")

# fp32 graphs must reproduce the eager model this closely (on the logits or embeddings).
FP32_TOLERANCE = 1e-4


def example_inputs(shape: Shape, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of the shape with ragged real lengths, so the trace sees padding."""
    g = torch.Generator().manual_seed(seed)
    b, s = shape.batch_size, shape.seq_len
    ids = torch.randint(5, max(6, vocab_size), (b, s), generator=g)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, torch.zeros_like(ids)


def packed_example(
    shape: Shape, max_segments: int, offset: int, vocab_size: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """A packed batch of the shape, made by the packing batcher from random documents."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max(3, shape.seq_len // 3), size=2 * shape.batch_size * max_segments)
    items = [Item(i, rng.integers(5, max(6, vocab_size), size=n)) for i, n in enumerate(lengths)]
    batcher = PackingBatcher(shape, max_segments=max_segments, position_offset=offset)
    batcher.add(items)
    batch = batcher.flush()[0]
    return tuple(torch.from_numpy(batch.arrays[name]) for name in PACKED_INPUTS)


def compile_artifact(spec: CompileSpec, output: str) -> Artifact:
    """Trace one graph per shape into `output` (written whole, then renamed into place)."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UsageError(f"--output {output} exists and is not an empty directory")
    return _compile(spec, output, into_cache=False)


def _compile(spec: CompileSpec, output: str, *, into_cache: bool) -> Artifact:
    """Compile into a staging directory beside `output`, then rename it to `output`. Into the
    cache, another process may publish `output` first: then its artifact is the one used."""
    task = spec.task or infer_task(spec.model)
    dtype = resolve_dtype(spec)
    backend = get_backend(spec.backend)
    if dtype == "bf16" and backend.device == "cpu" and not native_bf16():
        log.warning(
            "this CPU has no native bf16 matmuls: the bf16 graphs run slower than fp32 here "
            "(--dtype auto picks fp32 on such a CPU)"
        )
    # Neuron compilers cast fp32 weights themselves; only the CPU needs bf16 weights.
    weights = torch.bfloat16 if dtype == "bf16" and backend.device == "cpu" else torch.float32
    started = time.monotonic()
    loaded = load_model(spec.model, task, weights, spec.pooling, spec.normalize)
    uses_token_types = "token_type_ids" in loaded.tokenizer.model_input_names and (
        "token_type_ids" in inspect.signature(loaded.model.forward).parameters
    )
    chosen = plan(spec, loaded)
    packed = chosen.strategy == "packing"
    graph = EncoderGraph(loaded, uses_token_types, packed, chosen.attention).eval()

    staging = make_staging(output)
    try:
        worst = 0.0
        # What the graphs left out, by content: one copy for all of them (cpu backend).
        shared: dict[str, torch.Tensor] = {}
        vocab = loaded.config.vocab_size
        for shape in chosen.shapes:
            if packed:
                inputs = packed_example(shape, chosen.max_segments, chosen.position_offset, vocab)
            else:
                inputs = example_inputs(shape, vocab)
            with warnings.catch_warnings():
                # Tracing warns about every Python bool it freezes; the mask is built in-graph.
                warnings.simplefilter("ignore")
                traced = backend.trace(graph, inputs, spec.compiler_args, dtype)
            if backend.device == "cpu":
                worst = max(worst, _check_against_eager(graph, traced, inputs, dtype, shape))
            shared |= backend.save(traced, os.path.join(staging, graph_name(shape)))
            del traced
            log.info(
                "%.1fs traced %s %s graph %dx%d%s",
                time.monotonic() - started,
                backend.name,
                chosen.strategy,
                shape.batch_size,
                shape.seq_len,
                f" (up to {chosen.max_segments} documents a row)" if packed else "",
            )
        if backend.shares_weights:
            write_weights(shared, os.path.join(staging, WEIGHTS_FILE))
        loaded.tokenizer.save_pretrained(os.path.join(staging, "tokenizer"))
        write_prompts(spec.model, staging)  # sentence-transformers' prompts, for --prompt-name
        write_cross_encoder_config(spec.model, staging)  # a CrossEncoder's activation_fn
        loaded.config.save_pretrained(staging)
        artifact = Artifact(
            path=staging,
            task=task,
            backend=backend.name,
            dtype=dtype,
            strategy=chosen.strategy,
            shapes=chosen.shapes,
            max_segments=chosen.max_segments,
            position_offset=chosen.position_offset,
            labels=_labels(loaded),
            function_to_apply=_function_to_apply(loaded),
            pooling=loaded.pooling,
            normalize=spec.normalize,
            source_model=spec.source or spec.model,
            compiler_args=spec.compiler_args,
            versions=_versions(),
            max_abs_diff_vs_eager=worst if backend.device == "cpu" else None,
            weights=WEIGHTS_FILE if backend.shares_weights else None,
        )
        artifact.save()
        published = publish(staging, output, shared=into_cache)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not published:
        shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "%.1fs another process compiled %s into %s first: using its artifact",
            time.monotonic() - started,
            spec.model,
            output,
        )
        return load_artifact(output)
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
    if loaded.task not in ("text-classification", "token-classification"):
        return ()
    id2label = loaded.config.id2label or {}
    return tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(loaded.config.num_labels))


def _function_to_apply(loaded: LoadedModel) -> str:
    """What the transformers text-classification pipeline applies to the logits by default
    (the token-classification pipeline always applies softmax)."""
    if loaded.task == "token-classification":
        return "softmax"
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
    """An artifact for `spec.model`: itself if it is one, else compiled once into the cache.
    Either way verified (its fields and checksums) before it is returned."""
    if is_artifact(spec.model):
        return load_artifact(spec.model)
    folder = os.path.join(cache_dir, "artifacts")
    path = os.path.join(folder, _cache_key(spec))
    if is_artifact(path):
        log.info("using the cached compile of %s at %s", spec.model, path)
        try:
            return load_artifact(path)
        except UsageError as e:
            raise UsageError(f"{e} (a cached compile: delete {path} to compile again)") from None
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"{path}: in the compile cache but not an artifact; delete it")
    remove_abandoned_staging(folder)
    return _compile(spec, path, into_cache=True)


def _cache_key(spec: CompileSpec) -> str:
    """Every field of the spec, the model's identity (a local model's files, by name, size
    and mtime), the calibration sample by its content, and what compiles: the libraries'
    versions, batchjob's own and the source of the modules that make an artifact."""
    options: dict[str, object] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == "model":
            value = os.path.abspath(value) if os.path.isdir(value) else value
        elif f.name == "dtype":
            value = resolve_dtype(spec)  # auto is what this machine makes of it
        elif f.name == "shapes":
            value = [(s.seq_len, s.batch_size) for s in value]
        elif f.name == "calibrate" and value is not None:
            value = _digest("\0".join(calibration_sample(value)).encode())
        options[f.name] = value
    model = str(options["model"])
    files = []
    if os.path.isdir(model):
        for root, _, names in os.walk(model):
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                files.append(
                    (os.path.relpath(os.path.join(root, name), model), st.st_size, st.st_mtime_ns)
                )
    options |= {
        "files": sorted(files),
        "versions": _versions(),
        "format": FORMAT_VERSION,  # an artifact of an older format is compiled again
        "code": _code_digest(),
    }
    digest = _digest(json.dumps(options, sort_keys=True).encode())[:16]
    name = os.path.basename(model.rstrip("/")) or "model"
    return f"{name}-{digest}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _code_digest() -> str:
    """The source of what makes an artifact: a change there compiles cached models again, as
    a release of batchjob would."""
    here = Path(__file__).parent
    names = ["compile.py", "compile_plan.py", "graphs.py", "models.py", "st_modules.py"]
    names += ["batching.py", "artifact.py", "artifact_manifest.py", "prompts.py"]
    names += ["backends/cpu.py", "backends/neuron.py"]
    return _digest(b"".join((here / name).read_bytes() for name in names))

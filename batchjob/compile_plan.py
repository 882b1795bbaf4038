"""What `compile` builds for a model: the strategy (packing or buckets), its shapes, the
dtype, and the attention, from the spec, the model's own length and an optional calibration
sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchjob.attention import ATTENTION_BMM, ATTENTION_SDPA, takes_attention_function
from batchjob.backends.cpu import native_bf16
from batchjob.batching import Shape
from batchjob.config import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_PACKING_LENGTH,
    MAX_DEFAULT_LENGTH,
    STANDARD_LENGTHS,
    CompileSpec,
    resolve_shapes,
)
from batchjob.errors import UsageError
from batchjob.graphs import position_offset, supports_packing
from batchjob.models import LoadedModel

log = logging.getLogger("batchjob.compile")

CALIBRATION_SAMPLE = 2000  # records --calibrate reads


def resolve_dtype(spec: CompileSpec) -> str:
    """`auto`: bf16 where the CPU has native bf16 matmuls (or on Neuron), else fp32."""
    if spec.dtype != "auto":
        return spec.dtype
    if spec.backend != "cpu":
        return "bf16"
    return "bf16" if native_bf16() else "fp32"


@dataclass(frozen=True)
class Plan:
    """What to compile: the strategy its batcher uses, its shapes, packing's settings, and
    how the graphs compute attention (attention.ATTENTIONS)."""

    strategy: str
    shapes: tuple[Shape, ...]
    max_segments: int = 1
    position_offset: int = 0
    attention: str = ATTENTION_SDPA


def plan(spec: CompileSpec, loaded: LoadedModel) -> Plan:
    """Packing where asked (or by default) and the family allows it, else buckets. With no
    shape flag the length is the model's own (`model_length`), or what --calibrate finds
    within it."""
    config = loaded.config
    packing = spec.packing if spec.packing is not None else len(spec.shapes) <= 1
    if packing and not supports_packing(config):
        log.warning(
            "model type %s can't be packed (its attention may ignore a custom mask): "
            "compiling buckets instead",
            config.model_type,
        )
        packing = False
    hard = _positions(config)
    for shape in spec.shapes:
        if hard is not None and shape.seq_len > hard:
            raise UsageError(
                f"a shape of {shape.seq_len} tokens is longer than the model takes: it has "
                f"{hard} positions (max_position_embeddings); use --sequence-length ≤ {hard}"
            )
    limit = model_length(loaded)
    lengths = calibration_lengths(spec.calibrate, loaded, limit) if spec.calibrate else None
    top = _length_for(lengths, limit) if lengths is not None else limit
    if not packing:
        if spec.shapes:
            return Plan("buckets", spec.shapes)
        buckets = (*(n for n in STANDARD_LENGTHS if n < top), top)
        return Plan("buckets", resolve_shapes(None, None, buckets, None))
    # One row of the model's length, and the token budget's worth of rows (at least one):
    # 8x128 as before for a 128-token model, 4x256 for all-MiniLM-L6-v2, 2x512 for BERT.
    shape = spec.shapes[0] if spec.shapes else Shape(top, max(1, DEFAULT_MAX_BATCH_TOKENS // top))
    short = int(np.percentile(lengths, 10)) if lengths is not None and len(lengths) else 8
    segments = spec.max_segments or min(64, max(1, shape.seq_len // max(2, short)))
    # Batched matmuls beat SDPA's flash kernel 2x in a packed bf16 CPU graph (BENCHMARKS.md);
    # fp32 keeps the model's own SDPA, and the Neuron compilers choose their own kernels.
    # The choice follows from the backend and the resolved dtype, which the compile cache
    # key holds (and graphs.py's source, in its code digest), and from the model: one with
    # attention of its own (MPNet: plain matmuls already) keeps it.
    bmm = spec.backend == "cpu" and resolve_dtype(spec) == "bf16"
    bmm = bmm and takes_attention_function(loaded.model)
    attention = ATTENTION_BMM if bmm else ATTENTION_SDPA
    return Plan("packing", (shape,), segments, position_offset(config), attention)


def model_length(loaded: LoadedModel) -> int:
    """The longest input the model takes, as sentence-transformers truncates: its own
    `max_seq_length`, else the tokenizer's `model_max_length`, else the positions the config
    has (less where RoBERTa-style position ids start); never past those positions nor 512."""
    limit = _positions(loaded.config) or MAX_DEFAULT_LENGTH
    tokenizer_length = int(getattr(loaded.tokenizer, "model_max_length", 0) or 0)
    if loaded.max_seq_length is not None:
        wanted, source = loaded.max_seq_length, "its sentence-transformers max_seq_length"
    elif 2 <= tokenizer_length <= _UNSET_MODEL_MAX_LENGTH:
        wanted, source = tokenizer_length, "its tokenizer's model_max_length"
    else:
        wanted, source = limit, "its position embeddings"
    length = max(2, min(wanted, limit, MAX_DEFAULT_LENGTH))
    capped = f", capped at {length}" if length < wanted else ""
    log.info("the model's length: %d tokens (%s%s)", wanted, source, capped)
    return length


def _positions(config: Any) -> int | None:
    """The positions a sequence may take (less where RoBERTa-style ids start), if known."""
    positions = getattr(config, "max_position_embeddings", None)
    return int(positions) - position_offset(config) if positions else None


def _length_for(lengths: np.ndarray, limit: int) -> int:
    """The smallest standard length that holds 99% of the sample, within the model's limit."""
    need = int(np.percentile(lengths, 99)) if len(lengths) else DEFAULT_PACKING_LENGTH
    return min(next((n for n in (32, 64, 128, 256, 512) if n >= need), 512), limit)


# A tokenizer that was saved without a length says 1e30 (transformers' VERY_LARGE_INTEGER).
_UNSET_MODEL_MAX_LENGTH = 1_000_000


def calibration_sample(path: str, sample: int = CALIBRATION_SAMPLE) -> list[str]:
    """The texts of up to `sample` records of the shards at `path`, in order."""
    from batchjob.records import Fields, read_records
    from batchjob.shards import list_shards

    texts: list[str] = []
    for shard in list_shards(path, label="--calibrate"):
        with open(shard.path, "rb") as stream:
            for chunk in read_records(stream, shard.format, shard.rel, Fields(), gzip=shard.gzip):
                texts += [r.text for r in chunk if r.text is not None]
                if len(texts) >= sample:
                    return texts[:sample]
    if not texts:
        raise UsageError(f"--calibrate {path}: no readable records")
    return texts


def calibration_lengths(path: str, loaded: LoadedModel, limit: int) -> np.ndarray:
    """Token counts of the calibration sample at `path` (untruncated)."""
    from tokenizers import Tokenizer

    # A copy: the artifact saves the model's tokenizer as it came.
    tokenizer = Tokenizer.from_str(loaded.tokenizer.backend_tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    texts = calibration_sample(path)
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
    log.info(
        "calibrated on %d records of %s: tokens p10 %d, median %d, p90 %d, p99 %d",
        len(lengths),
        path,
        *np.percentile(lengths, [10, 50, 90, 99]).astype(int),
    )
    capped: np.ndarray = np.minimum(lengths, limit)
    return capped

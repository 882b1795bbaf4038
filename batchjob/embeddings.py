"""Embeddings as a vector store wants them: Matryoshka truncation, precision, Arrow type.

sentence-transformers' `encode(truncate_dim=N, normalize_embeddings=...)` keeps the first N
dimensions of the model's output, *then* normalises: a graph that normalised already gives a
vector that is no longer of length 1 once cut, so it is normalised again here (the artifact's
`normalize`); without normalisation the first N dimensions are kept as they are.

Precisions follow `sentence_transformers.util.quantization.quantize_embeddings` (6.2) exactly:
- float32, float16: a cast;
- int8: per dimension, 255 buckets between that dimension's minimum and maximum
  (`ranges`, shape (2, dim)), `floor((x - min) / step)` clipped to 0..255, minus 128;
- binary: one bit per dimension, set where the value is > 0, packed 8 to a byte (big-endian
  bit order, numpy's `packbits`) into uint8: sentence-transformers calls this "ubinary" (its
  "binary" is the same bytes minus 128, as int8). Unsigned bytes are what vector stores'
  bit vectors take (LanceDB, FAISS' binary indexes, pgvector's bit via hex).

int8 needs ranges the same for the whole job: given (`--embedding-ranges FILE`, JSON
`[[min, ...], [max, ...]]`, or an earlier job's `_manifest.json`), else (`run` only) taken from
the final embeddings of the job's first records (`--records-per-read` of them, inferred once
more before the job starts: `calibrate`; each window's with `--long-documents chunk`), and
recorded in the manifest and the Parquet metadata, so that the next job can be given them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchjob.errors import UsageError

log = logging.getLogger("batchjob.embeddings")

EMBEDDING_TYPES = ("fixed", "list")
PRECISIONS = ("float32", "float16", "int8", "binary")
_VALUE_TYPES: dict[str, pa.DataType] = {
    "float32": pa.float32(),
    "float16": pa.float16(),
    "int8": pa.int8(),
    "binary": pa.uint8(),
}
# Fewer rows than this in the first batch make rough int8 ranges (sentence-transformers warns
# at the same count).
_FEW_CALIBRATION_ROWS = 100


@dataclass(frozen=True)
class EmbeddingSpec:
    """How embeddings are written: flags --embedding-type, -dim, -precision, -ranges."""

    type: str = "fixed"  # fixed: fixed_size_list<T>[dim]; list: list<T>
    dim: int | None = None  # None: the model's
    precision: str = "float32"
    ranges: str | None = None  # int8: a JSON file [[min...], [max...]]

    def __post_init__(self) -> None:
        if self.type not in EMBEDDING_TYPES:
            raise UsageError(
                f"--embedding-type must be one of {', '.join(EMBEDDING_TYPES)}, got {self.type!r}"
            )
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"--embedding-precision must be one of {', '.join(PRECISIONS)}, "
                f"got {self.precision!r}"
            )
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int)):
            raise UsageError(f"--embedding-dim must be an integer, got {self.dim!r}")
        if self.dim is not None and self.dim < 1:
            raise UsageError(f"--embedding-dim must be ≥ 1, got {self.dim}")
        if self.ranges is not None and self.precision != "int8":
            raise UsageError("--embedding-ranges goes with --embedding-precision int8")

    @property
    def is_default(self) -> bool:
        return self == EmbeddingSpec()


def read_ranges(path: str, dim: int) -> np.ndarray:
    """The int8 ranges of `path`: JSON [[min, ...], [max, ...]], `dim` numbers each, or the
    ranges an earlier job recorded: its `_manifest.json`, or one of its `.parquet` outputs.
    UsageError names the file."""
    try:
        if path.lower().endswith(".parquet"):
            metadata = pq.read_schema(os.path.expanduser(path)).metadata or {}
            data: Any = json.loads(metadata.get(b"batchjob", b"{}"))
        else:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, pa.ArrowException) as e:
        raise UsageError(f"--embedding-ranges {path}: can't read it: {e}") from None
    return checked_ranges(recorded_ranges(data), dim, f"--embedding-ranges {path}")


def recorded_ranges(data: object) -> object:
    """The ranges in a manifest or a file's metadata (`output_format.embedding.ranges`),
    else `data` as it is."""
    if isinstance(data, dict):
        described = data.get("output_format", data).get("embedding")
        return described.get("ranges") if isinstance(described, dict) else None
    return data


def checked_ranges(data: object, dim: int, where: str) -> np.ndarray:
    """`data` as (2, dim) float32 ranges; UsageError naming `where` when it isn't."""
    try:
        ranges = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        ranges = np.zeros(0, np.float32)
    if ranges.shape != (2, dim) or not np.isfinite(ranges).all():
        raise UsageError(
            f"{where}: expected [[min, ...], [max, ...]] of {dim} finite "
            f"numbers each (the embedding's dimensions), got shape {list(ranges.shape)}"
        )
    if (ranges[0] > ranges[1]).any():
        raise UsageError(f"{where}: a minimum is above its maximum")
    return ranges


def quantize(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None) -> np.ndarray:
    """float32 (N, dim) → the precision's values, as sentence-transformers computes them."""
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision == "float16":
        return embeddings.astype(np.float16)
    if precision == "binary":
        packed: np.ndarray = np.packbits(embeddings > 0, axis=-1)
        return packed
    assert ranges is not None
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    signed: np.ndarray = (buckets - 128).astype(np.int8)
    return signed


class Embedder:
    """An artifact's pooled outputs → the job's embeddings: cut, normalised, quantised."""

    def __init__(
        self,
        spec: EmbeddingSpec,
        *,
        model_dim: int,
        normalize: bool,
        pooling: str | None = None,
        calibrate: bool = True,
    ) -> None:
        if spec.dim is not None and spec.dim > model_dim:
            raise UsageError(
                f"--embedding-dim {spec.dim} is above the model's dimension ({model_dim})"
            )
        self.spec, self.model_dim, self.normalize = spec, model_dim, normalize
        self.pooling = pooling
        self.dim = spec.dim or model_dim
        self.ranges: np.ndarray | None = None
        self.ranges_from: str | None = None
        if spec.precision == "int8" and spec.ranges is not None:
            self.ranges, self.ranges_from = read_ranges(spec.ranges, self.dim), "given"
        elif spec.precision == "int8" and not calibrate:
            # Several containers (workers on one queue, Batch Transform instances) would each
            # take their own first batch: their int8 values would not compare.
            raise UsageError(
                "--embedding-precision int8 needs --embedding-ranges FILE here: ranges from "
                "each process's first batch would differ between processes"
            )
        self.calibrating = False  # float32 out, unquantised: the calibration pass's results
        self._lock = threading.Lock()

    @property
    def width(self) -> int:
        """Values per embedding in the output: bytes for binary, else dimensions."""
        return (self.dim + 7) // 8 if self.spec.precision == "binary" else self.dim

    def arrow_type(self) -> pa.DataType:
        value = _VALUE_TYPES[self.spec.precision]
        kind: pa.DataType = (
            pa.list_(value) if self.spec.type == "list" else pa.list_(value, self.width)
        )
        return kind

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        """(N, model_dim) graph outputs → (N, width) values of the output's type."""
        out = pooled.astype(np.float32)
        if self.dim < self.model_dim:
            out = out[:, : self.dim]
            if self.normalize:
                # torch.nn.functional.normalize's: x / max(‖x‖, 1e-12)
                norms = np.linalg.norm(out, axis=-1, keepdims=True)
                out = out / np.maximum(norms, 1e-12)
        if self.spec.precision == "int8" and self.ranges is None:
            if self.calibrating:
                return out
            # No calibration pass ran (serve and worker refuse int8 without ranges; run's
            # first records were all error records): this batch's ranges, for good.
            self.calibrate(out)
        return quantize(out, self.spec.precision, self.ranges)

    @property
    def needs_ranges(self) -> bool:
        return self.spec.precision == "int8" and self.ranges is None

    def calibrate(self, sample: np.ndarray) -> None:
        """int8 ranges from these (cut, normalised) embeddings, once for the whole job."""
        with self._lock:  # replica results arrive on the event loop; a lock costs nothing
            if self.ranges is not None:
                return
            if len(sample) < _FEW_CALIBRATION_ROWS:
                log.warning(
                    "int8 ranges from %d embeddings: rough; give --embedding-ranges "
                    "(the _manifest.json of a larger job will do)",
                    len(sample),
                )
            self.ranges = np.vstack((sample.min(axis=0), sample.max(axis=0))).astype(np.float32)
            self.ranges_from = "the job's first records"

    def use_ranges(self, ranges: np.ndarray, source: str) -> None:
        """Ranges found elsewhere (an earlier run's, for --resume)."""
        self.ranges, self.ranges_from = ranges, source

    def describe(self) -> dict[str, Any]:
        """What a reader needs to interpret the embeddings: manifest and Parquet metadata."""
        return {
            "type": str(self.arrow_type()),
            "pooling": self.pooling,
            "normalize": self.normalize,
            "model_dim": self.model_dim,
            "dim": self.dim,
            "precision": self.spec.precision,
            "binary_packing": "numpy packbits of (x > 0), big-endian bits, uint8"
            if self.spec.precision == "binary"
            else None,
            "ranges": None if self.ranges is None else self.ranges.tolist(),
            "ranges_from": self.ranges_from,
        }


def model_dim(config_path: str) -> int:
    """The model's hidden size from its config.json (the pooled embedding's dimension)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{config_path}: not a readable model config: {e}") from None
    for key in ("hidden_size", "dim", "d_model", "n_embd"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value >= 1:
            return value
    raise UsageError(f"{config_path}: no hidden_size: can't tell the embedding's dimension")

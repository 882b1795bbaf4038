"""The compiled artifact: a directory that `run`, `worker` and `serve` load.

batchjob.json        task, backend, dtype, strategy, shapes (batch size per bucket),
                     labels, pooling, library versions, and the SHA-256 of every other file
graph_<S>.pt         one traced graph per compiled sequence length S
weights.pt           cpu backend: the weights of all the graphs, once (a Neuron graph holds
                     its own); every replica maps it read-only, so the kernel keeps one copy
                     in memory for all of them
tokenizer/           the tokenizer, saved with save_pretrained
config.json          the model's config

Loading checks every field and every checksum once, in the parent process, before anything
starts; the replicas load only the graphs of that verified artifact and don't hash again.
The checksums catch corruption and swapped files, not malice: whoever can write a graph can
rewrite batchjob.json too, and a graph is code (TorchScript runs what it holds). An artifact
is never changed once published; a replica maps its weights file, which must stay as it is
while replicas run (written over, a mapped file changes under them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from batchjob.artifact_manifest import FORMAT_VERSION, MANIFEST, graph_name, read_manifest
from batchjob.batching import Shape
from batchjob.errors import BatchJobError, UsageError
from batchjob.replica_process import Predict

if TYPE_CHECKING:
    import torch

log = logging.getLogger("batchjob.artifact")

BUCKET_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PACKED_INPUTS = ("input_ids", "position_ids", "token_type_ids", "segment_ids", "segment_index")

# A file's identity without reading it: device, inode, size, mtime and ctime (ns). A write
# changes mtime and ctime, so a file whose stamp is unchanged since it was hashed needs no
# second hashing in this process; unless it was written so recently that a second write
# could land in the same clock tick (the "racily clean" files of git): those are hashed again.
Stamp = tuple[int, int, int, int, int]
RACY_NS = 2_000_000_000  # coarser than any filesystem's timestamps (FAT's are 2 s)
_verified: dict[str, tuple[frozenset[tuple[str, str]], dict[str, Stamp]]] = {}
_verified_lock = threading.Lock()


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
    weights: str | None = None  # the weights file (cpu backend), relative to path

    @property
    def max_length(self) -> int:
        return self.shapes[-1].seq_len

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.path, "tokenizer")

    def graph_path(self, shape: Shape) -> str:
        return os.path.join(self.path, graph_name(shape))

    @property
    def weights_path(self) -> str | None:
        return os.path.join(self.path, self.weights) if self.weights else None

    def save(self) -> None:
        """Write batchjob.json, with the SHA-256 of every file now in the directory."""
        data = {"format_version": FORMAT_VERSION, **asdict(self)}
        del data["path"]
        data["shapes"] = [
            {"seq_len": s.seq_len, "batch_size": s.batch_size, "graph": graph_name(s)}
            for s in self.shapes
        ]
        data["files"] = file_checksums(self.path)
        with open(os.path.join(self.path, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")


def write_weights(weights: Mapping[str, torch.Tensor], path: str) -> None:
    """The weights file: torch.save's zip, whose tensors start on 64-byte boundaries, as
    `torch.load(mmap=True)` maps them."""
    import torch

    torch.save(dict(sorted(weights.items())), path)


def map_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, mapped rather than read (MAP_PRIVATE of the file): the
    page cache holds one copy of each page for every process that maps it. weights_only:
    tensors only, no pickled code."""
    import torch

    weights = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise BatchJobError(f"{path}: not a weights file (a dict of named tensors)")
    return weights


def is_artifact(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def load_artifact(path: str) -> Artifact:
    """The artifact at `path`, its fields checked and its files verified (UsageError if not)."""
    return _load_verified(path)[0]


def _load_verified(path: str) -> tuple[Artifact, dict[str, Stamp]]:
    manifest = read_manifest(path)
    return Artifact(path=path, **manifest.fields), verify_files(path, manifest.files)


def file_checksums(root: str) -> dict[str, str]:
    """SHA-256 of every file under `root` but batchjob.json, by path relative to it."""
    names = _files_under(root)
    return dict(zip(names, _sha256_all(root, names), strict=True))


def verify_files(root: str, expected: dict[str, str]) -> dict[str, Stamp]:
    """Every listed file exists and has its checksum, and no file is left unlisted.
    Returns the stamps of the files as verified."""
    for name in sorted(expected):
        if not os.path.isfile(os.path.join(root, name)):
            raise UsageError(f"{os.path.join(root, name)}: missing (listed in {MANIFEST})")
    for name in _files_under(root):
        if name not in expected:
            raise UsageError(
                f"{os.path.join(root, name)}: not listed in {MANIFEST}; an artifact holds "
                "only the files it lists"
            )
    names = sorted(expected)
    stamped_at = time.time_ns()
    stamps = {name: file_stamp(os.path.join(root, name)) for name in names}  # before hashing
    key, listed = os.path.realpath(root), frozenset(expected.items())
    with _verified_lock:
        if _verified.get(key) == (listed, stamps):
            return stamps
    started = time.monotonic()
    for name, digest in zip(names, _sha256_all(root, names), strict=True):
        if digest != expected[name]:
            raise UsageError(
                f"{os.path.join(root, name)}: SHA-256 {digest[:12]}... does not match "
                f"{MANIFEST} ({expected[name][:12]}...): not the file this artifact was "
                "compiled with"
            )
    size = sum(stamp[2] for stamp in stamps.values())
    log.debug(
        "%.2fs verified the SHA-256 of %d files (%.1f MB) of %s",
        time.monotonic() - started,
        len(names),
        size / 1e6,
        root,
    )
    if all(stamp[3] < stamped_at - RACY_NS for stamp in stamps.values()):
        with _verified_lock:
            _verified[key] = (listed, stamps)
    return stamps


def file_stamp(path: str) -> Stamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _files_under(root: str) -> list[str]:
    """Relative paths ('/'-separated) of the files under `root`, hidden ones and the
    manifest left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if not name.startswith(".") and rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _sha256_all(root: str, names: list[str]) -> list[str]:
    """Streamed (files may be GBs), several files at once: hashlib releases the GIL."""
    paths = [os.path.join(root, name) for name in names]
    workers = min(len(paths), len(os.sched_getaffinity(0)), 8)
    if workers <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(workers, thread_name_prefix="sha256") as pool:
        return list(pool.map(_sha256, paths))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True, init=False)
class ArtifactLoader:
    """Picklable: made in the parent from the verified artifact; each replica process calls
    it once to load exactly the graphs that artifact lists, without hashing them again."""

    artifact: Artifact
    graph_stamps: tuple[Stamp, ...]  # per shape: its graph's file as verified
    weights_stamp: Stamp | None  # the weights file as verified, where there is one

    def __init__(self, artifact: Artifact | str) -> None:
        path = artifact if isinstance(artifact, str) else artifact.path
        verified, stamps = _load_verified(path)  # no hashing if unchanged since verified
        if isinstance(artifact, Artifact) and artifact != verified:
            raise UsageError(f"{os.path.join(path, MANIFEST)}: changed since it was loaded")
        object.__setattr__(self, "artifact", verified)
        graph_stamps = tuple(stamps[graph_name(s)] for s in verified.shapes)
        object.__setattr__(self, "graph_stamps", graph_stamps)
        weights_stamp = stamps[verified.weights] if verified.weights else None
        object.__setattr__(self, "weights_stamp", weights_stamp)

    def __call__(self) -> Predict:
        import torch

        from batchjob.backends import get_backend

        artifact = self.artifact
        backend = get_backend(artifact.backend)
        weights: dict[str, torch.Tensor] = {}
        if artifact.weights_path is not None and self.weights_stamp is not None:
            _unchanged(artifact.weights_path, self.weights_stamp)
            weights = map_weights(artifact.weights_path)  # one mapping for every graph
        graphs = {}
        for shape, stamp in zip(artifact.shapes, self.graph_stamps, strict=True):
            path = artifact.graph_path(shape)
            _unchanged(path, stamp)
            graphs[shape.seq_len] = backend.load(path, weights)
        names = PACKED_INPUTS if artifact.strategy == "packing" else BUCKET_INPUTS

        def predict(arrays: dict[str, np.ndarray]) -> np.ndarray:
            inputs = [torch.from_numpy(arrays[name]) for name in names]
            with torch.inference_mode():
                out: torch.Tensor = graphs[inputs[0].shape[1]](*inputs)
            # Packed graphs answer (B, K, ...): one output row per segment slot.
            return out.float().flatten(0, 1).numpy() if out.dim() > 2 else out.float().numpy()

        # No warm-up: a frozen graph's first two calls (it profiles, then optimises itself) are
        # ~0.1 s slower than later ones, and the first real batches pay that, where two dummy
        # batches per shape cost two full batches' time before ready (2 s for bert-base).
        return predict


def _unchanged(path: str, stamp: Stamp) -> None:
    try:
        same = file_stamp(path) == stamp
    except OSError:
        same = False
    if not same:
        raise BatchJobError(f"{path}: changed since the artifact was verified")

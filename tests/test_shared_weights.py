"""One copy of the weights (cpu backend): the graphs of an artifact hold none, its one weights
file holds them all, and every replica maps that file, so the kernel keeps one copy of its
pages for all of them. The file is verified like every other file of the artifact."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from batchjob.artifact import BUCKET_INPUTS, ArtifactLoader, load_artifact, map_weights
from batchjob.artifact_manifest import WEIGHTS_FILE
from batchjob.backends.cpu import (
    BACKEND,
    MIN_SHARED_BYTES,
    WEIGHT_NAMES,
    with_private_weights,
)
from batchjob.errors import BatchJobError
from batchjob.replica_process import Placement
from batchjob.replicas import ReplicaPool
from tests.artifact_edits import assert_refused, backdate, copy_artifact, read, run_cli
from tests.conftest import CompileFn
from tests.replica_fakes import all_ready

pytestmark = pytest.mark.timeout(120)


def mapped(pid: int | str, path: str) -> dict[str, int]:
    """Rss, Pss and Private_Dirty (kB) of `pid`'s mappings of the file at `path`."""
    target, sums = os.path.realpath(path), {"Rss": 0, "Pss": 0, "Private_Dirty": 0}
    inside = False
    with open(f"/proc/{pid}/smaps", encoding="utf-8") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: range perms ... path
                inside = line.rstrip("\n").endswith(" " + target)
            elif inside and (field := line.split(":")[0]) in sums:
                sums[field] += int(line.split()[1])
    return sums


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges where this process maps the file at `path`."""
    target, ranges = os.path.realpath(path), []
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            if line.rstrip("\n").endswith(" " + target):
                low, high = line.split()[0].split("-")
                ranges.append((int(low, 16), int(high, 16)))
    return ranges


def test_every_graph_uses_the_one_copy_in_the_weights_file(
    classifier_dir: Path, compiled: CompileFn
) -> None:
    artifact = compiled(classifier_dir)  # buckets 16 and 32
    root = Path(artifact.path)
    assert artifact.weights == WEIGHTS_FILE
    assert WEIGHTS_FILE in read(root)["files"]
    weights_size = (root / WEIGHTS_FILE).stat().st_size
    for shape in artifact.shapes:
        graph = artifact.graph_path(shape)
        # No tensor worth sharing is stored in a graph: its code and small constants only.
        with zipfile.ZipFile(graph) as archive:
            stored = {i.filename: i.file_size for i in archive.infolist()}
        tensors = {
            name: size for name, size in stored.items() if re.search(r"/(data|constants)/", name)
        }
        assert tensors, stored  # the small constants
        assert max(tensors.values()) < MIN_SHARED_BYTES, tensors
        assert os.path.getsize(graph) < weights_size / 20

    # Loaded, every graph's weights are the tensors of the one mapping of the file.
    weights = map_weights(str(root / WEIGHTS_FILE))
    ranges = mapped_ranges(str(root / WEIGHTS_FILE))
    assert ranges, "the weights file is mapped, not read"
    used: list[set[str]] = []
    for shape in artifact.shapes:
        graph = BACKEND.load(artifact.graph_path(shape), weights)
        names = set(graph._c.getattr(WEIGHT_NAMES))
        for name in names:
            pointer = graph._c.getattr(name).data_ptr()
            assert pointer == weights[name].data_ptr()
            assert any(low <= pointer < high for low, high in ranges)
        used.append(names)
    # The bucket graphs are one model at different lengths: they share every weight, and the
    # file holds nothing else.
    assert used[0] == used[1] == set(weights)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    assert total <= weights_size <= 1.1 * total


async def _replica_mappings(loader: ArtifactLoader, path: str) -> list[dict[str, int]]:
    cpus = sorted(os.sched_getaffinity(0))
    placements = [Placement(i, (cpus[i % len(cpus)],)) for i in range(2)]
    before = set(multiprocessing.active_children())
    async with ReplicaPool(loader, placements) as pool:
        await all_ready(pool)
        arrays = {n: np.ones((4, 16), np.int64) for n in BUCKET_INPUTS}
        await asyncio.gather(*(pool.run(arrays) for _ in range(4)))
        replicas = [p for p in multiprocessing.active_children() if p not in before]
        assert len(replicas) == 2
        return [mapped(p.pid, path) for p in replicas if p.pid is not None]


def test_two_replicas_share_the_pages_of_the_weights(
    classifier_dir: Path, compiled: CompileFn
) -> None:
    artifact = compiled(classifier_dir)
    path = str(Path(artifact.path) / WEIGHTS_FILE)
    replicas = asyncio.run(_replica_mappings(ArtifactLoader(artifact.path), path))
    assert len(replicas) == 2
    for memory in replicas:
        assert memory["Rss"] > 0, "each replica maps the weights file"
        assert memory["Private_Dirty"] == 0, "no replica has a private copy of a page"
    # A page both map counts half in each one's Pss: private copies would count whole.
    rss, pss = sum(m["Rss"] for m in replicas), sum(m["Pss"] for m in replicas)
    assert pss <= 0.6 * rss, replicas


def test_a_tampered_weights_file_is_refused(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    with (root / WEIGHTS_FILE).open("r+b") as f:
        f.seek(-100, os.SEEK_END)  # inside the last tensor's data, not the zip's directory
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    done, out = run_cli(root, tmp_path)
    assert_refused(done, out, f"{root}/{WEIGHTS_FILE}: SHA-256", "does not match")


def test_a_replica_refuses_weights_changed_since_they_were_verified(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    backdate(root)
    loader = pickle.loads(pickle.dumps(ArtifactLoader(str(root))))
    (root / WEIGHTS_FILE).write_bytes((root / WEIGHTS_FILE).read_bytes())  # same bytes, rewritten
    with pytest.raises(BatchJobError, match=re.escape(f"{root}/{WEIGHTS_FILE}: changed since")):
        loader()


def test_a_graph_needs_its_weights(classifier_dir: Path, compiled: CompileFn) -> None:
    artifact = load_artifact(compiled(classifier_dir).path)
    graph = artifact.graph_path(artifact.shapes[0])
    with pytest.raises(BatchJobError, match=re.escape(f"{graph}: needs weight_")):
        BACKEND.load(graph, {})


def test_weights_as_constants_is_the_same_model_with_its_own_copy(
    classifier_dir: Path, compiled: CompileFn
) -> None:
    """The bench's A/B (format 2's way): each graph frozen again with a private copy of its
    weights as constants computes what the graph on the mapped weights computes."""
    artifact = compiled(classifier_dir)
    weights = map_weights(str(Path(artifact.path) / WEIGHTS_FILE))
    ranges = mapped_ranges(str(Path(artifact.path) / WEIGHTS_FILE))
    rng = np.random.default_rng(0)
    for shape in artifact.shapes:
        path = artifact.graph_path(shape)
        shared, constants = (
            BACKEND.load(path, weights),
            with_private_weights(BACKEND.load(path, weights)),
        )
        assert not [n for n in constants.graph.nodes() if n.kind() == "prim::GetAttr"]
        folded = [
            n.t("value")
            for n in constants.graph.nodes()
            if n.kind() == "prim::Constant" and n.output().type().kind() == "TensorType"
        ]
        large = [t for t in folded if t.numel() * t.element_size() >= MIN_SHARED_BYTES]
        assert len(large) == len(set(shared._c.getattr(WEIGHT_NAMES))) > 0
        for tensor in large:  # a copy of its own, not a page of the mapped file
            assert not any(low <= tensor.data_ptr() < high for low, high in ranges)
        b, s = shape.batch_size, shape.seq_len
        inputs = (
            torch.from_numpy(rng.integers(5, 100, size=(b, s))),
            torch.ones(b, s, dtype=torch.int64),
            torch.zeros(b, s, dtype=torch.int64),
        )
        with torch.inference_mode():
            torch.testing.assert_close(constants(*inputs), shared(*inputs), rtol=0, atol=0)

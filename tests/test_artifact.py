"""The artifact is checked before anything runs: every field of batchjob.json for type and
range, every file against its SHA-256 (once, in the parent), and compiles into the cache
are atomic, also when two processes compile one model at once or one is killed halfway."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import batchjob.artifact as artifact_mod
import batchjob.compile as compile_mod
from batchjob.artifact import ArtifactLoader, is_artifact, load_artifact
from batchjob.artifact_manifest import FORMAT_VERSION
from batchjob.batching import Shape
from batchjob.compile import _cache_key, ensure_artifact
from batchjob.config import CompileSpec
from batchjob.errors import BatchJobError, UsageError
from batchjob.staging import ABANDONED_STAGING_SECONDS
from tests.artifact_edits import (
    Manifest,
    assert_refused,
    backdate,
    copy_artifact,
    edit,
    read,
    run_cli,
    usage_error,
)
from tests.conftest import CompileFn

SMALL = (Shape(8, 2),)
PACKED = (Shape(32, 2),)


# --- checksums --------------------------------------------------------------------------


def test_manifest_records_the_sha256_of_every_file(
    classifier_dir: Path, compiled: CompileFn
) -> None:
    root = Path(compiled(classifier_dir).path)
    files = read(root)["files"]
    on_disk = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != "batchjob.json"
    )
    assert sorted(files) == on_disk
    assert {"graph_16.pt", "graph_32.pt", "config.json", "tokenizer/tokenizer.json"} <= set(files)
    for name, digest in files.items():
        assert digest == hashlib.sha256((root / name).read_bytes()).hexdigest(), name


def test_a_swapped_graph_is_refused_by_run(
    classifier_dir: Path, embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    """Observed: another TorchScript module in place of a graph loaded silently, exit 0."""
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    shutil.copy(Path(compiled(embedder_dir).path) / "graph_16.pt", root / "graph_16.pt")
    done, out = run_cli(root, tmp_path)
    assert_refused(done, out, f"{root}/graph_16.pt", "SHA-256", "does not match")


def _flip_a_byte(root: Path) -> str:
    path = root / "tokenizer" / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "tokenizer/tokenizer.json: SHA-256"


def _remove_a_graph(root: Path) -> str:
    (root / "graph_32.pt").unlink()
    return "graph_32.pt: missing (listed in batchjob.json)"


def _add_a_graph(root: Path) -> str:
    shutil.copy(root / "graph_16.pt", root / "graph_64.pt")
    return "graph_64.pt: not listed in batchjob.json"


def _add_a_tokenizer_file(root: Path) -> str:
    (root / "tokenizer" / "added_tokens.json").write_text('{"zzz": 30522}')
    return "tokenizer/added_tokens.json: not listed in batchjob.json"


def _edit_config(root: Path) -> str:
    config = json.loads((root / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (root / "config.json").write_text(json.dumps(config))
    return "config.json: SHA-256"


@pytest.mark.parametrize(
    "damage", [_flip_a_byte, _remove_a_graph, _add_a_graph, _add_a_tokenizer_file, _edit_config]
)
def test_damaged_artifact_is_refused_naming_the_file(
    damage: Callable[[Path], str], classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    backdate(root)
    load_artifact(str(root))  # whole: fine, and remembered as verified
    needle = damage(root)
    message = usage_error(root)
    assert message.startswith(f"{root}/"), message
    assert needle in message, message


def test_hidden_files_are_ignored(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    (root / ".DS_Store").write_text("x")
    (root / ".snapshot").mkdir()
    (root / ".snapshot" / "graph_16.pt").write_text("x")
    assert load_artifact(str(root)).path == str(root)


def test_verified_once_in_the_parent_never_in_a_replica(
    classifier_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchjob.artifact")
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    hashed: list[str] = []
    original = artifact_mod._sha256

    def counting(path: str) -> str:
        hashed.append(os.path.relpath(path, root))
        return original(path)

    monkeypatch.setattr(artifact_mod, "_sha256", counting)
    files = sorted(read(root)["files"])
    # Files written just now can't be trusted by their stamp (a second write could land in
    # the same clock tick): every load hashes them.
    for p in root.rglob("*"):
        os.utime(p)
    load_artifact(str(root))
    load_artifact(str(root))
    assert sorted(hashed) == sorted(files * 2)

    # Settled files: hashed once, then known by their stamps.
    backdate(root)
    hashed.clear()
    artifact = load_artifact(str(root))
    assert sorted(hashed) == files
    assert any(re.match(r"[\d.]+s verified the SHA-256 of \d+ files", m) for m in caplog.messages)

    # The pool's loader is made in the parent from the verified artifact: no second hashing.
    loader = ArtifactLoader(artifact.path)
    assert ArtifactLoader(artifact) == loader
    assert sorted(hashed) == files

    # In the replica (a pickled copy), hashing is never called.
    def refuse(path: str) -> str:
        raise AssertionError(f"a replica hashed {path}")

    monkeypatch.setattr(artifact_mod, "_sha256", refuse)
    predict = pickle.loads(pickle.dumps(loader))()
    assert predict({n: np.zeros((4, 16), np.int64) for n in artifact_mod.BUCKET_INPUTS}).shape == (
        4,
        3,
    )


def test_a_replica_loads_only_what_was_verified(
    classifier_dir: Path, embedder_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    backdate(root)
    loader = pickle.loads(pickle.dumps(ArtifactLoader(str(root))))

    # batchjob.json rewritten after verification to drop a shape: the replica doesn't read it.
    edit(root, lambda d: d.update(shapes=d["shapes"][:1]))
    predict = loader()
    assert predict({n: np.zeros((2, 32), np.int64) for n in artifact_mod.BUCKET_INPUTS}).shape == (
        2,
        3,
    )

    # A graph replaced after verification (its checksum rewritten too): refused, not loaded.
    other = Path(compiled(embedder_dir).path) / "graph_32.pt"
    shutil.copy(other, root / "graph_32.pt")
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    edit(root, lambda d: d["files"].update({"graph_32.pt": digest}))
    with pytest.raises(BatchJobError, match=re.escape(f"{root}/graph_32.pt: changed since")):
        loader()


def test_a_loader_refuses_an_artifact_that_changed_since_it_was_loaded(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    artifact = load_artifact(str(root))
    edit(root, lambda d: d.update(labels=["x", "y", "z"]))
    with pytest.raises(UsageError, match="changed since it was loaded"):
        ArtifactLoader(artifact)


# What an artifact of an older format lacks: 1 had no checksums, 2 a copy of the weights in
# every graph (and no field `weights`).
OLDER_FORMATS = {1: ("files", "weights"), 2: ("weights",)}


@pytest.mark.parametrize("version", sorted(OLDER_FORMATS))
def test_an_older_format_is_refused(
    version: int, classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "artifact")
    edit(root, lambda d: [d.update(format_version=version), *map(d.pop, OLDER_FORMATS[version])])
    expected = (
        f"{root}/batchjob.json: artifact format {version}, this batchjob reads {FORMAT_VERSION} "
        "(one copy of the weights for all graphs); compile the model again"
    )
    assert usage_error(root) == expected
    done, out = run_cli(root, tmp_path)
    assert_refused(done, out, expected)


def test_a_damaged_cached_compile_is_refused(
    classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = CompileSpec(model=str(classifier_dir), shapes=SMALL, dtype="fp32")
    cache = tmp_path / "cache"
    path = Path(ensure_artifact(spec, str(cache)).path)
    with (path / "graph_8.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UsageError) as info:
        ensure_artifact(spec, str(cache))
    message = str(info.value)
    assert message.startswith(f"{path}/graph_8.pt: SHA-256"), message
    assert message.endswith(f"(a cached compile: delete {path} to compile again)")


def test_cache_keys_change_with_the_format(
    classifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An artifact cached by an older format is never taken: it is compiled again."""
    spec = CompileSpec(model=str(classifier_dir), shapes=SMALL)
    now = _cache_key(spec)
    monkeypatch.setattr(compile_mod, "FORMAT_VERSION", FORMAT_VERSION - 1)
    assert _cache_key(spec) != now


# --- fields of batchjob.json ------------------------------------------------------------


def _shape0(key: str, value: object) -> Callable[[Manifest], object]:
    return lambda d: d["shapes"][0].update({key: value})


# case → (on a packed artifact?, the change, the field the refusal must name)
OBSERVED: dict[str, tuple[bool, Callable[[Manifest], object], str]] = {
    "task-summarization": (False, lambda d: d.update(task="summarization"), "task"),
    "strategy-magic": (False, lambda d: d.update(strategy="magic"), "strategy"),
    "max-segments-0": (True, lambda d: d.update(max_segments=0), "max_segments"),
    "shapes-empty": (False, lambda d: d.update(shapes=[]), "shapes"),
    "position-offset-negative": (True, lambda d: d.update(position_offset=-5), "position_offset"),
    "batch-size-string": (False, _shape0("batch_size", "8"), "shapes[0].batch_size"),
    "batch-size-float": (False, _shape0("batch_size", 8.7), "shapes[0].batch_size"),
}


@pytest.mark.parametrize("case", list(OBSERVED))
def test_bad_field_is_refused_by_run_before_anything_is_written(
    case: str,
    classifier_dir: Path,
    embedder_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
) -> None:
    packed, change, name = OBSERVED[case]
    source = compiled(embedder_dir, shapes=PACKED, packing=True) if packed else None
    source = source or compiled(classifier_dir)
    root = edit(copy_artifact(source.path, tmp_path / "artifact"), change)
    done, out = run_cli(root, tmp_path)
    assert_refused(done, out, f"{root}/batchjob.json: field {name} must be ")


def _drop(key: str) -> Callable[[Manifest], object]:
    return lambda d: d.pop(key)


# change → the message after "<root>/batchjob.json: " (classifier artifact, 16x4 and 32x2)
BAD_FIELDS: list[tuple[Callable[[Manifest], object], str]] = [
    (lambda d: d.update(task="summarization"), "field task must be one of "),
    (_shape0("batch_size", True), "field shapes[0].batch_size must be an integer ≥ 1, got true"),
    (_shape0("batch_size", 0), "field shapes[0].batch_size must be an integer ≥ 1, got 0"),
    (_shape0("batch_size", "8"), 'field shapes[0].batch_size must be an integer ≥ 1, got "8"'),
    (_shape0("batch_size", 8.7), "field shapes[0].batch_size must be an integer ≥ 1, got 8.7"),
    (_shape0("seq_len", 1), "field shapes[0].seq_len must be an integer ≥ 2, got 1"),
    (
        lambda d: d["shapes"][1].update(seq_len=16),
        "field shapes[1].seq_len must be greater than shapes[0].seq_len 16",
    ),
    (_shape0("graph", "graph_32.pt"), 'field shapes[0].graph must be "graph_16.pt"'),
    (lambda d: d["shapes"][0].pop("graph"), "field shapes[0] must be an object with exactly"),
    (lambda d: d.update(shapes={"seq_len": 16}), "field shapes must be a non-empty list"),
    (
        lambda d: d.update(backend="gpu"),
        'field backend must be one of cpu, neuron, neuronx, got "gpu"',
    ),
    (lambda d: d.update(dtype="fp16"), 'field dtype must be one of fp32, bf16, got "fp16"'),
    (lambda d: d.update(max_segments=2), "field max_segments must be 1 for strategy buckets"),
    (lambda d: d.update(position_offset=2), "field position_offset must be 0 for strategy"),
    (lambda d: d.update(labels="negative"), "field labels must be a list of strings"),
    (lambda d: d.update(labels=["a", 2, "c"]), "field labels[1] must be a string, got 2"),
    (
        lambda d: d.update(labels=["a"]),
        "field labels must be at least 2 labels for function_to_apply softmax",
    ),
    (
        lambda d: d.update(labels=[], function_to_apply="sigmoid"),
        "field labels must be at least 1 label",
    ),
    (lambda d: d.update(function_to_apply="relu"), "field function_to_apply must be one of "),
    (
        lambda d: d.update(pooling="mean"),
        'field pooling must be null for task text-classification, got "mean"',
    ),
    (
        lambda d: d.update(task="feature-extraction"),
        "field labels must be empty for task feature-extraction",
    ),
    (lambda d: d.update(normalize="yes"), 'field normalize must be true or false, got "yes"'),
    (lambda d: d.update(source_model=None), "field source_model must be a string, got null"),
    (lambda d: d.update(compiler_args=[1]), "field compiler_args[0] must be a string, got 1"),
    (lambda d: d.update(versions={"torch": 2}), 'field versions["torch"] must be a string, got 2'),
    (
        lambda d: d.update(max_abs_diff_vs_eager=-1.0),
        "field max_abs_diff_vs_eager must be a number ≥ 0",
    ),
    (
        lambda d: d.update(max_abs_diff_vs_eager="0"),
        "field max_abs_diff_vs_eager must be a number ≥ 0",
    ),
    (lambda d: d.update(colour="blue"), "unknown field colour"),
    (_drop("pooling"), "field pooling is missing"),
    (_drop("files"), "field files is missing"),
    (lambda d: d.update(files={}), "field files must be an object of relative path"),
    (lambda d: d["files"].pop("graph_32.pt"), "field files must list graph_32.pt"),
    (
        lambda d: d["files"].update({"graph_64.pt": "0" * 64}),
        "field files lists graph_64.pt, which no shape uses",
    ),
    (
        lambda d: d["files"].update({"../x": "0" * 64}),
        'field files["../x"]: not a path inside the artifact',
    ),
    (
        lambda d: d["files"].update({"/etc/passwd": "0" * 64}),
        'field files["/etc/passwd"]: not a path',
    ),
    (
        lambda d: d["files"].update({"config.json": "ABC"}),
        'field files["config.json"] must be a SHA-256',
    ),
    (lambda d: d.update(format_version="2"), 'artifact format "2", this batchjob reads'),
    (_drop("weights"), "field weights is missing"),
    (
        lambda d: d.update(weights=None),
        'field weights must be "weights.pt" for backend cpu, got null',
    ),
    (
        lambda d: d.update(weights="graph_16.pt"),
        'field weights must be "weights.pt" for backend cpu, got "graph_16.pt"',
    ),
    (
        lambda d: d.update(backend="neuronx"),
        'field weights must be null for backend neuronx, got "weights.pt"',
    ),
    (
        lambda d: d["files"].pop("weights.pt"),
        "field files must list weights.pt, the weights file",
    ),
]


@pytest.mark.parametrize(("change", "expected"), BAD_FIELDS, ids=[e for _, e in BAD_FIELDS])
def test_every_field_is_checked(
    change: Callable[[Manifest], object],
    expected: str,
    classifier_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
) -> None:
    root = edit(copy_artifact(compiled(classifier_dir).path, tmp_path / "a"), change)
    message = usage_error(root)
    assert message.startswith(f"{root}/batchjob.json: {expected}"), message


POOLING_CHOICES = (
    "one of cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken (or several, '+')"
)

PACKED_FIELDS: list[tuple[Callable[[Manifest], object], str]] = [
    (
        lambda d: d.update(max_segments=0),
        "field max_segments must be an integer from 1 to seq_len 32, got 0",
    ),
    (
        lambda d: d.update(max_segments=33),
        "field max_segments must be an integer from 1 to seq_len 32",
    ),
    (
        lambda d: d.update(position_offset=-5),
        "field position_offset must be an integer ≥ 0, got -5",
    ),
    (lambda d: d.update(pooling="sum"), f'field pooling must be {POOLING_CHOICES}, got "sum"'),
    (
        lambda d: d.update(pooling="cls+sum"),
        f'field pooling must be {POOLING_CHOICES}, got "cls+sum"',
    ),
    (lambda d: d.update(pooling=None), f"field pooling must be {POOLING_CHOICES}, got null"),
    (lambda d: d.update(function_to_apply="softmax"), 'field function_to_apply must be "none"'),
    (
        lambda d: d.update(
            shapes=[*d["shapes"], {"seq_len": 64, "batch_size": 1, "graph": "graph_64.pt"}]
        ),
        "field shapes must be one shape for strategy packing",
    ),
]


@pytest.mark.parametrize(("change", "expected"), PACKED_FIELDS, ids=[e for _, e in PACKED_FIELDS])
def test_packing_fields_are_checked(
    change: Callable[[Manifest], object],
    expected: str,
    embedder_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
) -> None:
    source = compiled(embedder_dir, shapes=PACKED, packing=True)
    root = edit(copy_artifact(source.path, tmp_path / "a"), change)
    message = usage_error(root)
    assert message.startswith(f"{root}/batchjob.json: {expected}"), message


def test_a_packed_artifact_loads(embedder_dir: Path, compiled: CompileFn) -> None:
    artifact = load_artifact(compiled(embedder_dir, shapes=PACKED, packing=True).path)
    assert (artifact.strategy, artifact.shapes, artifact.pooling) == ("packing", PACKED, "mean")
    assert 1 <= artifact.max_segments <= 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not a readable artifact manifest: "),
        (
            '{"task": "a", "task": "b"}',
            "not a readable artifact manifest: field task appears twice",
        ),
        ("[1, 2]", "must be a JSON object, got [1, 2]"),
    ],
)
def test_unreadable_manifest(
    text: str, expected: str, classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    root = copy_artifact(compiled(classifier_dir).path, tmp_path / "a")
    (root / "batchjob.json").write_text(text)
    assert usage_error(root).startswith(f"{root}/batchjob.json: {expected}")


# --- compiles into the cache ------------------------------------------------------------

# Compiles SMALL into the cache; its first trace waits (up to a minute) until `barrier` holds
# `wait_for` files, one per process that got that far: with 2, both are sure to compile.
COMPILE = """
import logging, os, sys, time
from pathlib import Path
from batchjob.backends.cpu import CpuBackend
from batchjob.batching import Shape
from batchjob.compile import ensure_artifact
from batchjob.config import CompileSpec

model, cache, barrier, wait_for, hang = sys.argv[1:6]
logging.basicConfig(level=logging.INFO)
original, traced = CpuBackend.trace, []

def trace(self, *args):
    traced.append(1)
    if len(traced) == 1:
        Path(barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(barrier)) < int(wait_for) and time.monotonic() < deadline:
            time.sleep(0.02)
    if len(traced) == 2 and hang == "hang":  # the first graph is in the staging dir
        Path(barrier, "hanging").touch()
        time.sleep(600)
    return original(self, *args)

CpuBackend.trace = trace
shapes = (Shape(8, 2), Shape(16, 1)) if hang == "hang" else (Shape(8, 2),)
spec = CompileSpec(model=model, shapes=shapes, dtype="fp32")
print(ensure_artifact(spec, cache).path)
"""


def start_compile(
    model: Path, cache: Path, barrier: Path, wait_for: int, hang: bool = False
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            COMPILE,
            str(model),
            str(cache),
            str(barrier),
            str(wait_for),
            "hang" if hang else "no",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_concurrent_cold_compiles_leave_one_artifact(classifier_dir: Path, tmp_path: Path) -> None:
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    procs = [start_compile(classifier_dir, cache, barrier, wait_for=2) for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    assert len(os.listdir(barrier)) == 2, "both processes must have compiled"
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert os.listdir(cache / "artifacts") == [path.name], "one artifact, no staging left"
    losers = [err for _, err in results if "another process compiled" in err]
    assert len(losers) == 1, [err for _, err in results]
    assert load_artifact(str(path)).shapes == SMALL


def test_a_killed_compile_leaves_nothing_a_later_run_takes(
    classifier_dir: Path, tmp_path: Path
) -> None:
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    proc = start_compile(classifier_dir, cache, barrier, wait_for=1, hang=True)
    try:
        deadline = time.monotonic() + 120
        while not (barrier / "hanging").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the compile never reached its second graph"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)

    spec = CompileSpec(model=str(classifier_dir), shapes=(Shape(8, 2), Shape(16, 1)), dtype="fp32")
    folder = cache / "artifacts"
    path = folder / _cache_key(spec)
    (abandoned,) = os.listdir(folder)
    assert abandoned.startswith(".compiling-")
    assert (folder / abandoned / "graph_8.pt").is_file(), "killed halfway: one graph written"
    assert not path.exists()
    assert not is_artifact(str(path))

    # The next run compiles again; the abandoned staging goes once old, a recent one stays.
    old = time.time() - ABANDONED_STAGING_SECONDS - 60
    for p in [folder / abandoned, *(folder / abandoned).rglob("*")]:
        os.utime(p, (old, old))
    (folder / ".compiling-live").mkdir()
    artifact = ensure_artifact(spec, str(cache))
    assert artifact.path == str(path)
    assert load_artifact(str(path)).shapes == spec.shapes
    assert sorted(os.listdir(folder)) == [".compiling-live", path.name]


def test_a_non_artifact_in_the_cache_is_refused_before_compiling(
    classifier_dir: Path, tmp_path: Path
) -> None:
    spec = CompileSpec(model=str(classifier_dir), shapes=SMALL, dtype="fp32")
    path = tmp_path / "cache" / "artifacts" / _cache_key(spec)
    path.mkdir(parents=True)
    (path / "graph_8.pt").write_text("half")
    with pytest.raises(UsageError, match=re.escape(f"{path}: in the compile cache but not")):
        ensure_artifact(spec, str(tmp_path / "cache"))

"""`batchjob compile` and the backends: artifact layout, faithfulness to the eager model,
errors, the compile cache, and the Neuron backends' SDK calls (through stand-ins)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import batchjob.compile as compile_mod
from batchjob.artifact import BUCKET_INPUTS, Artifact, ArtifactLoader, load_artifact
from batchjob.artifact_manifest import FORMAT_VERSION
from batchjob.backends import get_backend
from batchjob.backends.cpu import CpuBackend
from batchjob.batching import Shape
from batchjob.compile import (
    _cache_key,
    compile_artifact,
    ensure_artifact,
    example_inputs,
)
from batchjob.compile_plan import resolve_dtype
from batchjob.config import CompileSpec
from batchjob.errors import UsageError
from batchjob.models import infer_task, read_pooling
from tests.conftest import LABELS, CompileFn, cosine, make_texts
from tests.neuron_standins import StandInFinder, StandInSDK

SHAPES = (Shape(16, 4), Shape(32, 2))  # the `compiled` fixture's default
SMALL = (Shape(8, 2),)

# backend → (SDK module, flag added for fp32, user compiler args, user's own precision flag)
NEURON: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "neuron": (
        "torch_neuron",
        ["--fast-math", "none"],
        ["--neuroncore-pipeline-cores", "2"],
        ["--fast-math", "fp32-cast-matmult"],
    ),
    "neuronx": (
        "torch_neuronx",
        ["--auto-cast", "none"],
        ["--model-type", "transformer"],
        ["--auto-cast=matmult"],
    ),
}


# --- helpers ----------------------------------------------------------------------------


def manifest(artifact: Artifact | str) -> dict[str, Any]:
    path = artifact.path if isinstance(artifact, Artifact) else artifact
    data: dict[str, Any] = json.loads(Path(path, "batchjob.json").read_text())
    return data


def batch_for(artifact: Artifact, shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """Real texts, tokenized with the artifact's tokenizer and padded to exactly `shape`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifact.tokenizer_path)
    texts = ["fox", *make_texts(shape.batch_size - 1, seed=seed, max_words=shape.seq_len)]
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=shape.seq_len,
        return_tensors="np",
    )
    arrays = {name: encoded[name].astype(np.int64) for name in BUCKET_INPUTS}
    assert arrays["input_ids"].shape == (shape.batch_size, shape.seq_len)
    assert (arrays["attention_mask"] == 0).any(), "the batch must contain padding"
    return arrays


def eager_reference(model_dir: Path, task: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The Hugging Face model run on each row's real tokens alone, no padding."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = auto.from_pretrained(model_dir).eval()
    rows = []
    with torch.inference_mode():
        for i in range(arrays["input_ids"].shape[0]):
            n = int(arrays["attention_mask"][i].sum())
            ids = torch.from_numpy(arrays["input_ids"][i : i + 1, :n])
            types = torch.from_numpy(arrays["token_type_ids"][i : i + 1, :n])
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types)
            if task == "text-classification":
                rows.append(out.logits[0])
            else:
                mean = out.last_hidden_state[0].mean(dim=0)
                rows.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.stack(rows).float().numpy()


def copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


def install_standin(monkeypatch: pytest.MonkeyPatch, backend: str) -> StandInSDK:
    """The SDK stand-in in sys.modules, and as `torch.neuron` for torch-neuron."""
    sdk = StandInSDK(NEURON[backend][0])
    monkeypatch.setitem(sys.modules, sdk.name, sdk.module)
    if backend == "neuron":
        monkeypatch.setattr(torch, "neuron", sdk.module, raising=False)
    return sdk


def leftovers(parent: Path) -> list[str]:
    return sorted(name for name in os.listdir(parent) if name.startswith(".compiling-"))


@pytest.fixture(scope="module")
def plain_dir(embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertModel directory without the sentence-transformers files."""
    dst = tmp_path_factory.mktemp("plain") / "bert"
    return copy_model(embedder_dir, dst, skip=("modules.json", "1_Pooling"))


# --- artifact layout --------------------------------------------------------------------


def test_classifier_artifact_layout(classifier_dir: Path, compiled: CompileFn) -> None:
    import transformers

    artifact = compiled(classifier_dir)
    data = manifest(artifact)
    assert data["format_version"] == FORMAT_VERSION
    assert (data["task"], data["backend"], data["dtype"]) == ("text-classification", "cpu", "fp32")
    assert data["strategy"] == "buckets"
    assert data["shapes"] == [
        {"seq_len": 16, "batch_size": 4, "graph": "graph_16.pt"},
        {"seq_len": 32, "batch_size": 2, "graph": "graph_32.pt"},
    ]
    config = json.loads((classifier_dir / "config.json").read_text())
    assert data["labels"] == [config["id2label"][str(i)] for i in range(3)] == list(LABELS)
    assert data["function_to_apply"] == "softmax"
    assert data["pooling"] is None
    assert data["source_model"] == str(classifier_dir)
    assert data["compiler_args"] == []
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["transformers"] == transformers.__version__
    assert {"batchjob", "tokenizers"} <= set(data["versions"])
    assert 0 <= data["max_abs_diff_vs_eager"] <= 1e-4
    assert data["weights"] == "weights.pt"

    root = Path(artifact.path)
    assert sorted(p.name for p in root.iterdir()) == [
        "batchjob.json",
        "config.json",
        "graph_16.pt",
        "graph_32.pt",
        "prompts.json",  # the model's sentence-transformers prompts: none here
        "tokenizer",
        "weights.pt",
    ]
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    assert len(json.loads((root / "config.json").read_text())["id2label"]) == 3
    assert artifact.max_length == 32
    assert artifact.graph_path(Shape(16, 4)) == str(root / "graph_16.pt")
    assert leftovers(root.parent) == []


def test_embedder_artifact_layout(embedder_dir: Path, compiled: CompileFn) -> None:
    artifact = compiled(embedder_dir)
    data = manifest(artifact)
    assert data["task"] == "feature-extraction"
    assert data["pooling"] == "mean"
    assert data["normalize"] is True
    assert data["labels"] == []
    assert data["function_to_apply"] == "none"
    assert [s["graph"] for s in data["shapes"]] == ["graph_16.pt", "graph_32.pt"]
    assert (Path(artifact.path) / "graph_32.pt").is_file()


def test_load_artifact_round_trip(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir)
    assert load_artifact(artifact.path) == artifact
    root = tmp_path / "copy"
    shutil.copytree(artifact.path, root, ignore=shutil.ignore_patterns("batchjob.json"))
    copy = dataclasses.replace(artifact, path=str(root))
    copy.save()
    assert load_artifact(str(root)) == copy
    assert load_artifact(str(root)).shapes == SHAPES


# --- faithfulness to the eager model ----------------------------------------------------


@pytest.mark.parametrize("which", ["classifier", "embedder"])
def test_fp32_graphs_reproduce_the_eager_model(
    which: str, request: pytest.FixtureRequest, compiled: CompileFn
) -> None:
    model_dir: Path = request.getfixturevalue(f"{which}_dir")
    artifact = compiled(model_dir)
    predict = ArtifactLoader(artifact.path)()
    for shape in artifact.shapes:
        arrays = batch_for(artifact, shape, seed=shape.seq_len)
        got = predict(arrays)
        assert got.dtype == np.float32
        width = len(LABELS) if artifact.task == "text-classification" else 32
        assert got.shape == (shape.batch_size, width)
        expected = eager_reference(model_dir, artifact.task, arrays)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_pooling_is_read_from_the_model(embedder_dir: Path, tmp_path: Path) -> None:
    model = copy_model(embedder_dir, tmp_path / "cls-embedder")
    pooling_file = model / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_file.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling_file.write_text(json.dumps(pooling))

    artifact = compile_artifact(
        CompileSpec(model=str(model), shapes=SMALL, dtype="fp32", packing=False),
        str(tmp_path / "a"),
    )
    assert artifact.pooling == "cls"
    arrays = batch_for(artifact, SMALL[0])
    got = ArtifactLoader(artifact.path)()(arrays)

    from transformers import AutoModel

    eager = AutoModel.from_pretrained(model).eval()
    with torch.inference_mode():
        hidden = eager(
            input_ids=torch.from_numpy(arrays["input_ids"]),
            attention_mask=torch.from_numpy(arrays["attention_mask"]),
        ).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_read_pooling(embedder_dir: Path, plain_dir: Path, tmp_path: Path) -> None:
    assert read_pooling(str(embedder_dir), "auto") == "mean"
    assert read_pooling(str(plain_dir), "auto") == "mean"
    assert read_pooling(str(embedder_dir), "max") == "max"
    model = copy_model(embedder_dir, tmp_path / "m")
    pooling_file = model / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_file.read_text())
    # Every flag false is mean, as sentence-transformers reads it.
    pooling["pooling_mode_mean_tokens"] = False
    pooling_file.write_text(json.dumps(pooling))
    assert read_pooling(str(model), "auto") == "mean"
    pooling_file.write_text(json.dumps({"pooling_mode": "bogus"}))
    with pytest.raises(UsageError, match=r"config\.json: pooling_mode \"bogus\" is not supported"):
        read_pooling(str(model), "auto")


# --- bf16 on cpu ------------------------------------------------------------------------


def test_bf16_on_cpu(
    embedder_dir: Path, compiled: CompileFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights: list[set[torch.dtype]] = []
    original = CpuBackend.trace

    def spy(self: CpuBackend, module: torch.nn.Module, *args: Any) -> torch.jit.ScriptModule:
        weights.append({p.dtype for p in module.parameters()})
        return original(self, module, *args)

    monkeypatch.setattr(CpuBackend, "trace", spy)
    shape = SHAPES[0]
    artifact = compile_artifact(
        CompileSpec(model=str(embedder_dir), shapes=(shape,), dtype="bf16", packing=False),
        str(tmp_path / "a"),
    )
    assert weights == [{torch.bfloat16}]
    assert artifact.dtype == manifest(artifact)["dtype"] == "bf16"
    assert artifact.max_abs_diff_vs_eager is not None

    reference = compiled(embedder_dir)  # fp32
    arrays = batch_for(artifact, shape, seed=3)
    got = ArtifactLoader(artifact.path)()(arrays)
    expected = ArtifactLoader(reference.path)()(arrays)
    assert got.dtype == np.float32
    assert cosine(got, expected).min() >= 0.99


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("cpu", "fp32"), ("cpu", "bf16"), ("neuron", "fp32"), ("neuronx", "bf16")],
)
def test_resolve_dtype_explicit(backend: str, dtype: str) -> None:
    assert resolve_dtype(CompileSpec(model="m", backend=backend, dtype=dtype)) == dtype


def test_resolve_dtype_auto_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    spec = CompileSpec(model="m", dtype="auto")
    assert resolve_dtype(spec) == ("bf16" if native else "fp32")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert resolve_dtype(spec) == "fp32"


@pytest.mark.parametrize("backend", ["neuron", "neuronx"])
def test_resolve_dtype_auto_on_neuron_is_bf16(backend: str) -> None:
    assert resolve_dtype(CompileSpec(model="m", backend=backend)) == "bf16"


def test_example_inputs() -> None:
    ids, mask, types = example_inputs(Shape(16, 4), vocab_size=30522)
    for t in (ids, mask, types):
        assert t.shape == (4, 16)
        assert t.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 1}
    assert bool(mask[0].all())
    assert bool((ids[mask == 0] == 0).all())
    assert bool((ids[mask == 1] >= 5).all())
    assert bool((types == 0).all())
    again = example_inputs(Shape(16, 4), vocab_size=30522)
    assert all(torch.equal(a, b) for a, b in zip((ids, mask, types), again, strict=True))


# --- task inference and errors ----------------------------------------------------------


def test_infer_task(classifier_dir: Path, embedder_dir: Path) -> None:
    assert infer_task(str(classifier_dir)) == "text-classification"
    assert infer_task(str(embedder_dir)) == "feature-extraction"


def test_infer_task_asks_for_task_on_a_plain_model(plain_dir: Path) -> None:
    with pytest.raises(UsageError) as info:
        infer_task(str(plain_dir))
    message = str(info.value)
    assert message.startswith(f"--model {plain_dir}: can't tell its task")
    assert "BertModel" in message
    assert "pass --task text-classification, token-classification or feature-extraction" in message


def test_nonexistent_model_path_says_it_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(UsageError, match=r"(?i)does not exist|no such"):
        compile_artifact(CompileSpec(model=str(missing), shapes=SMALL), str(tmp_path / "out"))


@pytest.mark.parametrize("case", ["empty", "bad-config", "no-weights"])
@pytest.mark.parametrize("task", [None, "text-classification"])
def test_unloadable_model_dir(
    case: str, task: str | None, classifier_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / case
    if case == "empty":
        model.mkdir()
    elif case == "bad-config":
        model.mkdir()
        (model / "config.json").write_text("{not json")
    else:
        copy_model(classifier_dir, model, skip=("model.safetensors",))
    with pytest.raises(UsageError) as info:
        compile_artifact(
            CompileSpec(model=str(model), task=task, shapes=SMALL), str(tmp_path / "out")
        )
    message = str(info.value)
    assert message.startswith(f"--model {model}: can't load it: ")
    assert "\n" not in message
    if case == "no-weights":
        assert "model.safetensors" in message
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_model_dir_without_tokenizer_is_refused(classifier_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(classifier_dir / name, model / name)
    with pytest.raises(UsageError, match="tokenizer"):
        compile_artifact(CompileSpec(model=str(model), shapes=SMALL), str(tmp_path / "out"))


@pytest.mark.parametrize("packing", [True, False])
def test_a_shape_longer_than_the_models_positions_is_refused(
    classifier_dir: Path, tmp_path: Path, packing: bool
) -> None:
    """It compiled, and every batch of it failed at run time (an index out of range)."""
    spec = CompileSpec(model=str(classifier_dir), shapes=(Shape(513, 1),), packing=packing)
    with pytest.raises(UsageError, match="a shape of 513 tokens is longer than the model takes: "
                       "it has 512 positions"):  # fmt: skip
        compile_artifact(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_missing_calibration_sample_is_named_by_its_flag(
    classifier_dir: Path, tmp_path: Path
) -> None:
    spec = CompileSpec(model=str(classifier_dir), calibrate=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match=f"--calibrate {tmp_path / 'nope'}: no such file"):
        compile_artifact(spec, str(tmp_path / "out"))


def test_output_not_empty(classifier_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match=re.escape(f"--output {out} exists and is not")):
        compile_artifact(CompileSpec(model=str(classifier_dir), shapes=SMALL), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_output_existing_empty_dir_is_used(classifier_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    artifact = compile_artifact(
        CompileSpec(model=str(classifier_dir), shapes=SMALL, dtype="fp32"), str(out)
    )
    assert artifact.path == str(out)
    assert (out / "graph_8.pt").is_file()
    assert leftovers(tmp_path) == []


def test_output_is_a_file(classifier_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")
    with pytest.raises(UsageError, match="--output"):
        compile_artifact(CompileSpec(model=str(classifier_dir), shapes=SMALL), str(out))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_compile_leaves_no_partial_artifact(
    error: type[BaseException],
    classifier_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = CpuBackend.trace
    calls = 0

    def second_trace_fails(self: CpuBackend, *args: Any) -> torch.jit.ScriptModule:
        nonlocal calls
        calls += 1
        if calls == 2:  # after the first graph is already in the staging dir
            raise error("compiler exploded")
        return original(self, *args)

    monkeypatch.setattr(CpuBackend, "trace", second_trace_fails)
    parent = tmp_path / "jobs"
    parent.mkdir()
    (parent / "sibling.txt").write_text("untouched")
    out = parent / "artifact"
    with pytest.raises(error, match="compiler exploded"):
        compile_artifact(
            CompileSpec(model=str(classifier_dir), shapes=(Shape(8, 2), Shape(16, 1))), str(out)
        )
    assert calls == 2
    assert sorted(os.listdir(parent)) == ["sibling.txt"]


# --- ensure_artifact and the compile cache ----------------------------------------------


@pytest.fixture
def compile_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = compile_mod._compile

    def counting(spec: CompileSpec, output: str, *, into_cache: bool) -> Artifact:
        calls.append(output)
        return original(spec, output, into_cache=into_cache)

    monkeypatch.setattr(compile_mod, "_compile", counting)
    return calls


def test_ensure_artifact_uses_an_artifact_as_is(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path, compile_calls: list[str]
) -> None:
    artifact = compiled(classifier_dir)
    cache = tmp_path / "cache"
    got = ensure_artifact(CompileSpec(model=artifact.path, dtype="bf16", shapes=SMALL), str(cache))
    assert got == artifact
    assert compile_calls == []
    assert not cache.exists()


def test_ensure_artifact_compiles_once_into_the_cache(
    classifier_dir: Path, tmp_path: Path, compile_calls: list[str]
) -> None:
    cache = tmp_path / "cache"
    spec = CompileSpec(model=str(classifier_dir), shapes=SMALL, dtype="fp32")
    first = ensure_artifact(spec, str(cache))
    assert Path(first.path).parent == cache / "artifacts"
    assert Path(first.path).name.startswith(f"{classifier_dir.name}-")
    assert compile_calls == [first.path]
    graph = Path(first.graph_path(SMALL[0]))
    mtime = graph.stat().st_mtime_ns

    second = ensure_artifact(spec, str(cache))
    assert second == first
    assert compile_calls == [first.path]
    assert graph.stat().st_mtime_ns == mtime

    other = ensure_artifact(dataclasses.replace(spec, shapes=(Shape(8, 1),)), str(cache))
    assert other.path != first.path
    assert other.shapes == (Shape(8, 1),)
    assert len(compile_calls) == 2
    assert sorted(os.listdir(cache / "artifacts")) == sorted(
        [Path(first.path).name, Path(other.path).name]
    )


def test_cache_key_changes_with_every_option(
    classifier_dir: Path, embedder_dir: Path, tmp_path: Path
) -> None:
    """Every field of the spec, each alone: a new field without a variant here fails."""
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "a.txt").write_text("one\ntwo words\n")
    base = CompileSpec(model=str(classifier_dir), shapes=SMALL, dtype="fp32")
    alternatives: dict[str, object] = {
        "model": str(embedder_dir),
        "task": "feature-extraction",
        "backend": "neuronx",
        "dtype": "bf16",
        "shapes": (Shape(8, 2), Shape(16, 1)),
        "compiler_args": ("--optlevel", "1"),  # on a neuron backend: the cpu takes none
        "pooling": "cls",
        "normalize": False,
        "packing": False,
        "max_segments": 3,
        "calibrate": str(tmp_path / "sample"),
        # Where the model was fetched from: recorded as the artifact's source_model.
        "source": "s3://bucket/models/classifier/model.tar.gz",
    }
    assert sorted(alternatives) == sorted(f.name for f in dataclasses.fields(CompileSpec))
    for name, value in alternatives.items():
        start = dataclasses.replace(base, backend="neuronx") if name == "compiler_args" else base
        assert _cache_key(dataclasses.replace(start, **{name: value})) != _cache_key(start), name
    variants = [
        base,
        dataclasses.replace(base, packing=True),
        dataclasses.replace(base, shapes=(Shape(8, 1),)),
        dataclasses.replace(base, backend="neuron"),
        dataclasses.replace(base, backend="neuronx"),
    ]
    keys = [_cache_key(spec) for spec in variants]
    assert len(set(keys)) == len(keys)
    # The sample counts by its content, not its path; another content is another key.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "sample", copy)
    calibrated = dataclasses.replace(base, calibrate=str(tmp_path / "sample"))
    assert _cache_key(dataclasses.replace(base, calibrate=str(copy))) == _cache_key(calibrated)
    (copy / "a.txt").write_text("one\nthree words here\n")
    assert _cache_key(dataclasses.replace(base, calibrate=str(copy))) != _cache_key(calibrated)
    assert _cache_key(base) == _cache_key(dataclasses.replace(base))
    assert all(key.startswith(f"{classifier_dir.name}-") for key in keys)
    auto = dataclasses.replace(base, dtype="auto")
    assert _cache_key(auto) == _cache_key(dataclasses.replace(base, dtype=resolve_dtype(auto)))


def test_cache_key_changes_with_the_model_files(classifier_dir: Path, tmp_path: Path) -> None:
    model = copy_model(classifier_dir, tmp_path / "model")
    spec = CompileSpec(model=str(model), shapes=SMALL)
    before = _cache_key(spec)
    assert _cache_key(CompileSpec(model=str(model) + "/", shapes=SMALL)) == before
    config = model / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert _cache_key(spec) != before


# --- backends ---------------------------------------------------------------------------


def test_get_backend() -> None:
    assert (get_backend("cpu").name, get_backend("cpu").device) == ("cpu", "cpu")
    # The Neuron backends import without their SDK: it is imported when used.
    assert (get_backend("neuron").name, get_backend("neuron").device) == ("neuron", "neuron")
    assert (get_backend("neuronx").name, get_backend("neuronx").device) == ("neuronx", "neuron")
    message = "--backend must be one of cpu, neuron, neuronx, got 'gpu'"
    with pytest.raises(UsageError, match=re.escape(message)):
        get_backend("gpu")


@pytest.mark.parametrize("backend", ["neuron", "neuronx"])
def test_neuron_trace_calls(
    backend: str, classifier_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, fp32_flag, user_args, _ = NEURON[backend]
    sdk = install_standin(monkeypatch, backend)
    artifact = compile_artifact(
        CompileSpec(
            model=str(classifier_dir),
            backend=backend,
            dtype="fp32",
            shapes=SHAPES,
            compiler_args=tuple(user_args),
        ),
        str(tmp_path / "a"),
    )
    assert len(sdk.calls) == len(SHAPES)
    for call, shape in zip(sdk.calls, SHAPES, strict=True):
        assert len(call.example_inputs) == 3  # input_ids, attention_mask, token_type_ids
        for tensor in call.example_inputs:
            assert tuple(tensor.shape) == (shape.batch_size, shape.seq_len)
            assert tensor.dtype == torch.int64
        ids, mask, types = call.example_inputs
        assert set(mask.unique().tolist()) == {0, 1}, "the trace must see padding"
        assert bool((ids[mask == 0] == 0).all())
        assert bool((types == 0).all())
        assert isinstance(call.compiler_args, list)
        assert call.compiler_args == [*user_args, *fp32_flag]
        assert call.kwargs == {}
        assert call.param_dtypes == {torch.float32}
        assert call.training is False

    data = manifest(artifact)
    assert (data["backend"], data["dtype"]) == (backend, "fp32")
    assert data["compiler_args"] == user_args
    assert artifact.compiler_args == tuple(user_args)
    assert data["max_abs_diff_vs_eager"] is None  # no Neuron device here to check on
    assert [s["graph"] for s in data["shapes"]] == ["graph_16.pt", "graph_32.pt"]
    assert all((Path(artifact.path) / s["graph"]).is_file() for s in data["shapes"])


@pytest.mark.parametrize("backend", ["neuron", "neuronx"])
def test_neuron_keeps_the_users_precision_flag(
    backend: str, classifier_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, _, own_flag = NEURON[backend]
    sdk = install_standin(monkeypatch, backend)
    compile_artifact(
        CompileSpec(
            model=str(classifier_dir),
            backend=backend,
            dtype="fp32",
            shapes=SMALL,
            compiler_args=tuple(own_flag),
        ),
        str(tmp_path / "a"),
    )
    assert [call.compiler_args for call in sdk.calls] == [own_flag]


@pytest.mark.parametrize(("backend", "dtype"), [("neuron", "bf16"), ("neuronx", "auto")])
def test_neuron_weights_stay_fp32_for_bf16(
    backend: str,
    dtype: str,
    embedder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sdk = install_standin(monkeypatch, backend)
    artifact = compile_artifact(
        CompileSpec(model=str(embedder_dir), backend=backend, dtype=dtype, shapes=SMALL),
        str(tmp_path / "a"),
    )
    assert len(sdk.calls) == 1
    assert sdk.calls[0].param_dtypes == {torch.float32}  # the Neuron compiler casts
    assert sdk.calls[0].compiler_args == []  # its default (bf16 matmuls) is what was asked
    assert artifact.dtype == manifest(artifact)["dtype"] == "bf16"
    assert artifact.task == "feature-extraction"


@pytest.mark.parametrize("backend", ["neuron", "neuronx"])
def test_neuron_artifact_loads_through_the_sdk(
    backend: str,
    classifier_dir: Path,
    compiled: CompileFn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sdk = install_standin(monkeypatch, backend)
    artifact = compile_artifact(
        CompileSpec(model=str(classifier_dir), backend=backend, dtype="fp32", shapes=SHAPES),
        str(tmp_path / "a"),
    )

    # Without the SDK, the artifact can't be loaded, and says why.
    monkeypatch.setitem(sys.modules, sdk.name, None)
    with pytest.raises(UsageError, match=f"--backend {backend} needs the {sdk.name} package"):
        ArtifactLoader(artifact.path)()

    # With it, the SDK is imported (registering its ops) before any graph is loaded.
    monkeypatch.delitem(sys.modules, sdk.name)
    monkeypatch.setattr(sys, "meta_path", [StandInFinder(sdk), *sys.meta_path])
    original_load = torch.jit.load

    def recording_load(path: str, *args: Any, **kwargs: Any) -> torch.jit.ScriptModule:
        sdk.events.append(f"load {os.path.basename(path)}")
        module: torch.jit.ScriptModule = original_load(path, *args, **kwargs)
        return module

    monkeypatch.setattr(torch.jit, "load", recording_load)
    sdk.events.clear()
    predict = ArtifactLoader(artifact.path)()
    assert sdk.events == [f"import {sdk.name}", "load graph_16.pt", "load graph_32.pt"]
    assert sys.modules[sdk.name] is sdk.module

    # What the SDK was given is the model: same outputs as the CPU artifact.
    reference = ArtifactLoader(compiled(classifier_dir).path)()
    for shape in SHAPES:
        arrays = batch_for(artifact, shape, seed=7)
        np.testing.assert_allclose(predict(arrays), reference(arrays), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["neuron", "neuronx"])
def test_neuron_without_sdk(
    backend: str, classifier_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = NEURON[backend][0]
    monkeypatch.setitem(sys.modules, module, None)  # importing it fails, as on this machine
    out = tmp_path / "out"
    with pytest.raises(UsageError) as info:
        compile_artifact(
            CompileSpec(model=str(classifier_dir), backend=backend, shapes=SMALL), str(out)
        )
    message = str(info.value)
    assert message.startswith(f"--backend {backend} needs the {module} package")
    assert "AWS Neuron machine" in message
    assert "--backend cpu" in message
    assert "\n" not in message
    assert not out.exists()
    assert leftovers(tmp_path) == []

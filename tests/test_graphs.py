"""Attention as batched matmuls (attention.ATTENTION_BMM): the same outputs as the model's own.

Packed bf16 graphs on CPU compute attention with baddbmm/softmax/bmm (compile_plan.plan chooses
it); every packing family is checked here as tests/test_packing.py checks SDPA: each
document's packed output against the eager model run on it alone, in fp32 (bmm forced) to
1e-5, and in bf16 (the default choice) to the bf16 tolerance of tests/test_compile.py. MPNet,
whose attention is its own matmuls, keeps it: checked in bf16 the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchjob import compile as compiling
from batchjob.artifact import map_weights
from batchjob.attention import ATTENTION_BMM, ATTENTION_SDPA, bmm_attention
from batchjob.backends import cpu
from batchjob.backends.cpu import fuse_linear_epilogues, native_bf16
from batchjob.batching import Shape
from batchjob.compile import compile_artifact, packed_example
from batchjob.compile_plan import Plan, plan
from batchjob.config import CompileSpec
from batchjob.errors import BatchJobError
from batchjob.models import load_model
from tests.conftest import cosine, make_texts
from tests.family_models import build, eager_outputs, packed_outputs

# The families whose attention goes through transformers' attention functions (MPNet's
# does not: test_mpnet_keeps_its_own_attention).
FAMILIES = ["bert", "distilbert", "roberta", "xlm-roberta", "electra", "modernbert"]
SHAPE = Shape(64, 3)


def spy_attention(monkeypatch: pytest.MonkeyPatch, force: str | None = None) -> list[str]:
    """The attention every compile plans (forced to `force` when given)."""
    chosen: list[str] = []
    original = compiling.plan

    def planned(spec: CompileSpec, loaded: Any) -> Plan:
        found = original(spec, loaded)
        if force is not None:
            found = dataclasses.replace(found, attention=force)
        chosen.append(found.attention)
        return found

    monkeypatch.setattr(compiling, "plan", planned)
    return chosen


def test_bmm_attention_equals_sdpa() -> None:
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    keep = torch.rand(b, 1, s, s) > 0.3
    keep |= torch.eye(s, dtype=torch.bool)  # no empty row
    mask = (~keep).float() * torch.finfo(torch.float32).min
    module = torch.nn.Module()
    for given in (mask, mask.expand(b, h, s, s).contiguous(), None):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=given)
        got, weights = bmm_attention(module, q, k, v, given)
        assert weights is None
        assert got.shape == (b, s, h, d)  # laid out as the models' attention functions return
        torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=0)
    got, _ = bmm_attention(module, q, k, v, mask, scaling=0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_bmm_packed_equals_each_document_alone_fp32(
    kind: str, task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = spy_attention(monkeypatch, force=ATTENTION_BMM)
    model_dir = build(kind, task, tmp_path)
    spec = CompileSpec(model=str(model_dir), task=task, dtype="fp32", shapes=(SHAPE,), packing=True)
    artifact = compile_artifact(spec, str(tmp_path / "artifact"))
    assert chosen == [ATTENTION_BMM]
    texts = make_texts(40, seed=7, max_words=30)
    got, _ = packed_outputs(artifact, texts)
    want = eager_outputs(model_dir, task, texts, artifact.max_length)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_bf16_packed_graph_uses_bmm_and_matches_eager(
    kind: str, task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = spy_attention(monkeypatch)
    model_dir = build(kind, task, tmp_path)
    spec = CompileSpec(model=str(model_dir), task=task, dtype="bf16", shapes=(SHAPE,), packing=True)
    artifact = compile_artifact(spec, str(tmp_path / "artifact"))
    assert chosen == [ATTENTION_BMM]
    texts = make_texts(40, seed=7, max_words=30)
    got, _ = packed_outputs(artifact, texts)
    want = eager_outputs(model_dir, task, texts, artifact.max_length)  # fp32, each alone
    assert cosine(got, want).min() >= 0.99
    if task == "text-classification":
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
def test_mpnet_keeps_its_own_attention(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MPNet's attention is its own matmuls (no AttentionInterface): the bf16 plan keeps it,
    the packed graph matches eager, and bmm asked for anyway is refused, not ignored."""
    chosen = spy_attention(monkeypatch)
    model_dir = build("mpnet", task, tmp_path)
    spec = CompileSpec(model=str(model_dir), task=task, dtype="bf16", shapes=(SHAPE,), packing=True)
    artifact = compile_artifact(spec, str(tmp_path / "artifact"))
    assert chosen == [ATTENTION_SDPA]
    texts = make_texts(40, seed=7, max_words=30)
    got, _ = packed_outputs(artifact, texts)
    want = eager_outputs(model_dir, task, texts, artifact.max_length)  # fp32, each alone
    assert cosine(got, want).min() >= 0.99
    if task == "text-classification":
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    spy_attention(monkeypatch, force=ATTENTION_BMM)
    with pytest.raises(ValueError, match=r"MPNet\w* has its own attention"):
        compile_artifact(spec, str(tmp_path / "forced"))


def node_kinds(graph: torch._C.Graph) -> set[str]:
    return {node.kind() for node in graph.nodes()}


def test_linear_epilogues_fuse_bias_and_gelu_and_compute_the_same() -> None:
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False)
    ).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(layers, (x,)))
        fuse_linear_epilogues(frozen.graph)
        kinds = node_kinds(frozen.graph)
        assert "mkldnn::_linear_pointwise" in kinds
        assert not kinds & {"aten::linear", "aten::gelu"}
        torch.testing.assert_close(frozen(x), layers(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_only_bf16_cpu_graphs_get_onednn_linears(
    classifier_dir: Path, dtype: str, tmp_path: Path
) -> None:
    """bf16's linears fused where the CPU has native bf16 matmuls (oneDNN has no bf16 kernel
    without them), fp32's left to aten (its results are pinned to 1e-5)."""
    spec = CompileSpec(model=str(classifier_dir), dtype=dtype, shapes=(SHAPE,), packing=True)
    artifact = compile_artifact(spec, str(tmp_path / "artifact"))
    graph = torch.jit.load(artifact.graph_path(SHAPE)).graph
    fused = dtype == "bf16" and native_bf16()
    kinds = node_kinds(graph)
    assert ("mkldnn::_linear_pointwise" in kinds) == fused
    assert ("aten::linear" in kinds) == (not fused)
    # aten's GELU after a linear layer, in place (the results are the same, bit for bit).
    assert "aten::gelu" not in kinds
    assert ("aten::gelu_" in kinds) == (not fused)


def test_bf16_graph_fused_for_native_bf16_runs_on_a_cpu_without_it(
    classifier_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An artifact compiled on a CPU with native bf16 (its linears oneDNN's) loads on one
    without (AMD Zen 3, where oneDNN can't create them) with aten's linears again, the same
    outputs, and a warning naming the graph."""
    spec = CompileSpec(model=str(classifier_dir), dtype="bf16", shapes=(SHAPE,), packing=True)
    artifact = compile_artifact(spec, str(tmp_path / "artifact"))
    assert artifact.weights_path is not None
    weights = map_weights(artifact.weights_path)
    inputs = packed_example(SHAPE, artifact.max_segments, artifact.position_offset, 1000)
    as_compiled = cpu.BACKEND.load(artifact.graph_path(SHAPE), weights)
    with torch.inference_mode():
        want = as_compiled(*inputs)
    fused_path = str(tmp_path / "fused.pt")
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)  # as where it was compiled
    fused = cpu.BACKEND.load(artifact.graph_path(SHAPE), weights)
    fuse_linear_epilogues(fused.graph)
    cpu.BACKEND.save(fused, fused_path)
    assert "mkldnn::_linear_pointwise" in node_kinds(cpu.BACKEND.load(fused_path, weights).graph)

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    loaded = cpu.BACKEND.load(fused_path, weights)
    kinds = node_kinds(loaded.graph)
    assert "mkldnn::_linear_pointwise" not in kinds
    assert {"aten::linear", "aten::gelu_"} <= kinds
    assert "fused.pt: compiled for CPUs with native bf16 matmuls" in caplog.text
    with torch.inference_mode():
        got = loaded(*inputs)
    # Fused, the GELU takes the unrounded sum: bf16 rounding apart, the same.
    assert cosine(got.flatten(0, 1).numpy(), want.flatten(0, 1).numpy()).min() >= 0.999

    # An epilogue it can't turn back into aten's ops: the graph is refused, by name.
    node = fused.graph.findNode("mkldnn::_linear_pointwise", True)
    relu = fused.graph.insertConstant("relu")
    relu.node().moveBefore(node)
    node.replaceInput(3, relu)
    cpu.BACKEND.save(fused, fused_path)
    with pytest.raises(BatchJobError, match=r"fused.pt: a oneDNN linear .* 'relu' epilogue needs"):
        cpu.BACKEND.load(fused_path, weights)


@pytest.mark.parametrize(
    ("backend", "dtype", "packing", "attention"),
    [
        ("cpu", "bf16", True, ATTENTION_BMM),
        ("cpu", "fp32", True, ATTENTION_SDPA),
        ("cpu", "bf16", False, ATTENTION_SDPA),  # buckets: the model's own attention
        ("neuronx", "bf16", True, ATTENTION_SDPA),  # the Neuron compiler picks its kernels
    ],
)
def test_plan_chooses_attention_from_backend_and_dtype(
    classifier_dir: Path, backend: str, dtype: str, packing: bool, attention: str
) -> None:
    """A function of the backend and the resolved dtype, which the compile cache key holds
    (test_compile.py::test_cache_key_changes_with_every_option)."""
    spec = CompileSpec(
        model=str(classifier_dir), backend=backend, dtype=dtype, shapes=(SHAPE,), packing=packing
    )
    weights = torch.bfloat16 if dtype == "bf16" else torch.float32
    loaded = load_model(spec.model, "text-classification", weights, "auto", True)
    assert plan(spec, loaded).attention == attention

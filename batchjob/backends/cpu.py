"""CPU backend: torch.jit.trace then freeze; the same trace API the Neuron SDKs mirror.

The weights live once per artifact, not once per graph: every graph file holds the code, and
the artifact's weights file (artifact.py) holds the tensors, which every graph of the
artifact and every replica maps read-only, so the kernel keeps one copy in memory however
many buckets and replicas there are.

How: freezing makes the weights constants of the graph. On the CPU that buys folded
attribute lookups, no dropout and constant propagation; it neither concatenates linears
(CUDA only) nor prepacks weights for oneDNN (only `optimize_for_inference` would, and not
for bf16 linears), so a weight read from a module attribute runs at the speed of a constant
(measured: bench/weights_bench.py). After freezing, each tensor constant of a page or more is lifted
back into an attribute named after its content (`weight_<sha256>`): equal tensors of
different graphs are one entry of the weights file. A graph is saved with empty placeholders
in those attributes; loading sets them to the mapped tensors.

In bf16, every linear layer becomes oneDNN's `_linear_pointwise`, which adds the bias (and a
GELU that follows the layer) to the fp32 accumulator inside the matmul, where aten's linear
copies the bias into the output first and GELU reads and writes the whole activation once
more: the packed bert-base graph runs 12% faster (BENCHMARKS.md, "The graph"). fp32 linears
stay on aten's: the tests pin their results to 1e-5, and oneDNN's fp32 matmul was 10% slower
on AMD Zen 3; their GELU is computed in place (`gelu_in_place`). oneDNN's bf16 matmuls need
a CPU with native bf16 (AVX-512 BF16 or AMX): elsewhere (e.g. Zen 3) a bf16 graph keeps
aten's linears, and one compiled on a machine that has it is turned back into aten's when
loaded, so an artifact runs on every x86 CPU (slower than fp32 where bf16 is emulated).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from batchjob.errors import BatchJobError

log = logging.getLogger("batchjob.backends.cpu")

# The attribute listing a graph's lifted weights, saved with the graph.
WEIGHT_NAMES = "batchjob_weights"
WEIGHT_PREFIX = "weight_"
# Smaller constants (biases, layer norms: a few KB a layer) stay in the graph: sharing
# memory is by pages, and a scalar read as a constant lets the executor fold it.
MIN_SHARED_BYTES = 4096


@dataclass(frozen=True)
class CpuBackend:
    name: str = "cpu"
    device: str = "cpu"
    shares_weights: bool = True

    def trace(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        compiler_args: Sequence[str],
        dtype: str,
    ) -> torch.jit.ScriptModule:
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(module.eval(), example_inputs, check_trace=False)
            frozen: torch.jit.ScriptModule = torch.jit.freeze(traced)
        if dtype == "bf16" and native_bf16():
            fuse_linear_epilogues(frozen.graph)
        else:
            gelu_in_place(frozen.graph)
        lift_weights(frozen)
        return frozen

    def save(self, graph: torch.jit.ScriptModule, path: str) -> dict[str, torch.Tensor]:
        names: list[str] = graph._c.getattr(WEIGHT_NAMES)
        weights = {name: graph._c.getattr(name) for name in names}
        try:
            for name, tensor in weights.items():
                graph._c.setattr(name, torch.empty(0, dtype=tensor.dtype))
            torch.jit.save(graph, path)
        finally:
            for name, tensor in weights.items():
                graph._c.setattr(name, tensor)
        return weights

    def load(self, path: str, weights: Mapping[str, torch.Tensor]) -> torch.jit.ScriptModule:
        module: torch.jit.ScriptModule = torch.jit.load(path, map_location="cpu")
        if not module._c.hasattr(WEIGHT_NAMES):
            raise BatchJobError(f"{path}: a graph without the list of its weights")
        for name in module._c.getattr(WEIGHT_NAMES):
            tensor = weights.get(name)
            if tensor is None:
                raise BatchJobError(f"{path}: needs {name}, which the weights file lacks")
            module._c.setattr(name, tensor)
        try:
            unfused = not native_bf16() and unfuse_linear_epilogues(module.graph)
        except BatchJobError as e:
            raise BatchJobError(
                f"{path}: {e} needs native bf16 matmuls, which this CPU lacks; compile the "
                "model on this machine (or with --dtype fp32)"
            ) from None
        if unfused:
            log.warning(
                "%s: compiled for CPUs with native bf16 matmuls, which this one lacks: its "
                "linear layers run through aten's emulated bf16 here (compile with --dtype "
                "fp32 for this machine)",
                path,
            )
        return module.eval()


def with_private_weights(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A loaded graph frozen again with a private copy of its weights as constants, as
    format 2 held them: what bench/weights_bench.py compares the shared weights with (they
    were as fast, within the ±4% the machine's other load makes of it), not a user's option."""
    for name in module._c.getattr(WEIGHT_NAMES):
        module._c.setattr(name, module._c.getattr(name).clone())
    frozen: torch.jit.ScriptModule = torch.jit.freeze(module)
    return frozen


_POINTWISE = "mkldnn::_linear_pointwise"
_GELU_IN_PLACE = (
    """graph(%x, %w, %b, %approximate):
        %y = aten::linear(%x, %w, %b)
        %z = aten::gelu(%y, %approximate)
        return (%z)""",
    """graph(%x, %w, %b, %approximate):
        %y = aten::linear(%x, %w, %b)
        %z = aten::gelu_(%y, %approximate)
        return (%z)""",
)
# GELU first: the plain linear pattern would otherwise take the layer away from its GELU.
_LINEAR_GELU = (
    """graph(%x, %w, %b, %approximate):
        %y = aten::linear(%x, %w, %b)
        %z = aten::gelu(%y, %approximate)
        return (%z)""",
    """graph(%x, %w, %b, %approximate):
        %op : str = prim::Constant[value="gelu"]()
        %scalars : Scalar?[] = prim::ListConstruct()
        %z = mkldnn::_linear_pointwise(%x, %w, %b, %op, %scalars, %approximate)
        return (%z)""",
)
_LINEAR = (
    """graph(%x, %w, %b):
        %y = aten::linear(%x, %w, %b)
        return (%y)""",
    """graph(%x, %w, %b):
        %op : str = prim::Constant[value="none"]()
        %scalars : Scalar?[] = prim::ListConstruct()
        %algorithm : str = prim::Constant[value=""]()
        %y = mkldnn::_linear_pointwise(%x, %w, %b, %op, %scalars, %algorithm)
        return (%y)""",
)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively, as oneDNN's bf16 matmuls need."""
    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def fuse_linear_epilogues(graph: torch._C.Graph) -> None:
    """Linear layers (and a GELU after one) as oneDNN matmuls with the bias and the GELU in
    the matmul's epilogue (see the module's docstring)."""
    for pattern, replacement in (_LINEAR_GELU, _LINEAR):
        torch._C._jit_pass_custom_pattern_based_rewrite_graph(pattern, replacement, graph)
    graph.lint()


def gelu_in_place(graph: torch._C.Graph) -> None:
    """aten's GELU after a linear layer computed in the layer's output, which nothing else
    reads: no fresh activation-sized buffer a layer (fp32 bert-base graph on AMD Zen 3:
    ~3.5% faster, BENCHMARKS.md "The graph"); the same results, bit for bit."""
    torch._C._jit_pass_custom_pattern_based_rewrite_graph(*_GELU_IN_PLACE, graph)
    graph.lint()


def unfuse_linear_epilogues(graph: torch._C.Graph) -> bool:
    """`fuse_linear_epilogues` undone: aten's linear (and GELU) again. Whether any was fused.
    By hand: the fused nodes share their constant arguments, which a pattern can't match."""
    fused = [node for node in _nodes(graph.block()) if node.kind() == _POINTWISE]
    for node in fused:
        x, weight, bias, op, _scalars, approximate = node.inputs()
        epilogue: object = op.toIValue()
        if epilogue not in ("none", "gelu"):
            raise BatchJobError(f"a oneDNN linear layer with a {epilogue!r} epilogue")
        linear = graph.create("aten::linear", [x, weight, bias], 1)
        linear.insertBefore(node)
        out = linear.output()
        if epilogue == "gelu":
            gelu = graph.create("aten::gelu_", [out, approximate], 1)  # as gelu_in_place
            gelu.insertBefore(node)
            out = gelu.output()
        linear.output().setType(node.output().type())
        out.setType(node.output().type())
        node.output().replaceAllUsesWith(out)
        node.destroy()
    torch._C._jit_pass_dce(graph)
    graph.lint()
    return bool(fused)


def lift_weights(module: torch.jit.ScriptModule) -> list[str]:
    """Turn the frozen graph's large tensor constants into attributes named after their
    content, listed in the attribute WEIGHT_NAMES; the module runs as before."""
    graph = module.graph
    this = next(iter(graph.inputs()))  # `self`: a frozen module keeps it as its first input
    names: list[str] = []
    for node in list(_nodes(graph.block())):
        if node.kind() != "prim::Constant" or node.output().type().kind() != "TensorType":
            continue
        tensor: torch.Tensor = node.t("value")
        if tensor.numel() * tensor.element_size() < MIN_SHARED_BYTES:
            continue
        name = WEIGHT_PREFIX + _content_hash(tensor)
        if name not in names:
            names.append(name)
            module._c._register_attribute(name, torch._C.TensorType.get(), _compact(tensor))
        get = graph.create("prim::GetAttr", [this], 1)
        get.s_("name", name)
        get.output().setType(torch._C.TensorType.get())
        get.insertBefore(node)
        node.output().replaceAllUsesWith(get.output())
        node.destroy()
    graph.lint()
    module._c._register_attribute(WEIGHT_NAMES, torch._C.ListType(torch._C.StringType.get()), names)
    return names


def _nodes(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor alone in a storage of its own size: saving a view saves its whole storage."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _content_hash(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:32]


BACKEND = CpuBackend()

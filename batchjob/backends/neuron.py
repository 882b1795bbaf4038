"""torch-neuron backend (Inf1): `torch.neuron.trace(model, example_inputs, compiler_args=...)`.

Also the shared shape of both Neuron backends (neuronx.py is the other). Not run on
hardware yet: tested against stand-in modules with the SDKs' `trace` signatures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchjob.backends import import_sdk


@dataclass(frozen=True)
class NeuronSdkBackend:
    name: str
    sdk: str  # the module to import: it registers the Neuron ops (and, for Inf1, torch.neuron)
    keep_fp32: tuple[str, str]  # compiler args that stop the default bf16 cast of matmuls
    device: str = "neuron"
    # The compiled graph holds its weights (the NEFF), loaded onto each NeuronCore.
    shares_weights: bool = False

    def trace(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        compiler_args: Sequence[str],
        dtype: str,
    ) -> torch.jit.ScriptModule:
        sdk: Any = import_sdk(self.sdk, self.name)
        args = list(compiler_args)
        if dtype == "fp32" and not any(a.startswith(self.keep_fp32[0]) for a in args):
            args += list(self.keep_fp32)
        # torch-neuron exposes its trace as torch.neuron.trace; torch-neuronx as its own.
        tracer = torch.neuron if self.sdk == "torch_neuron" else sdk  # type: ignore[attr-defined]
        traced: torch.jit.ScriptModule = tracer.trace(
            module.eval(), example_inputs, compiler_args=args
        )
        return traced

    def save(self, graph: torch.jit.ScriptModule, path: str) -> dict[str, torch.Tensor]:
        torch.jit.save(graph, path)
        return {}

    def load(self, path: str, weights: Mapping[str, torch.Tensor]) -> torch.jit.ScriptModule:
        import_sdk(self.sdk, self.name)  # registers the Neuron ops before load
        module: torch.jit.ScriptModule = torch.jit.load(path)
        return module


BACKEND = NeuronSdkBackend("neuron", "torch_neuron", ("--fast-math", "none"))

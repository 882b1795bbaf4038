"""torch-neuronx backend (Inf2/Trn1).

`torch_neuronx.trace(model, example_inputs, compiler_args=...)`.

Not run on hardware yet: tested against a stand-in module with the SDK's signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchjob.backends import import_sdk


@dataclass(frozen=True)
class NeuronxBackend:
    name: str = "neuronx"
    device: str = "neuron"

    def trace(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        compiler_args: Sequence[str],
        dtype: str,
    ) -> torch.jit.ScriptModule:
        sdk: Any = import_sdk("torch_neuronx", self.name)
        args = list(compiler_args)
        # neuronx-cc casts fp32 matmuls to bf16 by default; fp32 asks it not to.
        if dtype == "fp32" and not any(a.startswith("--auto-cast") for a in args):
            args += ["--auto-cast", "none"]
        traced: torch.jit.ScriptModule = sdk.trace(
            module.eval(), example_inputs, compiler_args=args
        )
        return traced

    def load(self, path: str) -> torch.jit.ScriptModule:
        import_sdk("torch_neuronx", self.name)  # registers the Neuron ops before load
        module: torch.jit.ScriptModule = torch.jit.load(path)
        return module


BACKEND = NeuronxBackend()

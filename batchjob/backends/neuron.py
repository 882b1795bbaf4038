"""torch-neuron backend (Inf1): `torch.neuron.trace(model, example_inputs, compiler_args=...)`.

Not run on hardware yet: tested against a stand-in module with the SDK's signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchjob.backends import import_sdk


@dataclass(frozen=True)
class NeuronBackend:
    name: str = "neuron"
    device: str = "neuron"

    def trace(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        compiler_args: Sequence[str],
        dtype: str,
    ) -> torch.jit.ScriptModule:
        import_sdk("torch_neuron", self.name)  # registers torch.neuron
        args = list(compiler_args)
        # The compiler casts fp32 matmuls to bf16 unless told not to (fast-math).
        if dtype == "fp32" and not any(a.startswith("--fast-math") for a in args):
            args += ["--fast-math", "none"]
        neuron = torch.neuron  # type: ignore[attr-defined]
        traced: torch.jit.ScriptModule = neuron.trace(
            module.eval(), example_inputs, compiler_args=args
        )
        return traced

    def load(self, path: str) -> torch.jit.ScriptModule:
        import_sdk("torch_neuron", self.name)  # registers the Neuron ops before load
        module: torch.jit.ScriptModule = torch.jit.load(path)
        return module


BACKEND = NeuronBackend()

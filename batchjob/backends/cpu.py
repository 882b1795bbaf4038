"""CPU backend: torch.jit.trace then freeze; the same trace API the Neuron SDKs mirror."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuBackend:
    name: str = "cpu"
    device: str = "cpu"

    def trace(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        compiler_args: Sequence[str],
        dtype: str,
    ) -> torch.jit.ScriptModule:
        # Freezing folds the weights into the graph as constants, which lets oneDNN pick
        # prepacked bf16 kernels; it is as fast as AOTInductor here (FACTS.md).
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(module.eval(), example_inputs, check_trace=False)
            frozen: torch.jit.ScriptModule = torch.jit.freeze(traced)
            return frozen

    def load(self, path: str) -> torch.jit.ScriptModule:
        module: torch.jit.ScriptModule = torch.jit.load(path, map_location="cpu")
        return module.eval()


BACKEND = CpuBackend()

"""Compile and load backends, one interface: trace a module to fixed shapes, save, load.

`cpu` runs here; `neuron` (torch-neuron, Inf1) and `neuronx` (torch-neuronx, Inf2/Trn1)
import their SDK lazily, so this package imports on any machine. The package itself does not
import torch (a second of start-up): `backend_device` answers where replicas run without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from batchjob.errors import UsageError

if TYPE_CHECKING:
    import torch

# Each backend's `device`, known without importing the backend (tests check they agree).
DEVICES = {"cpu": "cpu", "neuron": "neuron", "neuronx": "neuron"}


class Backend(Protocol):
    name: str
    device: str  # "cpu" or "neuron": how replicas are placed
    shares_weights: bool  # its artifacts keep the weights in one file that every graph maps

    def trace(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        compiler_args: Sequence[str],
        dtype: str,
    ) -> torch.jit.ScriptModule: ...

    def save(self, graph: torch.jit.ScriptModule, path: str) -> dict[str, torch.Tensor]:
        """Write `graph` to `path`; returns the weights it left out, which the artifact
        stores once, in its weights file, for all its graphs (empty: the graph holds its own)."""
        ...

    def load(self, path: str, weights: Mapping[str, torch.Tensor]) -> torch.jit.ScriptModule:
        """The graph at `path`, given the artifact's weights (empty where it has none)."""
        ...


def get_backend(name: str) -> Backend:
    try:
        module = importlib.import_module(f"batchjob.backends.{name}")
    except ModuleNotFoundError:
        raise _unknown(name) from None
    backend: Backend = module.BACKEND
    return backend


def backend_device(name: str) -> str:
    """ "cpu" or "neuron": how the backend's replicas are placed."""
    if name not in DEVICES:
        raise _unknown(name)
    return DEVICES[name]


def _unknown(name: str) -> UsageError:
    return UsageError(f"--backend must be one of cpu, neuron, neuronx, got {name!r}")


def import_sdk(module: str, backend: str) -> object:
    """The Neuron SDK module, or a one-line error saying where it runs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"--backend {backend} needs the {module} package (AWS Neuron SDK), which is not "
            "installed here; run on an AWS Neuron machine (docker/Dockerfile.neuronx for "
            "Inf2/Trn1) or use --backend cpu"
        ) from None

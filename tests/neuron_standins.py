"""Stand-ins for the AWS Neuron SDKs (torch-neuron, torch-neuronx), which can't be installed
here: same `trace(model, example_inputs, compiler_args=None, **kwargs)` signature, record what
they were given, and delegate to `torch.jit.trace` so the artifact they produce really runs.

`StandInFinder` serves a stand-in through `sys.meta_path`, so a test can see when the SDK gets
imported (the real SDKs register their ops on import, which must precede `torch.jit.load`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TraceCall:
    """One `trace` call, as the SDK saw it."""

    example_inputs: tuple[torch.Tensor, ...]
    compiler_args: Any
    kwargs: dict[str, Any]
    param_dtypes: set[torch.dtype]
    training: bool


@dataclass
class StandInSDK:
    """The module object (`module`) plus what happened to it (`calls`, `events`)."""

    name: str
    module: types.ModuleType = field(init=False)
    calls: list[TraceCall] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.module = types.ModuleType(self.name)
        self.module.__dict__["trace"] = self.trace
        self.module.__dict__["standin"] = self

    def trace(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        compiler_args: Any = None,
        **kwargs: Any,
    ) -> torch.jit.ScriptModule:
        self.calls.append(
            TraceCall(
                example_inputs=tuple(t.detach().clone() for t in example_inputs),
                compiler_args=compiler_args,
                kwargs=dict(kwargs),
                param_dtypes={p.dtype for p in model.parameters()},
                training=model.training,
            )
        )
        self.events.append(f"trace {self.name}")
        with torch.no_grad():
            traced: torch.jit.ScriptModule = torch.jit.trace(
                model, tuple(example_inputs), check_trace=False
            )
        return traced


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `sdk.name` as `sdk.module`, recording each import in `sdk.events`."""

    def __init__(self, sdk: StandInSDK) -> None:
        self.sdk = sdk

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.sdk.name:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.sdk.module

    def exec_module(self, module: types.ModuleType) -> None:
        self.sdk.events.append(f"import {self.sdk.name}")

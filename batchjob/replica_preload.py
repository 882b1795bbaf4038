"""What the replicas' fork server imports once, before it forks any replica (replicas.py).

Imported in that server only: torch (a second or more, the longest part of a replica's
start) and the modules a replica unpickles and loads with. The garbage collector is off
meanwhile (importing torch allocates a great deal: a collection pass every so often costs
tenths of a second), then everything imported is frozen out of it, so that the replicas,
forked from here, share those pages rather than copy them when they collect.

Three of the packages `import torch` executes serve tracing and export, never a replica
running a TorchScript graph: Python meta kernels (fake tensors), `torch.export` and
`torch.nested`, 40% of the import (bench/startup_bench.py). They are put in `sys.modules`
unexecuted, and run on first use: a replica that does need one (a Neuron runtime that
exports, say) gets it whole, a moment later.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
import types

from batchjob.startup import process_started

DEFERRED = ("torch._meta_registrations", "torch.export", "torch.nested")


class _Deferred(types.ModuleType):
    """A module that executes when one of its attributes is first asked for. Python 3.11's
    LazyLoader executes on any attribute, `__spec__` included, which importing it reads."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        spec = self.__spec__
        assert spec is not None
        assert spec.loader is not None
        object.__setattr__(self, "__class__", types.ModuleType)
        spec.loader.exec_module(self)
        return getattr(self, name)


def defer(names: tuple[str, ...]) -> None:
    """Register the torch submodules `names`, unexecuted, before torch is imported."""
    spec = importlib.util.find_spec("torch")  # finds, without importing
    if spec is None or spec.origin is None:
        return
    root = os.path.dirname(spec.origin)
    for name in names:
        path = os.path.join(root, *name.split(".")[1:])
        if os.path.isdir(path):
            found = importlib.util.spec_from_file_location(
                name, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
            )
        else:
            found = importlib.util.spec_from_file_location(name, path + ".py")
        if found is None or name in sys.modules:
            continue
        module = importlib.util.module_from_spec(found)
        module.__class__ = _Deferred
        sys.modules[name] = module


STARTED = process_started()  # the fork server's own start (the replicas' steps name it)
BEGAN = time.monotonic()
gc.disable()
try:
    defer(DEFERRED)
    import torch  # noqa: F401

    TORCH_IMPORTED = time.monotonic()
    import batchjob.artifact
    import batchjob.backends.cpu
    import batchjob.replica_process  # noqa: F401
finally:
    gc.freeze()
    gc.enable()
IMPORTED = time.monotonic()

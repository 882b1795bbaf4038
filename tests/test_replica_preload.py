"""The fork server's torch import leaves tracing-only packages unexecuted until first use."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import batchjob.replica_preload as preload
kinds = {name: type(sys.modules[name]).__name__ for name in preload.DEFERRED}
assert set(kinds.values()) == {"_Deferred"}, kinds
import torch
graph = torch.jit.trace(torch.nn.Linear(4, 2).eval(), (torch.ones(1, 4),))
assert graph(torch.ones(1, 4)).shape == (1, 2)
assert type(sys.modules["torch.nested"]).__name__ == "_Deferred"  # running needs none of them
nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])  # first use executes it
assert type(sys.modules["torch.nested"]).__name__ == "module"
assert nested.is_nested
from torch.export import export  # a package: its __init__ runs on a submodule's first use
print("ok")
"""


def test_deferred_torch_packages_run_on_first_use() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

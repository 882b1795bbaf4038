"""Artifacts on disk as tests change them: copies, batchjob.json edited, files backdated,
and `batchjob run` refusing one (test_artifact.py, test_shared_weights.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchjob.artifact import load_artifact
from batchjob.errors import UsageError
from tests.conftest import write_jsonl

Manifest = dict[str, Any]


def copy_artifact(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read(root: Path) -> Manifest:
    data: Manifest = json.loads((root / "batchjob.json").read_text())
    return data


def write(root: Path, data: Manifest) -> None:
    (root / "batchjob.json").write_text(json.dumps(data, indent=2))


def edit(root: Path, change: Callable[[Manifest], object]) -> Path:
    data = read(root)
    change(data)
    write(root, data)
    return root


def backdate(root: Path, seconds: float = 3600) -> None:
    """As if the artifact had been written an hour ago (not just now)."""
    then = time.time() - seconds
    for p in [root, *root.rglob("*")]:
        os.utime(p, (then, then))


def usage_error(root: Path | str) -> str:
    with pytest.raises(UsageError) as info:
        load_artifact(str(root))
    message = str(info.value)
    assert "\n" not in message
    return message


def run_cli(artifact: Path, tmp: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`python -m batchjob run` on one good shard; (the process, its --output)."""
    inp = write_jsonl(tmp / "in" / "a.jsonl", [{"id": "a1", "text": "fine"}]).parent
    out = tmp / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchjob",
            "run",
            "--model",
            str(artifact),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--replicas",
            "1",
            "--progress",
            "none",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done, out


def assert_refused(done: subprocess.CompletedProcess[str], out: Path, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, nothing on stdout, no output at all."""
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith("batchjob run: error: "), done.stderr
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)
    assert not out.exists(), "a refused run must write nothing (no _manifest.json)"

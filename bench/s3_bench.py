"""`make bench`'s S3 row: the bench corpus read from and written to S3 (moto's server on
loopback, in its own process), compared with the local-file run of the same bench.

bench.py calls `measure_s3(artifact, corpus_dir, local_docs_per_s)`; run alone,
`python bench/s3_bench.py` times a local run and an S3 run back to back (default artifact).
Throughput is documents ÷ the manifest's `pipeline_seconds` (replicas ready → last output
committed), as row (b) of the bench: the S3 run's includes fetching the objects and
uploading the outputs; listing and start-up are in `wall_seconds`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TARGET = 0.9  # the S3 run must reach this fraction of the local-file throughput
BUCKET = "batchjob-bench"
START_SECONDS = 60.0
_MOTO_MAIN = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 in server mode on 127.0.0.1, in its own process; yields its endpoint URL.
    It exits when its stdin closes, so it never outlives the bench."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_MAIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], START_SECONDS)
        port = proc.stdout.readline().strip() if ready else ""
        if not port.isdigit():
            raise RuntimeError(f"moto server didn't start in {START_SECONDS} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def aws_environment(endpoint: str, home: str) -> dict[str, str]:
    """The standard AWS variables batchjob reads; no profile or config file of the user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.path.join(home, "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "aws-credentials"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def timed_run(artifact: str, input: str, output: str, env: dict[str, str], logs: str) -> float:
    """`batchjob run` in a subprocess; its wall time. Raises with the log's tail on failure."""
    command = [sys.executable, "-m", "batchjob", "run", "--model", artifact]
    command += ["--input", input, "--output", output, "--progress", "none"]
    started = time.perf_counter()
    with open(logs, "w") as err:
        code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=err, env=env).returncode
    wall = time.perf_counter() - started
    if code != 0:
        with open(logs) as f:
            raise RuntimeError(f"{' '.join(command)} exited {code}:\n{f.read()[-3000:]}")
    return wall


def measure_s3(
    artifact_path: str, corpus_dir: str, local_docs_per_s: float, *, repeats: int = 1
) -> dict[str, Any]:
    """Upload `corpus_dir`'s shards to moto, `batchjob run` them S3 → S3 (`repeats` times,
    the median counts), and compare the throughput with `local_docs_per_s` (the same corpus,
    local files, measured by the caller the same way: documents ÷ pipeline_seconds)."""
    import boto3

    with tempfile.TemporaryDirectory(prefix="batchjob-s3-bench-") as home, moto_server() as url:
        env = aws_environment(url, home)
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        s3.create_bucket(Bucket=BUCKET)
        shards = sorted(p for p in Path(corpus_dir).rglob("*") if p.is_file())
        for path in shards:
            key = f"corpus/{path.relative_to(corpus_dir)}"
            s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
        runs = []
        for i in range(repeats):
            out = f"out-{i}/"
            wall = timed_run(
                artifact_path,
                f"s3://{BUCKET}/corpus/",
                f"s3://{BUCKET}/{out}",
                env,
                os.path.join(home, "run.log"),
            )
            manifest = json.loads(
                s3.get_object(Bucket=BUCKET, Key=f"{out}_manifest.json")["Body"].read()
            )
            outputs = s3.list_objects_v2(Bucket=BUCKET, Prefix=out).get("KeyCount", 0) - 1
            runs.append((manifest["timings"]["pipeline_seconds"], wall, manifest, outputs))
    seconds, wall, manifest, outputs = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]
    documents = manifest["counts"]["documents"]
    docs_per_s = documents / seconds
    ratio = docs_per_s / local_docs_per_s
    return {
        "label": "S3 in and out (moto on loopback): pipeline_seconds",
        "documents": documents,
        "shards": len(shards),
        "outputs": outputs,
        "failed": len(manifest["shards"]["failed"]),
        "pipeline_seconds": seconds,
        "runs_pipeline_seconds": [r[0] for r in runs],
        "wall_seconds": wall,
        "docs_per_s": docs_per_s,
        "local_docs_per_s": local_docs_per_s,
        "ratio": ratio,
        "target": TARGET,
        "passed": ratio >= TARGET and outputs == len(shards),
    }


def main(argv: list[str] | None = None) -> int:
    """Alone: a local run and an S3 run of the bench corpus, back to back, `--pairs` times."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fixtures

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=2400, help="documents in the corpus (2400)")
    p.add_argument("--shards", type=int, default=4, help="jsonl shards (4)")
    p.add_argument("--pairs", type=int, default=1, help="local + S3 runs, alternating (1)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    repo = Path(__file__).resolve().parent.parent
    root = fixtures.cache_root(repo)
    artifact, _ = fixtures.ensure_artifact(root, fixtures.ensure_model(root), "default", [])
    corpus = fixtures.make_corpus(args.docs)
    with tempfile.TemporaryDirectory(prefix="batchjob-s3-bench-") as tmp:
        corpus.write(Path(tmp) / "corpus", args.shards)
        for i in range(args.pairs):
            out = Path(tmp) / f"local-{i}"
            timed_run(str(artifact), f"{tmp}/corpus", str(out), dict(os.environ), f"{tmp}/log")
            local = json.loads((out / "_manifest.json").read_text())
            local_rate = local["counts"]["documents"] / local["timings"]["pipeline_seconds"]
            result = measure_s3(str(artifact), f"{tmp}/corpus", local_rate)
            print(json.dumps(result, indent=2), flush=True)
            print(
                f"local {local_rate:.1f} docs/s, S3 {result['docs_per_s']:.1f} docs/s: "
                f"{result['ratio']:.2f} x ({'PASS' if result['passed'] else 'MISS'}, "
                f"target >= {TARGET})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

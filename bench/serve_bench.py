"""`batchjob serve` under Batch Transform's load: concurrent clients posting MultiRecord
JSON Lines payloads, while /ping is polled throughout.

`measure_serve(artifact, texts, clients)` starts `python -m batchjob serve` on a loopback
port, waits for /ping, sends one warm-up request, then times the corpus: each client thread
(one keep-alive connection, as SageMaker's) posts payloads of `records_per_request`
documents taken from a shared queue, until none are left. Throughput is documents over
the window from the first request sent to the last answer received; every answer is checked
(one line per record, no errors). A separate connection GETs /ping every 20 ms over that
window, and its latencies are reported.

Run alone, it also times `batchjob run` on the same corpus and artifact, and checks the
targets: serve ≥ 0.9 × run, /ping p99 < 100 ms. Then it measures the server's memory under
12 concurrent 6 MB requests (serve_memory.py):

    .venv/bin/python bench/serve_bench.py [--docs 2400] [--records-per-request 256]
        [--memory-clients 12] [--memory-server-args '--max-concurrent-requests 2']
        [--memory-only]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PING_INTERVAL = 0.02
SERVE_TARGET = 0.9  # serve docs/s ≥ this × run docs/s
PING_P99_TARGET_MS = 100.0
_JSONLINES = "application/jsonlines"


class Server:
    def __init__(self, artifact: str, extra: list[str]) -> None:
        command = [sys.executable, "-m", "batchjob", "serve", "--model", artifact]
        command += ["--host", "127.0.0.1", "--port", "0", *extra]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.port: int | None = None
        listening = threading.Event()

        def read() -> None:  # drains stderr, so the server never blocks on a full pipe
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                    self.port = int(found.group(1))
                    listening.set()
            listening.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not listening.wait(120) or self.port is None:
            self.stop()
            raise RuntimeError("batchjob serve did not start:\n" + "".join(self.log[-30:]))

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            conn = self.connect()
            try:
                conn.request("GET", "/ping")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.1)
        raise RuntimeError("batchjob serve not ready:\n" + "".join(self.log[-30:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: it drains and exits 0
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def ping_while(
    server: Any, loading: threading.Event, latencies: list[float], failures: list[BaseException]
) -> None:
    """GET /ping every PING_INTERVAL while `loading` is set: each latency, or the failure."""
    conn = server.connect()
    try:
        while loading.is_set():
            started = time.perf_counter()
            conn.request("GET", "/ping")
            response = conn.getresponse()
            response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"GET /ping answered {response.status}")
            time.sleep(PING_INTERVAL)
    except BaseException as e:
        failures.append(e)
    finally:
        conn.close()


def _post(conn: http.client.HTTPConnection, body: bytes) -> bytes:
    conn.request("POST", "/invocations", body, {"Content-Type": _JSONLINES})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST /invocations answered {response.status}: {data[:300]!r}")
    return data


def _payloads(texts: list[str], size: int) -> list[tuple[int, bytes]]:
    out = []
    for start in range(0, len(texts), size):
        part = texts[start : start + size]
        body = "".join(json.dumps({"inputs": t}) + "\n" for t in part).encode()
        out.append((len(part), body))
    return out


def measure_serve(
    artifact_path: str,
    corpus_texts: list[str],
    clients: int = 4,
    *,
    records_per_request: int = 256,
    server_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Documents/s of `clients` concurrent MultiRecord clients, and /ping latencies meanwhile."""
    server = Server(str(artifact_path), list(server_args))
    try:
        server.wait_ready()
        warm = server.connect()
        _post(warm, _payloads(corpus_texts[:64], 64)[0][1])
        warm.close()

        work: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        payloads = _payloads(corpus_texts, records_per_request)
        for payload in payloads:
            work.put(payload)
        for _ in range(clients):
            work.put(None)
        failures: list[BaseException] = []
        latencies: list[float] = []
        loading = threading.Event()
        start = threading.Barrier(clients + 1)

        def client() -> None:
            conn = server.connect()
            try:
                start.wait()
                while (item := work.get()) is not None:
                    count, body = item
                    lines = _post(conn, body).split(b"\n")
                    if len(lines) != count or any(b'"error"' in line for line in lines):
                        raise RuntimeError(f"expected {count} answers without errors")
            except BaseException as e:
                failures.append(e)
            finally:
                conn.close()

        def pinger() -> None:
            ping_while(server, loading, latencies, failures)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        loading.set()
        ping_thread = threading.Thread(target=pinger)
        ping_thread.start()
        start.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        loading.clear()
        ping_thread.join()
        if failures:
            raise RuntimeError(f"serve bench failed: {failures[0]!r}") from failures[0]
    finally:
        server.stop()
    # The server's last log line gives how full its batches were (warm-up included).
    padding = re.search(r"in (\d+) batches, (\d+)% of compiled tokens real", "".join(server.log))
    ms = np.array(latencies) * 1000
    return {
        "documents": len(corpus_texts),
        "seconds": seconds,
        "docs_per_s": len(corpus_texts) / seconds,
        "clients": clients,
        "requests": len(payloads),
        "records_per_request": records_per_request,
        "pings": len(latencies),
        "ping_p50_ms": float(np.percentile(ms, 50)),
        "ping_p99_ms": float(np.percentile(ms, 99)),
        "ping_max_ms": float(ms.max()),
        "batches": int(padding.group(1)) if padding else None,
        "real_token_percent": int(padding.group(2)) if padding else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--docs", type=int, default=2400, help="documents in the corpus (2400)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--records-per-request", type=int, default=256)
    p.add_argument("--artifact", help="an artifact; default: the bench's default compile")
    p.add_argument("--memory-clients", type=int, default=12, help="memory: clients (12)")
    p.add_argument("--memory-server-args", default="", help="memory: extra serve flags, quoted")
    p.add_argument("--memory-only", action="store_true", help="skip the throughput part")
    args = p.parse_args(argv)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fixtures
    import serve_memory

    repo = Path(__file__).resolve().parent.parent
    root = fixtures.cache_root(repo)
    corpus = fixtures.make_corpus(args.docs)
    if not args.memory_only:
        artifact = Path(args.artifact) if args.artifact else None
        if artifact is None:
            model = fixtures.ensure_model(root)
            artifact, _ = fixtures.ensure_artifact(root, model, "default", [])
        _throughput(args, artifact, corpus)
    # The memory of the request path: a bert-tiny shaped model, so that every client's
    # 6 MB of normal documents is through in minutes (bert-base would take hours).
    tiny, _ = fixtures.ensure_artifact(root, fixtures.ensure_tiny_model(root), "tiny", [])
    memory = serve_memory.measure_memory(
        str(tiny),
        corpus.texts,
        args.memory_clients,
        server_args=tuple(shlex.split(args.memory_server_args)),
    )
    for line in serve_memory.describe(memory):
        print(line)
    return 0


def _throughput(args: argparse.Namespace, artifact: Path, corpus: Any) -> None:
    import measure

    with tempfile.TemporaryDirectory(prefix="batchjob-serve-bench-") as tmp:
        corpus.write(Path(tmp) / "corpus", 4)
        run = measure.batchjob_run(artifact, Path(tmp) / "corpus", Path(tmp) / "out")
    run_rate = run.documents / run.pipeline_seconds
    serve = measure_serve(
        str(artifact), corpus.texts, args.clients, records_per_request=args.records_per_request
    )
    ratio = serve["docs_per_s"] / run_rate
    print(f"batchjob run (pipeline_seconds): {run.documents} docs, {run_rate:.1f} docs/s")
    print(
        f"batchjob serve, {args.clients} clients x {serve['requests']} MultiRecord requests of "
        f"{args.records_per_request} docs: {serve['docs_per_s']:.1f} docs/s, "
        f"{ratio:.2f} x run ({'PASS' if ratio >= SERVE_TARGET else 'MISS'} >= {SERVE_TARGET}); "
        f"{serve['batches']} batches, {serve['real_token_percent']}% of compiled tokens real "
        f"(run: {run.batches} batches, {100 * run.real_tokens / run.compiled_tokens:.0f}%)"
    )
    print(
        f"/ping while loaded: {serve['pings']} pings, p50 {serve['ping_p50_ms']:.1f} ms, "
        f"p99 {serve['ping_p99_ms']:.1f} ms, max {serve['ping_max_ms']:.1f} ms "
        f"({'PASS' if serve['ping_p99_ms'] < PING_P99_TARGET_MS else 'MISS'} "
        f"< {PING_P99_TARGET_MS:g} ms)"
    )


if __name__ == "__main__":
    sys.exit(main())

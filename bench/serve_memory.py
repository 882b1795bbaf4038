"""`batchjob serve`'s memory under Batch Transform's worst load: many concurrent clients,
each posting a full 6 MB MultiRecord payload, while /ping is polled.

`measure_memory(artifact, texts)` starts `python -m batchjob serve` on a loopback port,
waits for /ping, sends one small warm-up request, then samples the resident memory of the
server's whole process tree (the server and its replica subprocesses: the sum of VmRSS
over /proc/PID and its descendants, shared pages counted in each process) every 50 ms
while `clients` threads each post one payload of documents cycled from `texts` up to
`payload_bytes`. A client answered 503 waits its Retry-After and posts again, as a
retrying client would. A separate connection GETs /ping every 20 ms meanwhile.
serve_bench.py runs it (`make bench`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any

import fixtures
import numpy as np
from serve_bench import Server, ping_while

SAMPLE_INTERVAL = 0.05
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # gone meanwhile
            pass
    return pids


def tree_rss(root: int) -> int:
    """Bytes resident in `root` and its descendants, summed."""
    total = 0
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def payload(texts: list[str], size: int) -> tuple[int, bytes]:
    """(records, body): JSON Lines of `texts` cycled, as many whole lines as fit in `size`."""
    lines, total, i = [], 0, 0
    while True:
        line = (json.dumps({"inputs": texts[i % len(texts)]}) + "\n").encode()
        if total + len(line) > size:
            return len(lines), b"".join(lines)
        lines.append(line)
        total += len(line)
        i += 1


def measure_memory(
    artifact_path: str,
    texts: list[str],
    clients: int = 12,
    *,
    payload_bytes: int = 6_000_000,
    server_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Peak RSS of the server's process tree and /ping latencies under `clients` payloads."""
    records, body = payload(texts, payload_bytes)
    server = Server(str(artifact_path), list(server_args))
    try:
        server.wait_ready()
        slots = re.search(r"ready: \d+ replicas, (\d+) requests at once", "".join(server.log))
        warm = server.connect()
        warm.request("POST", "/invocations", body[:4096].rsplit(b"\n", 1)[0] + b"\n",
                     {"Content-Type": "application/jsonlines"})  # fmt: skip
        warm.getresponse().read()
        warm.close()
        assert server.proc.pid is not None
        idle = tree_rss(server.proc.pid)

        loading = threading.Event()
        loading.set()
        samples: list[int] = []
        latencies: list[float] = []
        failures: list[BaseException] = []
        refusals: list[int] = []
        start = threading.Barrier(clients + 1)

        def sampler() -> None:
            while loading.is_set():
                samples.append(tree_rss(server.proc.pid))
                time.sleep(SAMPLE_INTERVAL)

        def client() -> None:
            conn = server.connect()
            try:
                start.wait()
                while True:
                    conn.request("POST", "/invocations", body,
                                 {"Content-Type": "application/jsonlines"})  # fmt: skip
                    response = conn.getresponse()
                    data = response.read()
                    if response.status == 503 and response.getheader("Retry-After"):
                        refusals.append(1)
                        time.sleep(int(response.getheader("Retry-After", "1")))
                        continue
                    if response.status != 200:
                        raise RuntimeError(f"POST answered {response.status}: {data[:300]!r}")
                    if data.count(b"\n") + 1 != records or b'"error"' in data:
                        raise RuntimeError(f"expected {records} answers without errors")
                    return
            except BaseException as e:
                failures.append(e)
            finally:
                conn.close()

        def pinger() -> None:
            ping_while(server, loading, latencies, failures)

        helpers = [threading.Thread(target=sampler), threading.Thread(target=pinger)]
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in helpers + threads:
            t.start()
        start.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        loading.clear()
        for t in helpers:
            t.join()
        if failures:
            raise RuntimeError(f"serve memory bench failed: {failures[0]!r}") from failures[0]
    finally:
        server.stop()
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "payload_bytes": len(body),
        "records_per_request": records,
        "slots": int(slots.group(1)) if slots else None,
        "seconds": seconds,
        "refusals": len(refusals),
        "rss_idle_mb": idle / 2**20,
        "rss_peak_mb": max(samples) / 2**20,
        "samples": len(samples),
        "pings": len(latencies),
        "ping_p50_ms": float(np.percentile(ms, 50)),
        "ping_p99_ms": float(np.percentile(ms, 99)),
        "ping_max_ms": float(ms.max()),
    }


def describe(result: dict[str, Any]) -> list[str]:
    """The lines serve_bench.py prints."""
    growth = result["rss_peak_mb"] - result["rss_idle_mb"]
    at_once = min(result["slots"] or result["clients"], result["clients"])
    return [
        f"serve memory ({fixtures.cpu_family()}): {result['clients']} clients x 1 MultiRecord "
        f"request "
        f"of {result['payload_bytes'] / 1e6:.1f} MB ({result['records_per_request']} records), "
        f"{result['slots']} requests at once: peak RSS of the process tree "
        f"{result['rss_peak_mb']:.0f} MB (idle {result['rss_idle_mb']:.0f} MB, "
        f"+{growth:.0f} MB under load: {growth / at_once:.0f} MB per request at once); "
        f"{result['seconds']:.1f} s, {result['refusals']} refusals (503) retried",
        f"/ping meanwhile: {result['pings']} pings, p50 {result['ping_p50_ms']:.1f} ms, "
        f"p99 {result['ping_p99_ms']:.1f} ms, max {result['ping_max_ms']:.1f} ms",
    ]

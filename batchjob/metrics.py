"""The worker's Prometheus metrics, served on `--metrics-port` at /metrics.

Counters the worker updates as messages finish, and a collector that reads the engine's and
the replica pool's own counts at scrape time (so nothing is counted twice).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchjob.engine import EngineStats
from batchjob.errors import UsageError

log = logging.getLogger("batchjob.metrics")

OUTCOMES = ("done", "duplicate", "ignored", "failed", "released")


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], restarts: Callable[[], int]) -> None:
        self._stats, self._restarts = stats, restarts

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield CounterMetricFamily(
            "batchjob_batches", "Batches sent to the replicas", value=stats.batches
        )
        yield CounterMetricFamily(
            "batchjob_real_tokens", "Document tokens in the batches", value=stats.real_tokens
        )
        yield CounterMetricFamily(
            "batchjob_compiled_tokens",
            "Token slots of the compiled shapes sent (real tokens plus padding)",
            value=stats.compiled_tokens,
        )
        fill = stats.real_tokens / stats.compiled_tokens if stats.compiled_tokens else 0.0
        yield GaugeMetricFamily(
            "batchjob_batch_fill_ratio", "Real tokens / compiled token slots, so far", value=fill
        )
        yield CounterMetricFamily(
            "batchjob_replica_restarts", "Replica processes restarted", value=self._restarts()
        )


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "batchjob_messages",
            "Messages by outcome: done, duplicate (output existed), ignored (nothing to do), "
            "failed (left for redelivery), released (on shutdown)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.messages.labels(outcome)  # every series exists from the start, at 0
        self.documents = Counter(
            "batchjob_documents", "Documents written (error rows included)", registry=self.registry
        )
        self.errors = Counter(
            "batchjob_document_errors", "Error rows written", registry=self.registry
        )
        self.windows = Counter(
            "batchjob_windows",
            "Rows the model ran for the documents (more than documents where long ones were "
            "split: --long-documents chunk, mean)",
            registry=self.registry,
        )
        self.delete_failures = Counter(
            "batchjob_delete_failures",
            "Messages whose output was committed but whose delete failed",
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "batchjob_messages_in_progress", "Messages being worked on", registry=self.registry
        )
        self.seconds = Histogram(
            "batchjob_message_seconds",
            "From receipt to delete",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 43200),
            registry=self.registry,
        )

    def watch_engine(self, stats: Callable[[], EngineStats], restarts: Callable[[], int]) -> None:
        self.registry.register(_EngineCollector(stats, restarts))

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Listen on host:port (0: any free port); the caller cleans the runner up."""

        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise UsageError(f"--metrics-port {port}: can't listen: {e.strerror}") from None
        bound = runner.addresses[0][1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return runner

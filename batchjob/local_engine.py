"""The engine with its one replica in this process, for callers that are not asyncio programs.

A Ray Data actor is one replica (`batchjob.ray`): the graph runs in the actor's own process,
fed by the same `Engine` that `run`, `worker` and `serve` use (tokenizer, batcher, long
documents, task heads), with no replica processes and no second pipeline:

    infer(records)  ─►  the engine's event loop  ─►  LocalReplica: the graph on a thread
    (caller's thread)    (a thread of its own)        of its own (torch's threads do the math)

As with a replica process, two batches are in flight: the loop tokenizes and packs the next
batch while the graph runs the current one (the tokenizer and torch release the GIL).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from batchjob.artifact import Artifact
from batchjob.engine import DEFAULT_MAX_BATCH_DELAY, TRUNCATE, Engine
from batchjob.long_documents import TextOptions
from batchjob.records import Record
from batchjob.replica_process import Predict
from batchjob.results import Result
from batchjob.tasks import Head
from batchjob.tokens import RecordTokenizer

T = TypeVar("T")
IN_FLIGHT = 2  # batches: one running, one ready to go (a replica process's pipe holds two)


class LocalReplica:
    """The engine's pool (`engine.Submitter`): one replica, the graph run in this process."""

    size = 1

    def __init__(self, predict: Predict, in_flight: int = IN_FLIGHT) -> None:
        self._predict = predict
        self._slots = asyncio.Semaphore(in_flight)
        self._graph = ThreadPoolExecutor(1, thread_name_prefix="batchjob-graph")

    async def submit(self, arrays: dict[str, np.ndarray]) -> asyncio.Future[np.ndarray]:
        await self._slots.acquire()  # backpressure: the engine's dispatcher waits here
        future = asyncio.get_running_loop().run_in_executor(self._graph, self._predict, arrays)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        self._graph.shutdown(wait=True)


class LocalEngine:
    """`Engine.infer` callable from any thread: the engine runs on an event loop of its own."""

    def __init__(
        self,
        artifact: Artifact,
        predict: Predict,
        *,
        tokenizer: RecordTokenizer | None = None,
        head: Head | None = None,
        sort_window: int = 4096,
        max_batch_delay: float = DEFAULT_MAX_BATCH_DELAY,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="batchjob-engine", daemon=True
        )
        self._thread.start()
        self._replica = LocalReplica(predict)
        self._engine: Engine | None = None
        try:
            self._engine = self._wait(
                self._open(artifact, tokenizer, head, sort_window, max_batch_delay)
            )
        except BaseException:
            self.close()
            raise

    async def _open(
        self,
        artifact: Artifact,
        tokenizer: RecordTokenizer | None,
        head: Head | None,
        sort_window: int,
        max_batch_delay: float,
    ) -> Engine:
        engine = Engine(
            artifact,
            self._replica,
            max_batch_delay=max_batch_delay,
            sort_window=sort_window,
            tokenizer=tokenizer,
            head=head,
        )
        await engine.start()
        return engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("LocalEngine is closed")
        return self._engine

    def infer(self, records: Sequence[Record], options: TextOptions = TRUNCATE) -> list[Result]:
        """One result per record, in order (`Engine.infer`); blocks the calling thread."""
        return self._wait(self.engine.infer(records, options))

    def _wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        """Finish what runs, then stop the loop and the graph's thread. Idempotent."""
        if self._loop.is_closed():
            return
        engine, self._engine = self._engine, None
        try:
            if engine is not None:
                self._wait(engine.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._replica.close()

"""The replica pool: one process per core, round-robin dispatch, restart on death.

Replicas are forked from the fork server of `replica_server.py`, torch imported there once;
the drivers start it with the process, and a pool starts it itself otherwise. The pool takes
batches as soon as one replica is ready; the others join as they come up, and one that fails
to come up fails the pool as it would have failed the start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from threading import Thread
from typing import Any

import numpy as np

from batchjob.errors import ReplicaError
from batchjob.replica_process import Loader, Placement, replica_main
from batchjob.replica_server import CONTEXT, start_replica_server
from batchjob.startup import mark

log = logging.getLogger("batchjob.replicas")

_EXIT_GRACE = 5.0  # seconds a replica gets to exit after its pipe closes or it is told to stop
_END = object()  # tells a writer thread to finish
_SendQ = queue.SimpleQueue[object]
_ADVICE = (
    "the model may be too large for this machine's memory or crash on this input: "
    "check dmesg, lower --replicas, or run with --replicas 1"
)


class PoolState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(eq=False)
class _Batch:
    id: int
    arrays: dict[str, np.ndarray]
    result: asyncio.Future[np.ndarray]
    sent: asyncio.Future[None]  # resolved once a replica takes it: submit()'s backpressure
    deaths: int = 0  # replica deaths while it was in flight


@dataclass(eq=False)
class _Replica:
    placement: Placement
    generation: int = 0  # one per process: events from an earlier process are ignored
    process: BaseProcess | None = None  # None once it exited and was reaped
    sendq: _SendQ = field(default_factory=queue.SimpleQueue)
    reader: Thread | None = None
    ready: bool = False
    came_up: bool = False  # ready once at least: a failure to start after that is a death
    started_at: float = 0.0
    failure: str | None = None  # why it exited, when known ("failed to start: ...")
    in_flight: dict[int, _Batch] = field(default_factory=dict)
    deaths: int = 0  # in a row, without a batch done in between


def _describe_exit(code: int | None) -> str:
    signalled = f"signal {signal.Signals(-code).name}, " if code and code < 0 else ""
    return f"{signalled}exit {code}"


def _kill_started(starting: asyncio.Future[list[tuple[BaseProcess, Connection]]]) -> None:
    """The replicas a cancelled launch went on starting: nobody will use them."""
    if not starting.cancelled() and starting.exception() is None:
        for proc, _ in starting.result():
            proc.kill()


def _write_loop(conn: Connection, sendq: _SendQ) -> None:
    # A thread of its own: send blocks while the replica is busy and the pipe buffer is full.
    while (item := sendq.get()) is not _END:
        try:
            conn.send(item)
        except (OSError, ValueError):  # the replica is gone; its reader reports that
            return


class ReplicaPool:
    """N replica processes; each batch runs on one of them, at most `in_flight` per replica."""

    def __init__(
        self,
        loader: Loader,
        placements: Sequence[Placement],
        *,
        in_flight: int = 2,
        start_timeout: float = 300.0,
        max_consecutive_deaths: int = 3,
    ) -> None:
        if not placements or min(in_flight, max_consecutive_deaths, start_timeout) <= 0:
            raise ValueError(
                f"ReplicaPool needs placements (got {len(placements)}), and in_flight, "
                "max_consecutive_deaths and start_timeout > 0 (got "
                f"{in_flight}, {max_consecutive_deaths}, {start_timeout})"
            )
        self._loader, self._in_flight = loader, in_flight
        self._start_timeout, self._max_deaths = start_timeout, max_consecutive_deaths
        self._reps = [_Replica(p) for p in placements]
        self._ctx = multiprocessing.get_context(CONTEXT)  # fork would copy our threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[_Batch] = collections.deque()  # re-sent ones go first
        self._ids = itertools.count()
        self._last = -1  # the replica used last, for round-robin
        self._stopping = False
        self._waited = False  # start() was called
        self._launching: asyncio.Task[None] | None = None
        self._launched_at = 0.0
        self._start_error: str | None = None
        self._failed: str | None = None
        self._changed, self._stopped = asyncio.Event(), asyncio.Event()
        self.state = PoolState.STARTING
        self.restarts = 0
        self.peak_in_flight = 0  # most batches ever outstanding on one replica: a metric

    @property
    def size(self) -> int:
        return len(self._reps)

    @property
    def ready_replicas(self) -> int:
        """Replicas loaded and taking batches now."""
        return sum(r.ready for r in self._reps)

    @property
    def failed(self) -> str | None:
        """Why the pool gave up (a replica died too often), or None: it fails every batch."""
        return self._failed

    async def __aenter__(self) -> ReplicaPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def launch(self) -> None:
        """Start every replica, in the background: `start` waits for the first to be ready.
        Batches submitted from now on wait for it."""
        if self._launching is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._launched_at = time.monotonic()
        self._launching = self._loop.create_task(self._launch(), name="batchjob-replicas-launch")

    async def _launch(self) -> None:
        # The first fork waits for the fork server to have imported torch: not on the loop.
        starting = asyncio.ensure_future(asyncio.to_thread(self._start_processes))
        try:
            started = await asyncio.shield(starting)
        except BaseException as e:
            self._start_error = f"could not start the replicas: {e!r}"
            self._changed.set()
            starting.add_done_callback(_kill_started)  # if it is still starting them
            raise
        for rep, (proc, conn) in zip(self._reps, started, strict=True):
            self._attach(rep, proc, conn)
        mark(f"{self.size} replicas started")

    async def launched(self) -> None:
        """Wait until every replica's process runs (forked from a fork server that has
        imported torch): what remains is loading the model. ReplicaError if one can't run."""
        self.launch()
        assert self._launching is not None
        try:
            await asyncio.shield(self._launching)
        except Exception:
            raise ReplicaError(self._start_error or "could not start the replicas") from None

    async def start(self) -> None:
        """Start the replicas (unless `launch` did) and wait until one has loaded the model:
        from then on the pool takes batches, and the others join as they come up."""
        if self._waited:
            raise RuntimeError("ReplicaPool.start() called twice")
        self._waited = True
        try:
            await self.launched()
            one_ready = lambda: self._start_error or any(r.ready for r in self._reps)  # noqa: E731
            left = self._start_timeout - (time.monotonic() - self._launched_at)
            in_time = await self._wait_for(one_ready, left)
            if self._start_error:
                raise ReplicaError(self._start_error)
            if not in_time:
                late = next(r for r in self._reps if not r.ready)
                raise ReplicaError(self._start_failure(late, None))
        except BaseException as e:
            why = str(e) if isinstance(e, ReplicaError) else "the replica pool stopped starting"
            self._fail_all(why)
            self._failed = why
            await self._stop_replicas(graceful=False)
            self.state = PoolState.STOPPED
            raise
        self.state = PoolState.READY
        mark("replica pool ready")
        ready = self.ready_replicas
        log.info("replica pool ready: %d of %d replicas%s", ready, self.size,
                 "" if ready == self.size else ", the others join as they come up")  # fmt: skip

    async def submit(self, arrays: dict[str, np.ndarray]) -> asyncio.Future[np.ndarray]:
        """Hand a batch to a replica once one has a free slot (while the pool starts, once
        the first is ready); the future gets its output."""
        if self._failed is not None:
            raise ReplicaError(self._failed)
        if self.state not in (PoolState.STARTING, PoolState.READY) or self._loop is None:
            state = "not started" if self._loop is None else self.state.value
            raise ReplicaError(f"replica pool is {state}: it takes no batches")
        new = self._loop.create_future
        batch = _Batch(next(self._ids), arrays, new(), new())
        self._waiting.append(batch)
        self._pump()
        try:
            await batch.sent
        except asyncio.CancelledError:
            if batch in self._waiting:
                self._waiting.remove(batch)
            batch.result.cancel()
            raise
        return batch.result

    async def run(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return await (await self.submit(arrays))

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Stop taking batches, let in-flight ones finish by `timeout`, then stop the replicas."""
        if self.state is PoolState.DRAINING:
            await self._stopped.wait()
        if self.state in (PoolState.DRAINING, PoolState.STOPPED):
            return
        if self.state is PoolState.STARTING:  # no replica ready: nothing to drain
            self._start_error = self._failed = "the replica pool was closed while starting"
            self._fail_all(self._failed)
        self.state = PoolState.DRAINING
        try:
            idle = lambda: not self._waiting and not any(r.in_flight for r in self._reps)  # noqa: E731
            drained = await self._wait_for(idle, timeout)
            self._fail_all(f"replica pool closed after {timeout:g} s, before this batch was done")
            await self._stop_replicas(graceful=drained)
        finally:
            for rep in self._reps:  # reached with live replicas only if close() was cancelled
                if rep.process is not None:
                    rep.process.kill()
            self.state = PoolState.STOPPED
            self._stopped.set()

    async def _wait_for(self, done: Callable[[], object], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not done():
            if (remaining := deadline - time.monotonic()) <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def _pump(self) -> None:
        """Send waiting batches round-robin to replicas with a free slot."""
        n = len(self._reps)
        while self._waiting:
            order = (self._reps[(self._last + 1 + k) % n] for k in range(n))
            rep = next((r for r in order if r.ready and len(r.in_flight) < self._in_flight), None)
            if rep is None or self._stopping:
                return
            self._last, batch = self._reps.index(rep), self._waiting.popleft()
            rep.in_flight[batch.id] = batch
            self.peak_in_flight = max(self.peak_in_flight, len(rep.in_flight))
            rep.sendq.put((batch.id, batch.arrays))
            mark("first batch dispatched", once=True)
            if not batch.sent.done():
                batch.sent.set_result(None)

    def _start_processes(self) -> list[tuple[BaseProcess, Connection]]:
        """Every replica's process (in a thread: see `launch`); none left running if one
        can't be started."""
        start_replica_server()  # a no-op when the driver started it already
        started: list[tuple[BaseProcess, Connection]] = []
        try:
            for rep in self._reps:
                started.append(self._start_process(rep))
        except BaseException:
            for proc, _ in started:
                proc.kill()
            raise
        return started

    def _start_process(self, rep: _Replica) -> tuple[BaseProcess, Connection]:
        name = f"batchjob-replica-{rep.placement.index}"
        conn, child_conn = self._ctx.Pipe(duplex=True)
        args = (rep.placement, self._loader, child_conn, dict(os.environ))
        # daemon: terminated at interpreter exit, should a pool never be closed.
        proc = self._ctx.Process(target=replica_main, args=args, name=name, daemon=True)
        try:
            proc.start()
        finally:
            child_conn.close()  # else our recv would not see EOF when the replica dies
        return proc, conn

    def _spawn(self, rep: _Replica) -> None:
        """Start `rep` again (after a death): the fork server is up, so this is quick."""
        self._attach(rep, *self._start_process(rep))

    def _attach(self, rep: _Replica, proc: BaseProcess, conn: Connection) -> None:
        """Watch a replica's new process: its messages, its exit, its start timeout."""
        assert self._loop is not None
        name = f"batchjob-replica-{rep.placement.index}"
        rep.generation += 1
        rep.process, rep.sendq, rep.ready, rep.failure = proc, queue.SimpleQueue(), False, None
        rep.started_at = time.monotonic()
        writer = Thread(target=_write_loop, args=(conn, rep.sendq), name=f"{name}-w")
        own = (rep, rep.generation, proc, conn, rep.sendq, writer)
        rep.reader = Thread(target=self._read_loop, args=own, name=f"{name}-r")
        writer.daemon = rep.reader.daemon = True
        writer.start()
        rep.reader.start()
        self._loop.call_later(self._start_timeout, self._overdue, rep, proc)

    def _overdue(self, rep: _Replica, proc: BaseProcess) -> None:
        """A replica that hangs while loading is killed (start() has its own timeout for the
        first one to come up)."""
        if rep.process is proc and not rep.ready and self.state is not PoolState.STARTING:
            rep.failure = f"not ready after {self._start_timeout:g} s"
            log.warning("replica %d %s; killing it", rep.placement.index, rep.failure)
            proc.kill()

    def _start_failure(self, rep: _Replica, how: str | None) -> str:
        """What to tell of a replica that never came up: `how` it exited, or None if it is
        still loading at the start timeout."""
        i = rep.placement.index
        if how is None or (rep.failure or "").startswith("not ready"):
            return (
                f"replica {i} not ready after {self._start_timeout:g} s: loading the model took "
                "too long; raise --replica-start-timeout, lower --replicas, or check that the "
                "machine has enough memory"
            )
        if rep.failure:
            return (
                f"replica {i} {rep.failure}; its traceback is in the log above: check that the "
                "model loads on this machine, or lower --replicas if memory is short"
            )
        return (
            f"replica {i} exited while starting ({how}); any error it printed is in the log "
            "above; killed by a signal, it may lack memory: check dmesg, or lower --replicas"
        )

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the pool was abandoned
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_message(self, rep: _Replica, generation: int, msg: tuple[Any, ...]) -> None:
        if generation != rep.generation:
            return
        kind, i = msg[0], rep.placement.index
        if kind == "ready":
            rep.ready = rep.came_up = True
            took, cpus = time.monotonic() - rep.started_at, ",".join(map(str, rep.placement.cpus))
            log.info("replica %d ready in %.1f s (pid %d, cpus %s, neuron cores %s)",
                     i, took, msg[1], cpus, rep.placement.neuron_cores)  # fmt: skip
            for step, at in msg[2].items():
                mark(f"replica {i}: {step}", at)
            mark(f"replica {i} ready")
            if self.state is PoolState.READY and all(r.ready for r in self._reps):
                log.info("all %d replicas ready", self.size)
        elif kind == "failed":
            rep.failure = f"failed to start: {msg[1]}"
        elif (batch := rep.in_flight.pop(msg[1], None)) is not None:
            rep.deaths = 0
            if batch.result.done():  # the caller cancelled it
                pass
            elif kind == "ok":
                mark("first batch done", once=True)
                batch.result.set_result(msg[2])
            else:
                batch.result.set_exception(ReplicaError(f"replica {i} failed a batch: {msg[2]}"))
        self._pump()
        self._changed.set()

    def _on_exit(self, rep: _Replica, generation: int, code: int | None) -> None:
        if generation != rep.generation:
            return
        rep.process, rep.ready, i, how = None, False, rep.placement.index, _describe_exit(code)
        self._changed.set()
        if self.state is PoolState.STARTING:
            self._start_error = self._start_error or self._start_failure(rep, how)
        if self._stopping or self._failed is not None or self.state is PoolState.STARTING:
            return
        if not rep.came_up:  # it fails as it would have failed the start, only later
            self._fail_all(self._start_failure(rep, how), f"replica {i} could not start ({how})")
            return
        lost = list(rep.in_flight.values())
        rep.deaths += 1
        for batch in lost:
            batch.deaths += 1
        n = len(lost)
        event = f"replica {i} died ({how}) with {n} batch{'es' * (n != 1)} in flight"
        last = rep.failure or how.split(",")[0]
        if rep.deaths >= self._max_deaths:
            self._fail_all(
                f"replica {i} died {rep.deaths} times in a row (last: {last}); {_ADVICE}", event
            )
        elif any(b.deaths >= self._max_deaths for b in lost):
            # A batch that kills whichever replica runs it would otherwise cycle forever.
            self._fail_all(f"a batch was in flight at {self._max_deaths} replica deaths "
                           f"(last: replica {i}, {last}); {_ADVICE}", event)  # fmt: skip
        else:
            self.restarts += 1
            log.warning("%s; restarting (restart %d)", event, self.restarts)
            rep.in_flight.clear()
            self._waiting.extendleft(reversed(lost))  # ahead of new work: submitted earlier
            try:
                self._spawn(rep)
            except Exception as e:
                self._fail_all(f"replica {i} could not be restarted: {e}", event)
            self._pump()

    def _fail_all(self, message: str, event: str | None = None) -> None:
        """Every pending batch gets ReplicaError(message); after an `event`, every later one too."""
        if event is not None:
            log.error("%s; giving up: %s", event, message)
            self._failed = message
        left = [*self._waiting, *(b for r in self._reps for b in r.in_flight.values())]
        self._waiting.clear()
        for rep in self._reps:
            rep.in_flight.clear()
        for batch in left:
            if not batch.sent.done():  # its submit() raises; nobody holds its result future
                batch.sent.set_exception(ReplicaError(message))
                batch.result.cancel()
            elif not batch.result.done():
                batch.result.set_exception(ReplicaError(message))

    async def _stop_replicas(self, *, graceful: bool) -> None:
        """Ask every replica to stop (or kill it), give it a grace period, then kill it."""
        self._stopping = True
        if self._launching is not None:  # the replicas it is starting are stopped here too
            await asyncio.wait([self._launching])
            if not self._launching.cancelled():
                self._launching.exception()  # start() raises it, if anyone
        for rep in self._reps:
            if graceful and rep.ready:
                rep.sendq.put(None)  # nothing is in flight: it stops right away
            elif rep.process is not None:  # (one still loading would finish loading first)
                rep.process.kill()
        exited = lambda: all(r.process is None for r in self._reps)  # noqa: E731
        if not await self._wait_for(exited, _EXIT_GRACE):
            for rep in self._reps:
                if rep.process is not None:
                    log.warning("replica %d did not stop in %g s; killing it",
                                rep.placement.index, _EXIT_GRACE)  # fmt: skip
                    rep.process.kill()
            await self._wait_for(exited, _EXIT_GRACE)
        for rep in self._reps:
            if rep.reader is not None:
                rep.reader.join(timeout=1.0)  # posting the exit was its last act

    def _read_loop(
        self, rep: _Replica, gen: int, proc: BaseProcess, conn: Connection, q: _SendQ, w: Thread
    ) -> None:
        """A thread: hand the replica's messages to the loop, then its exit once reaped."""
        try:
            # Messages before the exit: a dead replica's socket reads as EOF once drained.
            while conn in wait([conn, proc.sentinel]):
                self._post(self._on_message, rep, gen, conn.recv())
        except (EOFError, OSError):  # it died
            pass
        except Exception:
            log.exception("replica %d sent an unreadable message", rep.placement.index)
        proc.join(_EXIT_GRACE)
        if proc.exitcode is None:  # its pipe is closed yet it runs on: it is of no use
            proc.kill()
            proc.join()
        q.put(_END)
        w.join()
        conn.close()
        self._post(self._on_exit, rep, gen, proc.exitcode)

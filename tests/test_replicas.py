"""The replica pool against real spawned replica processes (toy loaders, no model)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchjob.errors import ReplicaError
from batchjob.replica_process import Placement
from batchjob.replica_server import start_replica_server, stop_replica_server
from batchjob.replicas import PoolState, ReplicaPool
from tests.replica_fakes import Toy, all_ready

pytestmark = pytest.mark.timeout(60)

CPUS = sorted(os.sched_getaffinity(0))


def batch(value: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((2, 3), value, dtype=np.int64)}


def check(out: np.ndarray, value: int) -> int:
    """Assert the toy's output for batch(value) and return the pid that computed it."""
    assert out.shape == (2, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], [3 * value, 3 * value])
    return int(out[0, 1])


def one_replica() -> list[Placement]:
    return [Placement(0, (CPUS[0],))]


def snapshot() -> set[Any]:
    """Child processes and threads alive now (the shared pool's, say): not the test's to check."""
    return {*multiprocessing.active_children(), *threading.enumerate()}


def leftovers(before: set[Any]) -> list[Any]:
    """Child processes and threads started since `before` that still run."""
    now = {*multiprocessing.active_children(), *threading.enumerate()}
    return [x for x in now - before if x.is_alive()]


def record_loop_errors() -> list[dict[str, Any]]:
    """Errors the loop would only log: a future resolved twice, an exception never retrieved."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[asyncio.AbstractEventLoop, ReplicaPool]]:
    """One two-replica pool for the tests that leave it as they found it (spawning is slow)."""
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    placements = [Placement(0, (CPUS[0],)), Placement(1, (CPUS[-1],), neuron_cores="1")]
    pool = ReplicaPool(Toy(delay=0.002, raise_on=-7), placements)
    loop.run_until_complete(pool.start())
    loop.run_until_complete(all_ready(pool))  # the tests here see both replicas answer
    yield loop, pool
    loop.run_until_complete(pool.close())
    loop.close()
    assert errors == []


def run(
    shared: tuple[asyncio.AbstractEventLoop, ReplicaPool], coro: Coroutine[Any, Any, Any]
) -> Any:
    return shared[0].run_until_complete(asyncio.wait_for(coro, 30))


def test_many_concurrent_batches_correct_once_each_round_robin(shared: Any) -> None:
    _, pool = shared
    calls: Counter[int] = Counter()

    async def main() -> list[np.ndarray]:
        futures = await asyncio.gather(*(pool.submit(batch(i)) for i in range(200)))
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _f, i=i: calls.update([i]))
        outs = await asyncio.gather(*futures)
        await asyncio.sleep(0)  # let the done callbacks run
        return outs

    outs = run(shared, main())
    pids = Counter(check(out, i) for i, out in enumerate(outs))
    assert calls == Counter(range(200))
    assert len(pids) == 2
    assert min(pids.values()) >= 40, pids  # round-robin: both replicas take a fair share
    assert pool.peak_in_flight == 2  # backpressure: never more than in_flight per replica
    assert pool.restarts == 0
    assert pool.state is PoolState.READY


def test_replicas_apply_their_placement(shared: Any) -> None:
    _, pool = shared

    async def main() -> dict[int, dict[str, Any]]:
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(20):
            outs = await asyncio.gather(*(pool.run({"probe": np.zeros(1)}) for _ in range(4)))
            seen.update({out[0]["pid"]: out[0] for out in outs})
            if len(seen) == 2:
                break
        return seen

    infos = sorted(run(shared, main()).values(), key=lambda info: info["neuron_cores"] or "")
    assert [i["neuron_cores"] for i in infos] == [None, "1"]
    assert [i["cpus"] for i in infos] == [[CPUS[0]], [CPUS[-1]]]
    assert [i["threads"] for i in infos] == [1, 1]
    assert "NEURON_RT_VISIBLE_CORES" not in os.environ  # set in the replica only


def test_predict_exception_fails_that_batch_only(shared: Any) -> None:
    _, pool = shared
    message = r"replica [01] failed a batch: ValueError: bad input -7"
    with pytest.raises(ReplicaError, match=message):
        run(shared, pool.run(batch(-7)))
    check(run(shared, pool.run(batch(5))), 5)
    assert pool.restarts == 0
    assert pool.state is PoolState.READY


def test_sigkill_mid_job_reruns_in_flight_batches(caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot()
    caplog.set_level(logging.INFO, logger="batchjob.replicas")
    placements = [Placement(0, (CPUS[0],)), Placement(1, (CPUS[-1],))]

    async def main() -> tuple[list[np.ndarray], int]:
        errors = record_loop_errors()
        async with ReplicaPool(Toy(delay=0.1), placements) as pool:
            tasks = [asyncio.create_task(pool.run(batch(i))) for i in range(30)]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            # The pool refills a replica's slot as soon as a result comes back: it has work.
            os.kill(check(first.result(), tasks.index(first)), signal.SIGKILL)
            outs = await asyncio.gather(*tasks)
        assert errors == []
        return outs, pool.restarts

    outs, restarts = asyncio.run(asyncio.wait_for(main(), 45))
    for i, out in enumerate(outs):
        check(out, i)
    assert restarts == 1
    died = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
    assert len(died) == 1
    assert "(signal SIGKILL, exit -9) with " in died[0]
    assert died[0].endswith("in flight; restarting (restart 1)")
    assert "with 0 batches" not in died[0]
    assert leftovers(before) == []


def test_poison_batch_fails_the_pool_after_three_deaths() -> None:
    before = snapshot()

    async def main() -> ReplicaPool:
        errors = record_loop_errors()
        async with ReplicaPool(Toy(die_on=13), one_replica()) as pool:
            with pytest.raises(
                ReplicaError, match=r"replica 0 died 3 times in a row \(last: exit 3\)"
            ):
                await pool.run(batch(13))
            with pytest.raises(ReplicaError, match=r"died 3 times in a row.*--replicas 1"):
                await pool.submit(batch(1))
        assert errors == []
        return pool

    start = time.monotonic()
    pool = asyncio.run(asyncio.wait_for(main(), 50))
    assert time.monotonic() - start < 50
    assert pool.restarts == 2
    assert pool.state is PoolState.STOPPED
    assert leftovers(before) == []


def test_loader_failure_fails_start() -> None:
    before = snapshot()
    pool = ReplicaPool(Toy(load_error="no graph for bucket 128"), one_replica())
    with pytest.raises(
        ReplicaError, match=r"replica 0 failed to start: RuntimeError: no graph for bucket 128; "
    ):
        asyncio.run(pool.start())
    assert pool.state is PoolState.STOPPED
    assert leftovers(before) == []


def test_start_timeout_kills_the_replicas() -> None:
    before = snapshot()
    placements = [Placement(0, (CPUS[0],)), Placement(1, (CPUS[-1],))]
    pool = ReplicaPool(Toy(load_delay=60), placements, start_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(
        ReplicaError, match=r"replica 0 not ready after 1 s: .*--replica-start-timeout"
    ):
        asyncio.run(pool.start())
    assert time.monotonic() - start < 15
    assert pool.state is PoolState.STOPPED
    assert leftovers(before) == []


def test_close_drains_in_flight_then_stops_by_the_deadline() -> None:
    before = snapshot()

    async def main() -> None:
        pool = ReplicaPool(Toy(delay=0.5, slow_on=99), one_replica())
        await pool.start()
        fast = await pool.submit(batch(1))
        slow = await pool.submit(batch(99))  # sleeps 60 s: outlives the close deadline
        started = time.monotonic()
        await pool.close(timeout=3)
        assert time.monotonic() - started < 3 + 2
        check(fast.result(), 1)  # drained: finished during close
        with pytest.raises(ReplicaError, match="closed after 3 s"):
            slow.result()
        assert pool.state is PoolState.STOPPED
        await pool.close()  # idempotent
        with pytest.raises(ReplicaError, match="stopped"):
            await pool.submit(batch(2))

    asyncio.run(asyncio.wait_for(main(), 45))
    assert leftovers(before) == []


def late_pool(tmp_path: Path, **toy: Any) -> tuple[ReplicaPool, Path]:
    """Two replicas: replica 1 (neuron core "1") loads once the returned file exists."""
    gate = tmp_path / "gate"
    placements = [Placement(0, (CPUS[0],)), Placement(1, (CPUS[-1],), neuron_cores="1")]
    return ReplicaPool(Toy(late="1", gate=str(gate), **toy), placements), gate


def test_batches_go_to_the_first_replica_ready_and_the_others_join(tmp_path: Path) -> None:
    before = snapshot()
    pool, gate = late_pool(tmp_path)

    async def main() -> tuple[set[int], set[int]]:
        errors = record_loop_errors()
        async with pool:
            assert pool.state is PoolState.READY
            assert pool.ready_replicas == 1  # replica 1 waits for the gate
            early = {check(await pool.run(batch(i)), i) for i in range(6)}
            gate.touch()
            await all_ready(pool)
            outs = await asyncio.gather(*(pool.run(batch(i)) for i in range(40)))
            later = {check(out, i) for i, out in enumerate(outs)}
        assert errors == []
        return early, later

    early, later = asyncio.run(asyncio.wait_for(main(), 45))
    assert len(early) == 1  # replica 0 alone
    assert len(later) == 2  # round-robin over both once replica 1 is up
    assert early < later
    assert pool.restarts == 0
    assert leftovers(before) == []


def test_a_replica_that_fails_to_start_later_fails_the_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As it would have failed the start, had it failed first: with what to do about it."""
    before = snapshot()
    pool, gate = late_pool(tmp_path, late_error="out of memory loading the graph", slow_on=3)
    message = (
        r"replica 1 failed to start: RuntimeError: out of memory loading the graph; its "
        r"traceback is in the log above: .*lower --replicas"
    )

    async def main() -> None:
        errors = record_loop_errors()
        async with pool:
            running = await pool.submit(batch(3))  # replica 0 has it, for a minute
            gate.touch()
            with pytest.raises(ReplicaError, match=message):
                await running
            assert pool.failed is not None
            with pytest.raises(ReplicaError, match=message):
                await pool.submit(batch(4))
        assert errors == []

    asyncio.run(asyncio.wait_for(main(), 45))
    assert pool.restarts == 0
    assert pool.state is PoolState.STOPPED
    assert any("replica 1 could not start (exit 1); giving up" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert leftovers(before) == []


def test_close_stops_a_replica_still_loading_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = snapshot()
    caplog.set_level(logging.INFO, logger="batchjob.replicas")
    pool, _ = late_pool(tmp_path)  # the gate never opens

    async def main() -> None:
        async with pool:
            check(await pool.run(batch(2)), 2)

    asyncio.run(asyncio.wait_for(main(), 45))
    assert pool.state is PoolState.STOPPED
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert leftovers(before) == []


def test_replicas_fork_from_the_server_and_see_the_environment_of_their_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch is imported once, in the fork server; a replica still sees the environment the
    pool had when it started it, not the server's (set here after the server started)."""
    start_replica_server()
    monkeypatch.setenv("BATCHJOB_PROBE", "set after the server started")
    caplog.set_level(logging.DEBUG, logger="batchjob.startup")

    async def main() -> dict[str, Any]:
        async with ReplicaPool(Toy(), one_replica()) as pool:
            info: dict[str, Any] = (await pool.run({"probe": np.zeros(1)}))[0]
            return info

    info = asyncio.run(asyncio.wait_for(main(), 45))
    assert info["probe_env"] == "set after the server started"
    steps = [r.getMessage() for r in caplog.records if "replica 0: " in r.getMessage()]
    assert any("replica 0: torch imported" in s for s in steps), steps
    assert any("replica 0: fork server ready" in s for s in steps), steps


def test_batches_submitted_while_the_replicas_load_wait_for_the_first_ready() -> None:
    before = snapshot()

    async def main() -> None:
        errors = record_loop_errors()
        pool = ReplicaPool(Toy(load_delay=0.2), one_replica())
        pool.launch()
        early = asyncio.ensure_future(pool.run(batch(5)))
        await asyncio.sleep(0)
        assert not early.done()
        await pool.start()
        check(await early, 5)
        await pool.close()
        assert errors == []

    asyncio.run(asyncio.wait_for(main(), 45))
    assert leftovers(before) == []


def test_batches_waiting_for_replicas_that_never_come_up_fail_with_the_reason() -> None:
    before = snapshot()
    message = r"replica 0 failed to start: RuntimeError: no graph for bucket 128; "

    async def main() -> None:
        errors = record_loop_errors()
        pool = ReplicaPool(Toy(load_error="no graph for bucket 128"), one_replica())
        pool.launch()
        early = asyncio.ensure_future(pool.run(batch(5)))
        with pytest.raises(ReplicaError, match=message):
            await pool.start()
        with pytest.raises(ReplicaError, match=message):
            await early
        with pytest.raises(ReplicaError, match=message):
            await pool.submit(batch(6))
        await pool.close()
        assert pool.state is PoolState.STOPPED
        assert errors == []

    asyncio.run(asyncio.wait_for(main(), 45))
    assert leftovers(before) == []


def test_a_pool_closed_while_it_starts_stops_its_replicas() -> None:
    before = snapshot()

    async def main() -> None:
        pool = ReplicaPool(Toy(load_delay=60), one_replica())
        pool.launch()
        early = asyncio.ensure_future(pool.run(batch(5)))
        await asyncio.sleep(0)
        await pool.close()
        with pytest.raises(ReplicaError, match="closed while starting"):
            await early
        assert pool.state is PoolState.STOPPED

    asyncio.run(asyncio.wait_for(main(), 45))
    assert leftovers(before) == []


def test_a_stopped_fork_server_is_started_again_by_the_next_pool() -> None:
    """What the CLI does on its way out (stop it, even mid-import) leaves later pools whole."""
    start_replica_server()
    stop_replica_server()  # most likely while it imports torch
    stop_replica_server()  # none running: nothing to do

    async def main() -> int:
        async with ReplicaPool(Toy(), one_replica()) as pool:
            return check(await pool.run(batch(4)), 4)

    assert asyncio.run(asyncio.wait_for(main(), 45)) != os.getpid()


def _gone(pids: set[int], seconds: float = 10.0) -> set[int]:
    """Those of `pids` still running after up to `seconds` (orphans are reaped by init)."""
    deadline = time.monotonic() + seconds
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.05)
    return alive


def test_a_killed_fork_server_costs_restarts_not_results() -> None:
    """SIGKILL to the fork server (the OOM killer may pick it): the pool can no longer learn
    how its replicas end, takes them as dead, starts new ones from a new server and runs
    their batches again; every result is right and the old replicas don't linger."""
    import multiprocessing.forkserver

    before = snapshot()
    placements = [Placement(0, (CPUS[0],)), Placement(1, (CPUS[-1],))]

    async def main() -> tuple[set[int], list[np.ndarray], int]:
        async with ReplicaPool(Toy(), placements) as pool:
            await all_ready(pool)
            first = {check(await pool.run(batch(i)), i) for i in range(8)}
            server = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
            os.kill(server, signal.SIGKILL)
            for _ in range(1000):  # polled: the pool notices within moments (10 s at most)
                if pool.restarts:
                    break
                await asyncio.sleep(0.01)
            outs = await asyncio.gather(*(pool.run(batch(i)) for i in range(20)))
            return first, outs, pool.restarts

    first, outs, restarts = asyncio.run(asyncio.wait_for(main(), 60))
    for i, out in enumerate(outs):
        check(out, i)
    assert restarts >= 1
    assert _gone(first) == set()
    assert leftovers(before) == []

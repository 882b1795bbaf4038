"""The dynamic-batching engine, against a stand-in pool whose outputs are computed from each
row's token ids: every result can be checked against its own record, whatever batch it rode
in. (The real replicas are exercised through the HTTP server in test_serving.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from batchjob.artifact import Artifact
from batchjob.batching import Shape
from batchjob.engine import Engine, EngineClosedError
from batchjob.errors import BatchJobError, ReplicaError, UsageError
from batchjob.records import Record
from batchjob.tokens import RecordTokenizer
from tests.conftest import CompileFn, make_texts
from tests.replica_fakes import StandInPool

SHAPES = (Shape(16, 4), Shape(32, 2))


def expected_scores(tokenizer: RecordTokenizer, record: Record) -> np.ndarray:
    encoded = tokenizer.encode([record])[0]
    assert encoded is not None
    logits = np.array([sum(encoded.ids) / 1e4, 0, 0], dtype=np.float32)
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def artifact(compiled: CompileFn, classifier_dir: Any) -> Artifact:
    found = compiled(classifier_dir, shapes=SHAPES)
    assert found.strategy == "buckets"  # the batch sizes below are the buckets'
    return found


@pytest.fixture(scope="module")
def packed(compiled: CompileFn, classifier_dir: Any) -> Artifact:
    found = compiled(classifier_dir, shapes=(Shape(32, 2),), packing=True)
    assert found.strategy == "packing"
    return found


@pytest.fixture(scope="module")
def tokenizer(artifact: Artifact) -> RecordTokenizer:
    return RecordTokenizer(artifact.tokenizer_path, artifact.max_length)


Scenario = Callable[[Engine, StandInPool], Awaitable[None]]


async def until(condition: Callable[[], object]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in 10 s")


def run_engine(
    artifact: Artifact,
    tokenizer: RecordTokenizer,
    scenario: Scenario,
    *,
    delay: float = 0.005,
    hold: bool = False,
    fail: Exception | None = None,
    defer: bool = False,
) -> StandInPool:
    async def main() -> StandInPool:
        pool = StandInPool(asyncio.Event() if hold else None, fail, defer)
        async with Engine(artifact, pool, max_batch_delay=delay, tokenizer=tokenizer) as engine:
            await asyncio.wait_for(scenario(engine, pool), 30)
        return pool

    return asyncio.run(main())


@pytest.mark.parametrize("strategy", ["buckets", "packing"])
def test_concurrent_calls_get_their_own_results_in_order(
    strategy: str, artifact: Artifact, packed: Artifact, tokenizer: RecordTokenizer
) -> None:
    if strategy == "packing":
        artifact = packed
    calls = []
    for k in range(6):
        texts = make_texts(15 + 7 * k, seed=k, max_words=40)  # some past 32 tokens: truncated
        records = [Record(f"{k}:{i}", t) for i, t in enumerate(texts)]
        records.insert(3, Record(f"{k}:bad", None, error=f"call {k}: bad record"))
        calls.append(records)
    answers: list[Any] = []

    async def scenario(engine: Engine, pool: StandInPool) -> None:
        answers.extend(await asyncio.gather(*(engine.infer(c) for c in calls)))

    pool = run_engine(artifact, tokenizer, scenario)
    for records, results in zip(calls, answers, strict=True):
        assert len(results) == len(records)
        for record, result in zip(records, results, strict=True):
            if record.error is not None:
                assert result.error == record.error
                assert result.values is None
                continue
            assert result.error is None
            np.testing.assert_allclose(result.values["scores"], expected_scores(tokenizer, record))
            assert result.values["label"] == artifact.labels[0]
            encoded = tokenizer.encode([record])[0]
            assert encoded is not None
            assert result.truncated == encoded.truncated
    assert any(r.truncated for results in answers for r in results)
    assert sum(pool.valid_rows()) == sum(len(c) - 1 for c in calls)
    if strategy == "packing":  # rows of 2 × 32 tokens held more than 2 records
        assert max(pool.valid_rows()) > 2


def test_records_of_concurrent_calls_share_a_batch(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    started = time.monotonic()

    async def scenario(engine: Engine, pool: StandInPool) -> None:
        first = asyncio.create_task(engine.infer([Record("a", "one"), Record("b", "two")]))
        await asyncio.sleep(0.2)  # its two records wait: a 16-token batch holds four
        assert pool.batches == []
        assert engine.batcher.pending == 2
        second = await engine.infer([Record("c", "three"), Record("d", "four")])
        assert [r.error for r in await first + second] == [None] * 4

    # With a 10 s delay, only the second call's records can have completed the batch.
    pool = run_engine(artifact, tokenizer, scenario, delay=10.0)
    assert pool.valid_rows() == [4]
    assert time.monotonic() - started < 8


def test_a_partial_batch_goes_after_the_delay(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    took = []

    async def scenario(engine: Engine, pool: StandInPool) -> None:
        started = time.monotonic()
        [result] = await engine.infer([Record("a", "alone")])
        took.append(time.monotonic() - started)
        assert result.error is None

    pool = run_engine(artifact, tokenizer, scenario, delay=0.3)
    assert pool.valid_rows() == [1]
    assert 0.3 <= took[0] < 5


def test_partial_batches_wait_while_the_pool_is_busy(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    async def scenario(engine: Engine, pool: StandInPool) -> None:
        assert pool.hold is not None
        full = asyncio.create_task(engine.infer([Record(str(i), "w") for i in range(4)]))
        await until(lambda: pool.submitting)  # the full batch went out at once
        late = asyncio.create_task(engine.infer([Record("x", "late")]))
        await asyncio.sleep(0.3)  # far past the 20 ms delay
        # Sending a partial batch now would only queue it behind the busy replicas.
        assert engine.batcher.pending == 1
        assert not late.done()
        pool.hold.set()
        assert len(await full) == 4
        assert len(await late) == 1

    pool = run_engine(artifact, tokenizer, scenario, delay=0.02, hold=True)
    assert pool.valid_rows() == [4, 1]


def test_partial_batches_wait_while_every_replica_has_a_batch(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    async def scenario(engine: Engine, pool: StandInPool) -> None:
        full = asyncio.create_task(engine.infer([Record(str(i), "w") for i in range(4)]))
        await until(lambda: pool.running)  # the one replica runs the full batch
        late = asyncio.create_task(engine.infer([Record("x", "late")]))
        await asyncio.sleep(0.3)
        # The pool took the full batch (a second slot is free), but the replica is busy: the
        # partial batch waits, to fill, until the replica would have nothing to run.
        assert engine.batcher.pending == 1
        assert not late.done()
        pool.finish()
        await until(lambda: pool.running)
        pool.finish()
        assert len(await full) == 4
        assert len(await late) == 1

    pool = run_engine(artifact, tokenizer, scenario, delay=0.02, defer=True)
    assert pool.valid_rows() == [4, 1]


def test_error_records_skip_inference(artifact: Artifact, tokenizer: RecordTokenizer) -> None:
    async def scenario(engine: Engine, pool: StandInPool) -> None:
        results = await engine.infer([Record("1", None, error="line 1: invalid JSON")])
        assert results[0].error == "line 1: invalid JSON"
        assert results[0].values is None
        assert await engine.infer([]) == []

    assert run_engine(artifact, tokenizer, scenario).batches == []


def test_a_failed_batch_fails_its_calls_and_the_engine_goes_on(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    async def scenario(engine: Engine, pool: StandInPool) -> None:
        with pytest.raises(ReplicaError, match="replica 0 died"):
            await engine.infer([Record("a", "one"), Record("b", "two " * 20)])
        pool.fail = None
        assert [r.error for r in await engine.infer([Record("c", "three")])] == [None]

    run_engine(artifact, tokenizer, scenario, fail=ReplicaError("replica 0 died"))


def test_unreadable_outputs_fail_the_call_instead_of_hanging(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    class Truncating(StandInPool):
        async def submit(self, arrays: dict[str, np.ndarray]) -> asyncio.Future[np.ndarray]:
            future = await super().submit(arrays)
            wrong: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
            wrong.set_result(future.result()[:1])  # one row for a batch of four
            return wrong

    async def main() -> None:
        async with Engine(artifact, Truncating(), tokenizer=tokenizer) as engine:
            records = [Record(str(i), "w") for i in range(4)]
            with pytest.raises(BatchJobError, match="unreadable model output for a 4x16 batch"):
                await engine.infer(records)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_close_finishes_calls_in_progress_then_refuses_new_ones(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    async def main() -> None:
        pool = StandInPool()
        engine = Engine(artifact, pool, max_batch_delay=60.0, tokenizer=tokenizer)
        await engine.start()
        call = asyncio.create_task(engine.infer([Record("a", "waiting for company")]))
        await until(lambda: engine.batcher.pending)
        started = time.monotonic()
        await engine.close()  # does not wait out the 60 s delay: the batch goes now
        assert time.monotonic() - started < 5
        assert (await call)[0].error is None
        with pytest.raises(EngineClosedError):
            await engine.infer([Record("b", "too late")])

    asyncio.run(asyncio.wait_for(main(), 30))


def test_close_after_its_timeout_fails_calls_instead_of_leaving_them_waiting(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    async def main() -> None:
        pool = StandInPool(hold=asyncio.Event())  # replicas that never take the batches
        engine = Engine(artifact, pool, tokenizer=tokenizer)
        await engine.start()
        stuck = asyncio.create_task(engine.infer([Record(str(i), "w") for i in range(9)]))
        await until(lambda: pool.submitting)
        queued = asyncio.create_task(engine.infer([Record(f"q{i}", "w") for i in range(12)]))
        await asyncio.sleep(0.1)
        pending = engine.batcher.pending
        # The dispatcher's queue is full: this call waits to add its record.
        blocked = asyncio.create_task(engine.infer([Record("b", "w")]))
        await asyncio.sleep(0.1)
        assert engine.batcher.pending == pending
        await engine.close(timeout=0.2)
        for call in (stuck, queued):
            with pytest.raises(EngineClosedError):
                await call
        with pytest.raises(EngineClosedError, match=r"engine closed after 0\.2 s"):
            await asyncio.wait_for(blocked, 5)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_call_cancelled_while_the_pool_is_full_strands_no_other_call(
    artifact: Artifact, tokenizer: RecordTokenizer
) -> None:
    """A call whose records would fill a batch holding another call's record, cancelled (a
    client went away, a signal) while the pool is too busy to take batches: the other call
    still gets its result, and the engine does not spin on records that no batch holds."""

    async def scenario(engine: Engine, pool: StandInPool) -> None:
        assert pool.hold is not None
        busy = asyncio.create_task(engine.infer([Record(f"b{i}", "w") for i in range(12)]))
        await until(lambda: pool.submitting)  # 1 batch held by the pool, 2 queued: full
        alone = asyncio.create_task(engine.infer([Record("a", "alone")]))
        await asyncio.sleep(0.1)
        company = asyncio.create_task(engine.infer([Record(f"c{i}", "c") for i in range(7)]))
        await asyncio.sleep(0.1)  # "a" and 3 of these would make a batch, the other 4 one more
        company.cancel()
        await asyncio.sleep(0.1)
        pool.hold.set()
        assert len(await busy) == 12
        [result] = await asyncio.wait_for(alone, 5)
        assert result.error is None
        with pytest.raises(asyncio.CancelledError):
            await company

    run_engine(artifact, tokenizer, scenario, delay=0.3, hold=True)


def test_config_errors_name_the_value(artifact: Artifact, tokenizer: RecordTokenizer) -> None:
    with pytest.raises(UsageError, match="max_batch_delay must be ≥ 0 seconds, got -1"):
        Engine(artifact, StandInPool(), max_batch_delay=-1, tokenizer=tokenizer)


def test_backend_devices_are_known_without_importing_the_backends() -> None:
    from batchjob.backends import DEVICES, backend_device, get_backend

    for name in DEVICES:
        assert backend_device(name) == get_backend(name).device
    with pytest.raises(UsageError, match="--backend must be one of cpu, neuron, neuronx, got 'gpu"):
        backend_device("gpu")

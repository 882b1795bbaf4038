"""The SQS client against moto's server: receive with the receive count, deletes shared in
batches of ten, failed delete entries retried or reported (never taken for done), release,
and a queue that doesn't exist."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchjob.errors import UsageError
from batchjob.sqs import Message, QueueError, SqsQueue
from tests.sqs_queues import Queue, Queues


def fill(queue: Queue, n: int) -> None:
    for i in range(n):
        queue.send(f"body {i}")


async def receive_all(sqs: SqsQueue, n: int, visibility: int = 30) -> list[Message]:
    got: list[Message] = []
    while len(got) < n:
        got += await sqs.receive(n - len(got), 1, visibility)
    return got


def test_deletes_share_batches_of_ten(queues: Queues) -> None:
    queue = queues.make()
    fill(queue, 12)
    calls: list[int] = []

    async def main() -> None:
        async with SqsQueue(queue.url) as sqs:
            sqs._client.meta.events.register(
                "before-parameter-build.sqs.DeleteMessageBatch",
                lambda params, **_: calls.append(len(params["Entries"])),
            )
            messages = await receive_all(sqs, 12)
            assert {m.receive_count for m in messages} == {1}
            await asyncio.gather(*(sqs.delete(m) for m in messages))

    asyncio.run(main())
    assert sorted(calls) == [2, 10]
    assert queue.depth() == 0


def test_failed_delete_entries_are_retried_or_reported(queues: Queues) -> None:
    queue = queues.make()
    fill(queue, 2)
    injected: list[str] = []

    def fail_first_entry_once(parsed: dict[str, Any], **_: Any) -> None:
        # As SQS may answer: HTTP 200 with an entry in Failed[], not the server's fault.
        if not injected and parsed.get("Successful"):
            entry = parsed["Successful"].pop(0)
            parsed.setdefault("Failed", []).append(
                {"Id": entry["Id"], "SenderFault": False, "Code": "InternalError"}
            )
            injected.append(entry["Id"])

    async def main() -> None:
        async with SqsQueue(queue.url) as sqs:
            sqs._client.meta.events.register(
                "after-call.sqs.DeleteMessageBatch", fail_first_entry_once
            )
            first, second = await receive_all(sqs, 2)
            await asyncio.gather(sqs.delete(first), sqs.delete(second))  # the retry succeeds
            assert injected
            stale = Message("gone", "not-a-receipt-handle", "", 1, 0.0)
            with pytest.raises(QueueError, match="ReceiptHandleIsInvalid"):
                await sqs.delete(stale)  # the sender's fault: reported at once

    asyncio.run(main())
    assert queue.depth() == 0


def test_release_makes_messages_visible_at_once(queues: Queues) -> None:
    queue = queues.make(visibility=300)
    fill(queue, 3)

    async def main() -> None:
        async with SqsQueue(queue.url) as sqs:
            messages = await receive_all(sqs, 3, visibility=300)
            assert await sqs.receive(10, 0, 300) == []
            assert await sqs.release(messages) == messages
            again = await receive_all(sqs, 3)
            assert sorted(m.id for m in again) == sorted(m.id for m in messages)
            assert {m.receive_count for m in again} == {2}

    asyncio.run(main())


def test_queue_by_name_and_attributes(queues: Queues) -> None:
    queue = queues.make(visibility=7, max_receive_count=4)

    async def main() -> None:
        async with SqsQueue(queue.url.rsplit("/", 1)[1]) as sqs:
            assert sqs.url == queue.url
            assert sqs.visibility_timeout == 7
            assert sqs.max_receive_count == 4

    asyncio.run(main())


def test_a_queue_that_does_not_exist_is_a_usage_error(queues: Queues) -> None:
    async def main() -> None:
        async with SqsQueue("no-such-queue-here"):
            pass

    expected = r"--queue no-such-queue-here: GetQueueUrl: .*NonExistentQueue"
    with pytest.raises(UsageError, match=expected):
        asyncio.run(main())

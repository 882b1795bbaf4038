"""SQS through aioboto3: long-poll receive, heartbeat, release, and batched deletes.

Endpoints, credentials, region and retries come from the standard AWS configuration
(`AWS_ENDPOINT_URL[_SQS]`, profiles, `AWS_MAX_ATTEMPTS`); only the read timeout is ours: it
must outlast the 20-second long poll. What fails after botocore's retries is logged with the
message's id and never taken for done: a message not deleted comes back, and the worker's
outputs are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from batchjob.errors import BatchJobError, UsageError

log = logging.getLogger("batchjob.sqs")

MAX_WAIT_SECONDS = 20  # SQS's longest long poll
BATCH_LIMIT = 10  # messages per ReceiveMessage, entries per *Batch call
DELETE_ATTEMPTS = 3  # for entries failed on the server's side (SenderFault false)
DELETE_LINGER = 0.02  # seconds a delete waits for others to share its DeleteMessageBatch


class QueueError(BatchJobError):
    """An SQS call failed after botocore's retries."""


@dataclass(eq=False)
class Message:
    id: str
    receipt: str
    body: str
    receive_count: int  # ApproximateReceiveCount: 1 on the first delivery
    received: float  # time.monotonic() when it arrived: the visibility clock starts there


def _error(call: str, e: Exception) -> QueueError:
    """One line, whatever the service put in its message."""
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        message = " ".join(str(error.get("Message", "")).split())
        return QueueError(f"{call}: {error.get('Code', '?')}: {message}")
    return QueueError(f"{call}: {type(e).__name__}: {' '.join(str(e).split())}")


class SqsQueue:
    """One queue: `async with SqsQueue(url) as queue: ...`, within one event loop.

    `url` may also be a queue name. Entering checks that the queue exists and reads its
    visibility timeout and redrive policy (UsageError when it can't)."""

    def __init__(self, url: str, *, connections: int = 20) -> None:
        self.url = url
        self.connections = connections
        self.visibility_timeout = 30
        self.max_receive_count: int | None = None  # from the redrive policy, when there is one
        self.maximum_message_size = 262_144  # bytes a body may have: the queue's setting
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._deletes: list[tuple[Message, asyncio.Future[None]]] = []
        self._deleting: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SqsQueue:
        config = Config(
            connect_timeout=10,
            read_timeout=MAX_WAIT_SECONDS + 20,  # above the long poll, or every idle poll fails
            max_pool_connections=self.connections,
            tcp_keepalive=True,
        )
        client = aioboto3.Session().client("sqs", config=config)
        self._client = await self._stack.enter_async_context(client)
        call = "GetQueueAttributes"
        try:
            if not self.url.startswith(("https://", "http://")):
                call = "GetQueueUrl"
                self.url = (await self._client.get_queue_url(QueueName=self.url))["QueueUrl"]
                call = "GetQueueAttributes"
            attributes = (
                await self._client.get_queue_attributes(
                    QueueUrl=self.url,
                    AttributeNames=["VisibilityTimeout", "RedrivePolicy", "MaximumMessageSize"],
                )
            )["Attributes"]
        except (ClientError, BotoCoreError) as e:
            await self._stack.aclose()
            # No such queue, no access: a bad invocation. No answer at all: a failure (exit 1).
            error = UsageError if isinstance(e, ClientError) else QueueError
            raise error(f"--queue {self.url}: {_error(call, e)}") from None
        self.visibility_timeout = int(attributes.get("VisibilityTimeout", 30))
        self.maximum_message_size = int(attributes.get("MaximumMessageSize", 262_144))
        if policy := attributes.get("RedrivePolicy"):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                self.max_receive_count = int(json.loads(policy)["maxReceiveCount"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._deleting is not None:
            await asyncio.wait([self._deleting])
        await self._stack.aclose()

    async def receive(self, max_messages: int, wait_seconds: int, visibility: int) -> list[Message]:
        """Up to `max_messages` (≤ 10), waiting up to `wait_seconds` (≤ 20) for the first;
        each hidden from other consumers for `visibility` seconds."""
        try:
            response = await self._client.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=max(1, min(BATCH_LIMIT, max_messages)),
                WaitTimeSeconds=max(0, min(MAX_WAIT_SECONDS, wait_seconds)),
                VisibilityTimeout=visibility,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        except (ClientError, BotoCoreError) as e:
            raise _error("ReceiveMessage", e) from None
        now = time.monotonic()
        return [
            Message(
                m["MessageId"],
                m["ReceiptHandle"],
                m.get("Body", ""),
                int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                now,
            )
            for m in response.get("Messages", ())
        ]

    async def send(self, bodies: Sequence[str]) -> int:
        """Send `bodies` in SendMessageBatch calls of up to 10; how many were sent. Entries
        the service failed (SenderFault false) are tried again; QueueError names what was
        still not sent (the others were)."""
        sent = 0
        for start in range(0, len(bodies), BATCH_LIMIT):
            todo = {str(i): body for i, body in enumerate(bodies[start : start + BATCH_LIMIT])}
            for attempt in range(1, DELETE_ATTEMPTS + 1):
                entries = [{"Id": i, "MessageBody": body} for i, body in todo.items()]
                try:
                    response = await self._client.send_message_batch(
                        QueueUrl=self.url, Entries=entries
                    )
                except (ClientError, BotoCoreError) as e:  # botocore retried it already
                    raise _not_sent(sent, len(bodies), _error("SendMessageBatch", e)) from None
                sent += len(response.get("Successful", ()))
                failed = response.get("Failed", ())
                if not failed:
                    break
                first = failed[0]
                what = f"{first.get('Code')}: {first.get('Message', '')}"
                if any(f.get("SenderFault") for f in failed) or attempt == DELETE_ATTEMPTS:
                    error = QueueError(f"SendMessageBatch: {what} (attempt {attempt})")
                    raise _not_sent(sent, len(bodies), error)
                todo = {f["Id"]: todo[f["Id"]] for f in failed}
                await asyncio.sleep(0.1 * 2**attempt)
        return sent

    async def set_visibility(self, message: Message, seconds: int) -> bool:
        """Hide `message` for `seconds` from now (0: visible at once). False when SQS refused
        (the receipt is stale: another consumer has it), logged."""
        try:
            await self._client.change_message_visibility(
                QueueUrl=self.url, ReceiptHandle=message.receipt, VisibilityTimeout=seconds
            )
        except (ClientError, BotoCoreError) as e:
            log.warning("message %s: %s", message.id, _error("ChangeMessageVisibility", e))
            return False
        return True

    async def release(self, messages: Sequence[Message]) -> list[Message]:
        """Make `messages` visible at once, for another consumer to take (on shutdown);
        those released (the others come back when their visibility lapses: logged)."""
        released = []
        for start in range(0, len(messages), BATCH_LIMIT):
            part = {str(i): m for i, m in enumerate(messages[start : start + BATCH_LIMIT])}
            entries = [
                {"Id": i, "ReceiptHandle": m.receipt, "VisibilityTimeout": 0}
                for i, m in part.items()
            ]
            try:
                response = await self._client.change_message_visibility_batch(
                    QueueUrl=self.url, Entries=entries
                )
            except (ClientError, BotoCoreError) as e:
                log.warning("releasing %d message(s): %s", len(part), _error("ChangeVisibility", e))
                continue
            released += [part[ok["Id"]] for ok in response.get("Successful", ())]
            for failed in response.get("Failed", ()):
                log.warning(
                    "message %s not released (%s: %s): it comes back when its visibility lapses",
                    part[failed["Id"]].id, failed.get("Code"), failed.get("Message", ""),
                )  # fmt: skip
        return released

    async def delete(self, message: Message) -> None:
        """Delete `message` once its work is committed; QueueError when SQS didn't.

        Deletes of concurrent calls share DeleteMessageBatch calls of up to 10 entries."""
        future = asyncio.get_running_loop().create_future()
        self._deletes.append((message, future))
        if self._deleting is None or self._deleting.done():
            self._deleting = asyncio.create_task(self._delete_loop())
        await future

    async def _delete_loop(self) -> None:
        await asyncio.sleep(DELETE_LINGER)
        while self._deletes:
            batch, self._deletes = self._deletes[:BATCH_LIMIT], self._deletes[BATCH_LIMIT:]
            try:
                await self._delete_batch(dict(enumerate(batch)))
            except Exception as e:  # unexpected: still, no caller may wait forever
                for _, future in batch:
                    _settle(future, QueueError(f"DeleteMessageBatch: {e!r}"))

    async def _delete_batch(self, todo: dict[int, tuple[Message, asyncio.Future[None]]]) -> None:
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            entries = [{"Id": str(i), "ReceiptHandle": m.receipt} for i, (m, _) in todo.items()]
            try:
                response = await self._client.delete_message_batch(
                    QueueUrl=self.url, Entries=entries
                )
            except (ClientError, BotoCoreError) as e:  # botocore retried it already
                error = _error("DeleteMessageBatch", e)
                for _, future in todo.values():
                    _settle(future, error)
                return
            for done in response.get("Successful", ()):
                _settle(todo.pop(int(done["Id"]))[1], None)
            retry = {}
            for failed in response.get("Failed", ()):
                i = int(failed["Id"])
                what = f"{failed.get('Code')}: {failed.get('Message', '')}"
                if failed.get("SenderFault") or attempt == DELETE_ATTEMPTS:
                    error = QueueError(f"DeleteMessageBatch: {what} (attempt {attempt})")
                    _settle(todo[i][1], error)
                else:
                    log.warning("message %s: delete failed (%s), retrying", todo[i][0].id, what)
                    retry[i] = todo[i]
            if not retry:
                return
            todo = retry
            await asyncio.sleep(0.1 * 2**attempt)


def _not_sent(sent: int, total: int, error: QueueError) -> QueueError:
    return QueueError(f"{sent} of {total} messages sent, then {error}")


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)

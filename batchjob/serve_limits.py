"""`batchjob serve`'s bounds: how many requests are worked on at once, and how long a client
may take to send a request or to take its answer.

- Slots (`--max-concurrent-requests`, default the MaxConcurrentTransforms advertised): at
  most that many requests read their body and are worked on at once, so the memory of the
  requests in progress is bounded by slots × what one request costs. The others wait with
  their body unread: aiohttp stops reading a connection once 2 × `read_bufsize` (128 KiB) of
  its body is buffered, so a waiting request holds a connection and little else. After
  `--queue-timeout` seconds without a slot it is answered 503 with Retry-After.
- Request head (`--header-timeout`): aiohttp's `keepalive_timeout` closes a connection that
  has not sent a whole request head within that many seconds of opening or of its previous
  answer (it fires only while no request is being handled), so it is also how long an idle
  keep-alive connection stays open. aiohttp has no separate deadline for the head.
- Body and answer (`--body-timeout`): aiohttp has no deadline for either, so they are read
  and written here in chunks under one: it starts `--body-timeout` seconds after the slot
  is taken and moves on by one second per MIN_TRANSFER_RATE bytes transferred (as Apache's
  RequestReadTimeout MinRate). A 6 MB body at 64 KiB/s (a link far slower than any within
  AWS) is never cut; a client that sends or takes a byte a second is cut after about
  `--body-timeout` seconds, whatever the payload limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

from aiohttp import StreamReader, web

from batchjob.serve_formats import RequestError

log = logging.getLogger("batchjob.serve")

MIN_TRANSFER_RATE = 64 << 10  # bytes/s a body or an answer must keep up after the grace
SEND_CHUNK = 64 << 10  # aiohttp drains its writer past 64 KiB: the deadline moves per chunk


class NoSlot(RequestError):
    """503: no slot came free in time, or the server is shutting down."""

    def __init__(self, message: str, retry_after: int | None) -> None:
        super().__init__(message, status=503)
        self.retry_after = retry_after


class SendTimeout(Exception):
    """The client did not take its answer in time; the connection was dropped."""


class Slots:
    """At most `size` requests at once; the others wait (first come, first served) up to
    `queue_timeout` seconds."""

    def __init__(self, size: int, queue_timeout: float) -> None:
        self.size = size
        self.queue_timeout = queue_timeout
        self.busy = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(size)
        self._closed = False
        self._mean_hold: float | None = None  # seconds a request held its slot, lately

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[float]:
        """A slot for the block; yields the seconds waited for it. NoSlot when none comes
        free within the queue timeout, or when the server starts shutting down."""
        if self._closed:
            raise NoSlot("not ready: shutting down", None)
        started = time.monotonic()
        if self._semaphore.locked():
            log.debug(
                "POST /invocations waits for a slot: %d of %d busy, %d waiting",
                self.busy, self.size, self.waiting + 1,
            )  # fmt: skip
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await self._semaphore.acquire()
            timed_out = False
        except TimeoutError:
            timed_out = True
        finally:
            self.waiting -= 1
        if timed_out:
            raise self._refusal(time.monotonic() - started)
        if self._closed:  # woken by close()
            self._semaphore.release()
            raise NoSlot("not ready: shutting down", None)
        self.busy += 1
        taken = time.monotonic()
        log.debug(
            "POST /invocations took a slot after %.3fs: %d of %d busy, %d waiting",
            taken - started, self.busy, self.size, self.waiting,
        )  # fmt: skip
        try:
            yield taken - started
        finally:
            self.busy -= 1
            self._semaphore.release()
            held = time.monotonic() - taken
            self._mean_hold = (
                held if self._mean_hold is None else 0.8 * self._mean_hold + 0.2 * held
            )

    def _refusal(self, waited: float) -> NoSlot:
        # When a slot should come free: the recent mean time a request held one, spread over
        # the slots; before any request finished, the slots have been held at least as long
        # as this request waited.
        estimate = waited if self._mean_hold is None else self._mean_hold / self.size
        retry_after = max(1, math.ceil(estimate))
        return NoSlot(
            f"busy: no free slot within {self.queue_timeout:g} s (--queue-timeout): "
            f"{self.busy} requests in progress (--max-concurrent-requests {self.size}), "
            f"{self.waiting} more waiting; retry after {retry_after} s",
            retry_after,
        )

    def close(self) -> None:
        """Shutting down: the requests still waiting are answered 503 at once, not after
        the queue timeout; those holding a slot finish."""
        self._closed = True
        for _ in range(self.waiting):
            self._semaphore.release()  # each waiter wakes, sees _closed and gives it back


async def read_body(
    content: StreamReader, *, limit: int, grace: float, declared: int | None, too_large: str
) -> bytes:
    """The whole body, read under the transfer deadline. RequestError 413 past `limit`
    bytes, 408 when the client is too slow (the connection is then closed)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout_at(started + grace) as deadline:
            while chunk := await content.readany():
                received += len(chunk)
                if received > limit:
                    raise RequestError(f"request body is {too_large}", 413)
                chunks.append(chunk)
                deadline.reschedule(started + grace + received / MIN_TRANSFER_RATE)
    except web.RequestPayloadError as e:  # e.g. Content-Encoding: gzip on a body that isn't
        raise RequestError(f"unreadable request body: {e}", 400) from None
    except TimeoutError:
        of = f" of {declared}" if declared is not None else ""
        raise RequestError(
            f"request body too slow: {received}{of} bytes in {loop.time() - started:.1f} s; "
            f"send at least {MIN_TRANSFER_RATE >> 10} KiB/s after the first {grace:g} s "
            f"(--body-timeout)",
            408,
        ) from None
    return b"".join(chunks)


async def send_body(
    request: web.Request, response: web.StreamResponse, payload: bytes, *, grace: float
) -> None:
    """Write the answer under the transfer deadline; SendTimeout (connection dropped) when
    the client does not take it in time."""
    loop = asyncio.get_running_loop()
    await response.prepare(request)
    started = loop.time()
    view = memoryview(payload)
    sent = 0
    try:
        async with asyncio.timeout_at(started + grace) as deadline:
            while sent < len(view):
                chunk = view[sent : sent + SEND_CHUNK]
                await response.write(chunk)
                sent += len(chunk)
                deadline.reschedule(started + grace + sent / MIN_TRANSFER_RATE)
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # drops what the client did not take
        raise SendTimeout(
            f"client too slow to take its answer: {sent} of {len(payload)} bytes in "
            f"{loop.time() - started:.1f} s (--body-timeout {grace:g})"
        ) from None

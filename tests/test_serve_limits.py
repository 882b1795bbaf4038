"""`batchjob serve`'s bounds (serve_limits.py): request slots, the queue timeout, and the
deadlines for a request's head, its body and its answer, on a real server over real
sockets. Slots are held by real clients that send their body at the pace the test sets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchjob.serve_limits import MIN_TRANSFER_RATE, NoSlot, SendTimeout, Slots, send_body
from tests.conftest import CompileFn
from tests.serve_process import JSONLINES, Server, jsonlines

QUEUE_TIMEOUT = 1.0
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def server(
    compiled: CompileFn, classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One slot; DEBUG logs say when a request takes a slot or waits for one."""
    args = ["--model", compiled(classifier_dir).path, "--port", "0"]
    args += ["--max-concurrent-requests", "1", "--queue-timeout", str(QUEUE_TIMEOUT)]
    args += ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
    srv = Server(args, {}, tmp_path_factory.mktemp("limits"), log_level="DEBUG")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def head(length: int) -> bytes:
    return (
        f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: {JSONLINES}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def post(server: Server, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", "/invocations", body, {"Content-Type": JSONLINES})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def read_response(sock: socket.socket, data: bytes = b"") -> bytes:
    """One whole response (head and Content-Length body), after `data` already received."""
    sock.settimeout(30)
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        data.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]
    ):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-response: {data!r}")
        data += chunk
    return data


def drip(sock: socket.socket, data: bytes) -> tuple[int, bytes]:
    """Send `data` a byte a second until the server answers or hangs up: (bytes sent, what
    it answered; b"" when it hung up without a word)."""
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent : sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent, b""
        if select.select([sock], [], [], 1.0)[0]:
            try:
                return sent + 1, sock.recv(65536)
            except ConnectionResetError:
                return sent + 1, b""
    raise AssertionError("the server took every byte")


def test_a_request_beyond_the_slots_waits_then_gets_503_with_retry_after(server: Server) -> None:
    # The slot holder sends 2 MiB of its body at once (credit for ~30 s at the minimum rate),
    # then holds the rest until the test is done with the request that waits.
    whole = b'{"inputs": "held"' + b" " * (3 << 20) + b"}\n"
    release = threading.Event()

    def hold_the_slot() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(head(len(whole)) + whole[: 2 << 20])
            assert release.wait(60)
            sock.sendall(whole[2 << 20 :])
            return read_response(sock)

    slots_taken = sum("took a slot" in line for line in server.log)
    waits = sum("waits for a slot" in line for line in server.log)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        holder = pool.submit(hold_the_slot)
        try:
            server.wait_for_log("took a slot", slots_taken + 1)
            waiting = pool.submit(post, server, jsonlines([{"inputs": "waits"}]))
            server.wait_for_log("waits for a slot", waits + 1)
            # Meanwhile /ping and /execution-parameters answer at once.
            assert server.request("GET", "/ping", timeout=5)[0] == 200
            status, _, data = server.request("GET", "/execution-parameters", timeout=5)
            assert status == 200
            assert json.loads(data)["MaxConcurrentTransforms"] == 1
            status, headers, data = waiting.result(timeout=60)
        finally:
            release.set()
        assert status == 503, data
        assert int(headers["Retry-After"]) >= 1
        error = json.loads(data)["error"]
        assert "no free slot within 1 s (--queue-timeout)" in error, error
        assert "(--max-concurrent-requests 1)" in error, error
        answer = holder.result(timeout=60)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"label"' in answer
    assert any("POST /invocations 503: busy: no free slot" in line for line in server.log)
    # The slot is free again.
    status, _, data = post(server, jsonlines([{"inputs": "after"}]))
    assert status == 200, data


def test_a_slow_head_is_dropped_and_holds_no_slot(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"P")
        # Sending a head holds no slot: the one slot serves another client meanwhile.
        status, _, data = post(server, jsonlines([{"inputs": "meanwhile"}]))
        assert status == 200, data
        started = time.monotonic()
        whole = head(10)
        sent, answer = drip(sock, whole[1:])
    assert answer == b"", answer  # dropped, not answered
    assert sent < len(whole) - 1
    assert time.monotonic() - started < 30  # HEADER_TIMEOUT, generously


def test_a_slow_body_is_answered_408_and_frees_the_slot(server: Server) -> None:
    body = jsonlines([{"inputs": "a slow client"}] * 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head(len(body)))
        sent, answer = drip(sock, body)
        answer = read_response(sock, answer)
    assert sent < len(body)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"Connection: close" in answer
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    found = re.match(rf"request body too slow: (\d+) of {len(body)} bytes in ", error)
    assert found, error
    assert int(found.group(1)) <= sent
    assert "after the first 3 s (--body-timeout)" in error
    status, _, data = post(server, jsonlines([{"inputs": "after"}]))
    assert status == 200, data


# -- in process: the slots, and the deadline for taking an answer ---------------------------


def test_slots_refuse_after_the_queue_timeout_and_when_closed() -> None:
    async def scenario() -> list[Any]:
        slots = Slots(1, queue_timeout=0.2)
        outcomes: list[Any] = []
        async with slots.hold():
            with pytest.raises(NoSlot) as refused:
                async with slots.hold():
                    pass
            outcomes.append(refused.value)
            slots.queue_timeout = 60  # now only close() ends the wait
            waiter = asyncio.create_task(slots.hold().__aenter__())
            await asyncio.sleep(0)  # the waiter runs up to its wait
            assert slots.waiting == 1
            slots.close()
            outcomes.append(await asyncio.gather(waiter, return_exceptions=True))
        outcomes.append((slots.busy, slots.waiting))
        return outcomes

    timeout, [closed], counts = asyncio.run(scenario())
    assert timeout.status == 503
    assert timeout.retry_after == 1  # no request finished yet: what it waited, rounded up
    assert "1 requests in progress (--max-concurrent-requests 1), 0 more waiting" in str(timeout)
    assert isinstance(closed, NoSlot)
    assert (closed.status, closed.retry_after, str(closed)) == (
        503,
        None,
        "not ready: shutting down",
    )
    assert counts == (0, 0)


def test_an_answer_the_client_does_not_take_is_cut_off() -> None:
    """A client that reads nothing: the answer stops moving once the socket buffers are full
    (the server's send buffer made small, as a slow link's would be), and is cut off."""
    payload = b"x" * (4 << 20)
    outcome: list[BaseException | None] = []
    answered = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        response = web.StreamResponse()
        response.content_length = len(payload)
        try:
            await send_body(request, response, payload, grace=0.5)
            outcome.append(None)
        except SendTimeout as e:
            outcome.append(e)
        answered.set()
        return response

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.transport.pause_reading()  # takes nothing until the server gave up
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await answered.wait()
            writer.transport.resume_reading()
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await reader.readexactly(len(payload) + 1000)
            writer.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    [error] = outcome
    assert isinstance(error, SendTimeout)
    assert "client too slow to take its answer" in str(error)
    sent = int(str(error).split(": ", 1)[1].split(" of ")[0])
    assert 0 < sent < len(payload) - MIN_TRANSFER_RATE

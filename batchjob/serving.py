"""`batchjob serve`: the SageMaker Batch Transform container contract, over aiohttp.

- `GET /ping`: 200 with an empty body once the replicas are ready, 503 before (and while
  draining). The event loop that answers it never runs inference (replica processes) or
  tokenization and request parsing (threads), so it answers at once however busy they are.
- `POST /invocations`: records in, one result per record out, in order (serve_formats.py).
  The records of concurrent requests share the fixed-shape batches through one `Engine`.
- `GET /execution-parameters`: the concurrency and payload size Batch Transform should use.
- At most `--max-concurrent-requests` requests read their body and are worked on at once;
  the others wait, and clients that are too slow to send or to take an answer are cut off
  (serve_limits.py). /ping and /execution-parameters never wait.
- SIGTERM (or SIGINT): stop listening, let requests in progress finish (up to
  `drain_seconds`), stop the replicas, exit 0.

The server listens before the model is ready, so that /ping can say 503 while a plain
model compiles and the replicas load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass

from aiohttp import web

from batchjob.artifact import Artifact
from batchjob.engine import TRUNCATE, Engine, EngineClosedError
from batchjob.engine_start import open_artifact, start_engine
from batchjob.errors import BatchJobError, UsageError
from batchjob.long_documents import TextOptions
from batchjob.output_format import make_head
from batchjob.pair_tasks import Ranking, ZeroShot
from batchjob.prompts import spec_text_options
from batchjob.serve_config import MAX_PAYLOAD_MB_LIMIT, ServeSpec
from batchjob.serve_formats import (
    Parsed,
    RequestError,
    encode,
    parse,
    request_type,
    response_type,
)
from batchjob.serve_limits import NoSlot, SendTimeout, Slots, read_body, send_body
from batchjob.serve_pairs import encode_pairs, parse_pairs
from batchjob.sinks import check_keep_columns, task_names
from batchjob.token_classification import chunk_rows

log = logging.getLogger("batchjob.serve")

# Two requests per replica keep each replica's two in-flight batch slots filled even when
# mini-batches are small, and let one request be parsed and tokenized while another runs.
REQUESTS_PER_REPLICA = 2


@dataclass
class _State:
    spec: ServeSpec
    artifact: Artifact | None = None
    replicas: int | None = None  # known once the artifact is
    engine: Engine | None = None  # set once the replicas are ready
    slots: Slots | None = None  # likewise
    draining: bool = False
    options: TextOptions = TRUNCATE  # --long-documents, --prompt: resolved at start


def max_concurrent_transforms(replicas: int, max_payload_mb: int) -> int:
    # SageMaker refuses MaxConcurrentTransforms × MaxPayloadInMB over 100 MB.
    return max(1, min(REQUESTS_PER_REPLICA * replicas, MAX_PAYLOAD_MB_LIMIT // max_payload_mb))


def request_slots(spec: ServeSpec, replicas: int) -> int:
    """Requests worked on at once: --max-concurrent-requests, else MaxConcurrentTransforms."""
    return spec.max_concurrent_requests or max_concurrent_transforms(replicas, spec.max_payload_mb)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def build_app(state: _State) -> web.Application:
    spec = state.spec
    # read_body enforces the payload limit itself; this holds aiohttp's own reads to it too.
    app = web.Application(client_max_size=spec.max_payload_bytes)

    async def ping(request: web.Request) -> web.Response:
        return web.Response(status=200 if state.engine and not state.draining else 503)

    async def execution_parameters(request: web.Request) -> web.Response:
        if state.replicas is None:
            return _error(503, "not ready: the model is still being loaded")
        # The slots, within SageMaker's 100 MB ceiling on concurrency × payload.
        concurrency = min(
            request_slots(spec, state.replicas), MAX_PAYLOAD_MB_LIMIT // spec.max_payload_mb
        )
        return web.json_response(
            {
                "MaxConcurrentTransforms": max(1, concurrency),
                "BatchStrategy": "MULTI_RECORD",
                "MaxPayloadInMB": spec.max_payload_mb,
            }
        )

    async def invocations(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        engine, artifact, slots = state.engine, state.artifact, state.slots
        if engine is None or artifact is None or slots is None or state.draining:
            why = "shutting down" if state.draining else "the model replicas are starting"
            return _error(503, f"not ready: {why}")
        response = web.StreamResponse()
        try:
            # What the head alone tells is answered at once, without waiting for a slot.
            kind = request_type(request.content_type)
            response.content_type = response_type(request.headers.get("Accept"), kind)
            _check_declared_length(request, spec)
            async with slots.hold() as waited:
                body = await read_body(
                    request.content,
                    limit=spec.max_payload_bytes,
                    grace=spec.body_timeout,
                    declared=request.content_length,
                    too_large=_too_large(spec),
                )
                size_in = len(body)
                keep = spec.output_format.keep_columns
                head = engine.head
                if isinstance(head, ZeroShot | Ranking):  # serve_pairs.py: their own shapes
                    asked = await asyncio.to_thread(
                        parse_pairs, kind, body, spec.text_field, head, keep
                    )
                    del body
                    results = await engine.infer(asked.records, state.options, asked.zero_shot)
                    payload = await asyncio.to_thread(
                        encode_pairs, response.content_type, asked, results, keep
                    )
                    parsed: Parsed = asked
                else:
                    parsed = await asyncio.to_thread(
                        parse, kind, body, spec.text_field, artifact.task, keep
                    )
                    del body
                    results = await engine.infer(parsed.records, state.options)
                    payload = await asyncio.to_thread(
                        encode,
                        response.content_type,
                        parsed,
                        results,
                        artifact.task,
                        artifact.labels,
                        keep,
                    )
                records = len(results)
                errors = sum(r.error is not None for r in results)
                truncated = sum(r.truncated for r in results)
                del parsed, results  # a slow reader of the answer holds only the answer
                # Still holding the slot: the answer is part of what the slot bounds.
                response.content_length = len(payload)
                await send_body(request, response, payload, grace=spec.body_timeout)
        except RequestError as e:
            log.warning("%.3fs POST /invocations %d: %s", time.monotonic() - started, e.status, e)
            refusal = _error(e.status, str(e))
            if isinstance(e, NoSlot) and e.retry_after is not None:
                refusal.headers["Retry-After"] = str(e.retry_after)
            if e.status == 408:
                refusal.force_close()  # the rest of the body is not worth waiting for
            return refusal
        except SendTimeout as e:
            log.warning("%.3fs POST /invocations 200 cut off: %s", time.monotonic() - started, e)
            return response  # aiohttp sees the connection gone and drops it
        except ConnectionError:  # reset, a broken pipe, aiohttp's "Connection lost"
            # Returned, not raised (aiohttp would log a server error): it finds the connection
            # gone and sends nothing.
            log.warning("%.3fs POST /invocations: the client went away", time.monotonic() - started)
            return response
        except EngineClosedError as e:
            log.warning("%.3fs POST /invocations 503: %s", time.monotonic() - started, e)
            return _error(503, str(e))
        except BatchJobError as e:  # a replica failed: retryable (InvocationsMaxRetries)
            log.error("%.3fs POST /invocations 500: %s", time.monotonic() - started, e)
            return _error(500, str(e))
        log.info(
            "%.3fs POST /invocations 200: %d records, %d errors, %d truncated, %d bytes in (%s), "
            "%d out (%s); %.3fs waiting for a slot",
            time.monotonic() - started, records, errors, truncated, size_in, kind,
            len(payload), response.content_type, waited,
        )  # fmt: skip
        return response

    app.router.add_get("/ping", ping)
    app.router.add_get("/execution-parameters", execution_parameters)
    app.router.add_post("/invocations", invocations)
    return app


def _too_large(spec: ServeSpec) -> str:
    return (
        f"over the {spec.max_payload_mb} MB payload limit (SAGEMAKER_MAX_PAYLOAD_IN_MB, "
        f"MaxPayloadInMB): send fewer records per request"
    )


def _check_declared_length(request: web.Request, spec: ServeSpec) -> None:
    length = request.content_length
    if length is not None and length > spec.max_payload_bytes:
        raise RequestError(f"request body of {length} bytes is {_too_large(spec)}", 413)


def serve(spec: ServeSpec) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean drain. UsageError: bad model or task."""
    return asyncio.run(_serve(spec))


async def _serve(spec: ServeSpec) -> int:
    started = time.monotonic()
    state = _State(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        build_app(state),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=spec.drain_seconds,
        # Also the deadline for a request's head: see serve_limits.py.
        keepalive_timeout=spec.header_timeout,
    )
    await runner.setup()
    cleaned = False
    try:
        site = web.TCPSite(runner, spec.host, spec.port)
        try:
            await site.start()
        except OSError as e:
            raise UsageError(f"can't listen on {spec.host}:{spec.port}: {e.strerror}") from None
        host, port = runner.addresses[0][:2]
        log.info(
            "listening on http://%s:%d (/ping is 503 until the replicas are ready)", host, port
        )
        async with contextlib.AsyncExitStack() as stack:
            starting = asyncio.create_task(_start(state, stack))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                log.info("stopped by a signal while starting")
                return 0
            if starting.exception() is not None:
                stopping.cancel()
                starting.result()  # start-up errors propagate from here
            log.info(
                "%.1fs ready: %d replicas, %d requests at once (more wait up to %g s)",
                time.monotonic() - started, state.replicas or 0,
                state.slots.size if state.slots else 0, spec.queue_timeout,
            )  # fmt: skip
            await stopping
            state.draining = True
            if state.slots is not None:
                state.slots.close()
            drain = time.monotonic()
            log.info("signal: draining, up to %g s for requests in progress", spec.drain_seconds)
            # Stops listening, then waits for the handlers in progress (up to shutdown_timeout).
            await runner.cleanup()
            cleaned = True
            stats = state.engine.stats if state.engine else None
            if stats is not None and stats.compiled_tokens:
                log.info(
                    "%.1fs drained; stopping the replicas (%d records in %d batches, "
                    "%.0f%% of compiled tokens real)",
                    time.monotonic() - drain, stats.records, stats.batches,
                    100 * stats.real_tokens / stats.compiled_tokens,
                )  # fmt: skip
            else:
                log.info("%.1fs drained; stopping the replicas", time.monotonic() - drain)
        return 0
    finally:
        if not cleaned:
            await runner.cleanup()


async def _start(state: _State, stack: contextlib.AsyncExitStack) -> None:
    spec = state.spec
    # In a thread: compiling a plain model takes a while, and /ping must answer meanwhile.
    artifact, placements = await asyncio.to_thread(open_artifact, spec)
    state.options = await asyncio.to_thread(spec_text_options, artifact, spec, UsageError)
    # Batch Transform instances can't share a first batch: int8 needs given ranges.
    head = make_head(artifact, spec.output_format, calibrate=False)
    check_keep_columns(
        spec.output_format.keep_columns,
        task_names(head),
        "BATCHJOB_KEEP_COLUMNS",
        chunk_rows(head, state.options.long_documents),
    )
    state.artifact, state.replicas = artifact, len(placements)
    state.slots = Slots(request_slots(spec, len(placements)), spec.queue_timeout)
    state.engine, _ = await start_engine(
        stack,
        artifact,
        placements,
        start_timeout=spec.replica_start_timeout,
        max_batch_delay=spec.max_batch_delay_ms / 1000,
        head=head,
    )

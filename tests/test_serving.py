"""`batchjob serve`, as the container runs it: `entrypoint.sh serve` in a subprocess, on a
loopback port, spoken to over HTTP. Answers are checked against Hugging Face `pipeline`."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchjob.batching import Shape
from batchjob.cli import main
from batchjob.config import CLASSIC_SEQUENCE_LENGTH
from batchjob.errors import UsageError
from batchjob.serve_config import serve_spec
from batchjob.serving import max_concurrent_transforms, request_slots
from tests.conftest import LABELS, CompileFn, make_texts
from tests.serve_process import JSONLINES, Server, jsonlines

SHAPES = (Shape(16, 4), Shape(32, 2))  # as tests/conftest.py's default: compiled once
LONG = "the quick brown fox jumps over a lazy dog " * 6  # past 32 tokens: truncated


@pytest.fixture(scope="module")
def artifact_path(compiled: CompileFn, classifier_dir: Path) -> str:
    return compiled(classifier_dir, shapes=SHAPES).path


@pytest.fixture(scope="module")
def server(artifact_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(["--model", artifact_path, "--port", "0"], {}, tmp_path_factory.mktemp("srv"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, "".join(srv.log)


@pytest.fixture(scope="module")
def pipe(classifier_dir: Path) -> Any:
    from transformers import pipeline

    return pipeline("text-classification", model=str(classifier_dir))


def assert_same(actual: Any, expected: Any) -> None:
    """Equal structure and labels; scores within fp32 tolerance."""
    if isinstance(expected, list):
        assert isinstance(actual, list), (actual, expected)
        assert len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), (actual, expected)
        assert actual.keys() == expected.keys(), (actual, expected)
        assert actual["label"] == expected["label"]
        assert abs(actual["score"] - expected["score"]) < 1e-4
    else:
        raise AssertionError(f"unexpected {expected!r}")


def test_ping_and_execution_parameters(server: Server) -> None:
    assert server.request("GET", "/ping")[::2] == (200, b"")
    status, _, body = server.request("GET", "/execution-parameters")
    assert status == 200
    assert json.loads(body) == {
        "MaxConcurrentTransforms": max_concurrent_transforms(1, 6),
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 6,
    }
    assert max_concurrent_transforms(1, 6) == 2  # keeps both in-flight slots of one replica
    assert max_concurrent_transforms(32, 6) == 16  # SageMaker: concurrency × MB ≤ 100


def test_jsonlines_one_answer_per_line_in_order(server: Server, pipe: Any) -> None:
    texts = make_texts(40, seed=3, max_words=12)
    lines = [json.dumps({"inputs": t, "id": i}) for i, t in enumerate(texts[:20])]
    lines += [json.dumps(t) for t in texts[20:]]  # a bare JSON string is a record too
    lines[5:5] = ["{not json", "", json.dumps({"inputs": 7}), json.dumps({"text": "x"})]
    body = ("\n".join(lines) + "\n").encode() + b'"\xff"\n'
    answers = server.post(body, JSONLINES)
    # Blank lines are not records: one answer per record, errors on their own line.
    assert len(answers) == len(texts) + 4
    assert answers[5]["error"].startswith("line 6: invalid JSON")
    assert answers[6] == {"error": "line 8: field 'inputs' must be a string or "
                                   "{'text', 'text_pair'}, got number"}  # fmt: skip
    assert answers[7] == {"error": "line 9: missing field 'inputs'"}
    assert answers[-1]["error"].startswith("line 45: invalid UTF-8")
    good = answers[:5] + answers[8:-1]
    expected = pipe(texts, top_k=None)
    for answer, scores in zip(good, expected, strict=True):
        by_label = {s["label"]: s["score"] for s in scores}
        np.testing.assert_allclose(answer["scores"], [by_label[x] for x in LABELS], atol=1e-4)
        assert answer["label"] == scores[0]["label"]
        assert answer["truncated"] is False
        assert abs(answer["score"] - scores[0]["score"]) < 1e-4


@pytest.mark.parametrize(
    ("inputs", "parameters"),
    [
        ("a single text", None),
        (["first text", "a second, longer text for the other bucket " * 2], None),
        ("a single text", {"top_k": 2}),
        (["one", "two words"], {"top_k": 2}),
        (["one", "two words"], {"top_k": None}),
        ({"text": "a question", "text_pair": "its answer"}, None),
        ([{"text": "a question", "text_pair": "its answer"}], {"top_k": 1, "truncation": True}),
    ],
    ids=["str", "list", "str-top2", "list-top2", "list-all", "pair", "pairs-top1"],
)
def test_json_answers_as_the_inference_toolkit(
    server: Server, pipe: Any, inputs: Any, parameters: dict[str, Any] | None
) -> None:
    request = {"inputs": inputs} | ({"parameters": parameters} if parameters else {})
    answer = server.post(json.dumps(request).encode(), "application/json")
    assert_same(answer, pipe(inputs, **(parameters or {})))


def test_json_bad_requests_are_400(server: Server) -> None:
    for body, message in [
        (b"{", "invalid JSON body"),
        (b'{"text": "x"}', '{"inputs": ..., "parameters": {...}}'),
        (b'{"inputs": ["ok", 3]}', "inputs[1] must be a string"),
        (b'{"inputs": "x", "parameters": {"top_k": 0}}', "top_k must be an integer ≥ 1"),
        (b'{"inputs": "x", "parameters": {"max_length": 5}}', "unsupported parameters: max_len"),
        (b'{"inputs": ' + b"9" * 5000 + b"}", "a number of more than 4300 digits"),
    ]:
        status, _, data = server.request(
            "POST", "/invocations", body, {"Content-Type": "application/json"}
        )
        assert status == 400, data
        assert message in json.loads(data)["error"], data
    # A body that says it is gzipped and isn't.
    status, _, data = server.request(
        "POST",
        "/invocations",
        b'{"inputs": "x"}',
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert status == 400, data
    assert "unreadable request body" in json.loads(data)["error"], data


def test_records_the_tokenizer_or_the_csv_module_would_refuse_are_answered(server: Server) -> None:
    """A lone surrogate is that line's error, not a 500; CSV lines may end in a bare CR."""
    answers = server.post(b'"ok"\n"lone \\ud800"\n"fine"\n', JSONLINES)
    assert [a.get("error") for a in answers[::2]] == [None, None]
    assert all(a["label"] in LABELS for a in answers[::2])
    assert "lone UTF-16 surrogate U+D800" in answers[1]["error"]
    answers = server.post(b"inputs\rhello\rworld\r", "text/csv", accept=JSONLINES)
    assert [a["label"] in LABELS for a in answers] == [True, True]


def test_csv_with_a_header_or_a_single_column(server: Server, pipe: Any) -> None:
    with_header = b'id,inputs\n1,hello world\n2,"a, quoted text"\n3\n'
    answers = server.post(with_header, "text/csv")
    assert_same([{k: a[k] for k in ("label", "score")} for a in answers[:2]],
                pipe(["hello world", "a, quoted text"]))  # fmt: skip
    assert answers[2] == {"error": "request row 3: expected 2 fields, got 1"}
    single = server.post(b'hello world\n"a, quoted text"\nx,y\n', "text/csv", "application/json")
    assert [a.get("label") for a in single[:2]] == [a["label"] for a in answers[:2]]
    assert single[2] == {"error": "request row 3: expected 1 fields, got 2"}


def test_content_negotiation(server: Server) -> None:
    body = jsonlines([{"inputs": "one"}, {"inputs": "two"}])
    as_json = server.post(body, "application/x-jsonlines", "application/json")
    assert isinstance(as_json, list)
    assert len(as_json) == 2
    assert server.post(body, JSONLINES, "text/html, application/jsonlines;q=0.9") == as_json
    status, _, data = server.request(
        "POST", "/invocations", body, {"Content-Type": JSONLINES, "Accept": "text/html"}
    )
    assert status == 406
    assert "unsupported Accept" in json.loads(data)["error"]
    status, _, data = server.request("POST", "/invocations", b"x", {"Content-Type": "text/plain"})
    assert status == 415
    assert "unsupported Content-Type 'text/plain'" in json.loads(data)["error"]


def test_concurrent_requests_keep_their_order(server: Server) -> None:
    payloads = [
        jsonlines([{"inputs": t} for t in make_texts(30 + 11 * k, seed=100 + k, max_words=30)])
        for k in range(8)
    ]
    alone = [server.post(p, JSONLINES) for p in payloads]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: server.post(p, JSONLINES), payloads * 2))
    for a, b in zip(alone * 2, together, strict=True):
        assert [x["label"] for x in a] == [x["label"] for x in b]
        np.testing.assert_allclose([x["scores"] for x in a], [x["scores"] for x in b], atol=1e-5)


def test_a_6_mb_multirecord_payload(server: Server) -> None:
    record = json.dumps({"inputs": " ".join(["inference"] * 665)}) + "\n"  # ~6 KB
    body = (record * (6_000_000 // len(record))).encode()
    assert 5_990_000 < len(body) <= 6_000_000
    answers = server.post(body, JSONLINES)
    assert len(answers) == body.count(b"\n")
    assert all(a["truncated"] and "error" not in a for a in answers)


def test_over_the_payload_limit_is_413_before_the_body_is_read(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/jsonlines\r\n"
            b"Content-Length: 7000000\r\n\r\n"
        )  # and no body: the answer must not wait for one
        response = sock.recv(65536).decode()
    assert response.startswith("HTTP/1.1 413"), response
    assert "7000000 bytes is over the 6 MB payload limit" in response


def test_ping_answers_at_once_while_the_replica_is_saturated(server: Server) -> None:
    payload = jsonlines([{"inputs": LONG + str(i)} for i in range(1500)])
    latencies: list[float] = []
    busy = threading.Event()

    def ping_while_busy() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        while busy.is_set():
            started = time.perf_counter()
            conn.request("GET", "/ping")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
        conn.close()

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        requests = [pool.submit(server.post, payload, JSONLINES) for _ in range(4)]
        time.sleep(0.3)  # the four requests are parsed and their batches queued
        busy.set()
        pinger = pool.submit(ping_while_busy)
        started = time.monotonic()
        concurrent.futures.wait(requests, return_when=concurrent.futures.FIRST_COMPLETED)
        busy_for = time.monotonic() - started
        busy.clear()
        pinger.result()
        assert all(len(r.result()) == 1500 for r in requests)
    # Inference took seconds; a /ping that waited behind it would take as long.
    assert busy_for > 0.5, busy_for
    assert len(latencies) >= 10, latencies
    assert float(np.median(latencies)) < 0.1, latencies
    assert max(latencies) < 1.0, latencies


def test_sigterm_finishes_requests_in_progress_then_exits_0(
    artifact_path: str, tmp_path: Path
) -> None:
    srv = Server(["--model", artifact_path, "--port", "0"], {}, tmp_path)
    try:
        srv.wait_ready()
        payload = jsonlines([{"inputs": LONG + str(i)} for i in range(3000)])
        sent = threading.Event()

        def long_request() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
            try:
                conn.request("POST", "/invocations", payload, {"Content-Type": JSONLINES})
                sent.set()
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(long_request)
            assert sent.wait(30)
            time.sleep(0.3)  # the server is inside the request
            srv.proc.send_signal(signal.SIGTERM)
            refused = False
            while not pending.done() and not refused:  # no new connections while draining
                try:
                    socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
                    time.sleep(0.05)
                except ConnectionRefusedError:
                    refused = True
            status, body = pending.result()
        assert status == 200
        assert body.count(b"\n") == 2999
        assert refused, "the server still accepted connections while draining"
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    log = "".join(srv.log)
    assert log.index("signal: draining") < log.index("POST /invocations 200: 3000 records")


def test_plain_model_compiled_at_start_up_from_the_toolkit_environment(
    embedder_dir: Path, tmp_path: Path
) -> None:
    """HF_TASK, HF_OPTIMUM_* and SAGEMAKER_* as SageMaker and the toolkit set them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "HF_TASK": "feature-extraction",
        "HF_OPTIMUM_BATCH_SIZE": "4",
        "HF_OPTIMUM_SEQUENCE_LENGTH": "32",
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    srv = Server(["--model", str(embedder_dir)], env, tmp_path)
    try:
        assert srv.port == port
        statuses = srv.wait_ready()
        assert statuses[0] == 503, "ping must say 503 while the model compiles"
        artifacts = list((tmp_path / "cache" / "batchjob" / "artifacts").iterdir())
        manifest = json.loads((artifacts[0] / "batchjob.json").read_text())
        assert manifest["task"] == "feature-extraction"
        assert [(s["batch_size"], s["seq_len"]) for s in manifest["shapes"]] == [(4, 32)]

        assert json.loads(srv.request("GET", "/execution-parameters")[2])["MaxPayloadInMB"] == 1
        vectors = srv.post(b'{"inputs": ["one text", "and another"]}', "application/json")
        assert np.array(vectors).shape == (2, 32)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        [line] = srv.post(b'{"inputs": "one text"}\n', JSONLINES)
        np.testing.assert_allclose(line["embedding"], vectors[0], atol=1e-6)

        # Over 1 MB without a Content-Length: refused while reading.
        chunks = (b'{"inputs": "' + b"x" * 65000 + b'"}\n' for _ in range(20))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/invocations", chunks, {"Content-Type": JSONLINES},
                     encode_chunked=True)  # fmt: skip
        response = conn.getresponse()
        assert response.status == 413
        assert b"over the 1 MB payload limit" in response.read()
        conn.close()
    finally:
        assert srv.stop() == 0, "".join(srv.log)


# -- the spec from flags and environment (no server) --------------------------------------


def test_spec_reads_the_environment_once(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"neuron": {"static_batch_size": 3, "static_sequence_length": 48}})
    )
    env = {"HF_OPTIMUM_BATCH_SIZE": "8", "HF_TASK": "sentiment-analysis"}
    spec = serve_spec({"model": str(model)}, env)
    # The neuron section wins, as in the toolkit: the model was compiled for that shape.
    assert spec.compile.shapes == (Shape(48, 3),)
    assert spec.compile.task == "text-classification"
    assert (spec.port, spec.max_payload_mb, spec.host) == (8080, 6, "0.0.0.0")
    (model / "config.json").write_text("{}")
    env |= {"HF_OPTIMUM_SEQUENCE_LENGTH": str(CLASSIC_SEQUENCE_LENGTH)}
    spec = serve_spec({"model": str(model), "port": 0}, env | {"SAGEMAKER_BIND_TO_PORT": "9000"})
    assert spec.compile.shapes == (Shape(CLASSIC_SEQUENCE_LENGTH, 8),)
    assert spec.port == 0
    flags = {"model": str(model), "buckets": (16, 32), "batch_size": 2}
    assert serve_spec(flags, env).compile.shapes == (Shape(16, 2), Shape(32, 2))


def test_limits_from_flags_and_the_default_slots(tmp_path: Path) -> None:
    spec = serve_spec({"model": str(tmp_path)}, {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"})
    assert (spec.queue_timeout, spec.header_timeout, spec.body_timeout) == (300, 60, 30)
    assert request_slots(spec, 2) == max_concurrent_transforms(2, 20) == 4
    assert request_slots(spec, 8) == 5  # 5 × 20 MB: SageMaker's 100 MB ceiling
    flags = {"model": str(tmp_path), "max_concurrent_requests": 3, "queue_timeout": 0.0}
    flags |= {"header_timeout": 5.0, "body_timeout": 7.5}
    spec = serve_spec(flags, {})
    assert request_slots(spec, 8) == 3
    assert (spec.queue_timeout, spec.header_timeout, spec.body_timeout) == (0, 5, 7.5)


def test_spec_falls_back_to_hf_model_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchjob.serve_config.DEFAULT_MODEL_DIR", str(tmp_path / "empty"))
    assert serve_spec({}, {"HF_MODEL_ID": "org/model"}).compile.model == "org/model"
    with pytest.raises(UsageError, match="is empty or missing and HF_MODEL_ID is not set"):
        serve_spec({}, {})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert serve_spec({}, {"HF_MODEL_ID": "org/model"}).compile.model == str(tmp_path / "empty")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch-delay-ms", "-1"], {}, "--max-batch-delay-ms must be 0..10000, got -1"),
        ([], {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "0"}, "SAGEMAKER_MAX_PAYLOAD_IN_MB must be 1..100"),
        ([], {"SAGEMAKER_BIND_TO_PORT": "http"}, "SAGEMAKER_BIND_TO_PORT must be an integer"),
        ([], {"HF_TASK": "summarization"}, "HF_TASK must be one of text-classification"),
        ([], {"HF_OPTIMUM_BATCH_SIZE": "0"}, "HF_OPTIMUM_BATCH_SIZE must be ≥ 1, got 0"),
        (["--port", "70000"], {}, "--port must be 0..65535, got 70000"),
        (["--max-concurrent-requests", "0"], {}, "--max-concurrent-requests must be ≥ 1, got 0"),
        (["--queue-timeout", "-1"], {}, "--queue-timeout must be 0..3600 seconds, got -1"),
        (["--header-timeout", "0"], {}, "--header-timeout must be over 0 and ≤ 3600 seconds"),
        (["--body-timeout", "nan"], {}, "--body-timeout must be over 0 and ≤ 3600 seconds"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    argv: list[str],
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert message in err, err


def test_bad_flag_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", "eighty"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--port" in err

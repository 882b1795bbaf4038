"""A real S3 for tests: moto's server mode in its own process on 127.0.0.1, and a loopback
proxy in front of it that answers chosen requests with an S3 error (503 SlowDown, 409,
403 AccessDenied) or cuts a body short, as moto itself never does.

Fixtures (import the `*_fixture` functions): `moto_server` (one per session), `s3_env`
(points the AWS SDKs at it through the standard environment variables, via monkeypatch),
`bucket` (a fresh bucket per test, so no test sees another's objects), `proxy` (a
fault-injecting proxy in front of moto; `s3_env` is pointed at it).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import select
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

START_SECONDS = 60.0
# The server prints its port, then serves until its stdin closes (so it never outlives us).
_MOTO_MAIN = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""
_buckets = itertools.count()


class MotoServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_MAIN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_SECONDS)
        line = self.proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"moto server didn't start in {START_SECONDS} s: {line!r}")
        self.url = f"http://127.0.0.1:{int(line)}"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()


# Fixtures are named with `name=` so that test modules can import them (`..._fixture`)
# without their parameters shadowing the import.
@pytest.fixture(scope="session", name="moto_server")
def moto_server_fixture() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


def aws_environment(endpoint: str, home: Path) -> dict[str, str]:
    """The standard AWS variables for a test server; no profile or config file of the user's."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "3",
        "AWS_RETRY_MODE": "standard",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
    }


@pytest.fixture(name="s3_env")
def s3_env_fixture(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, str]:
    """Points boto3 and aioboto3 (also in subprocesses that inherit os.environ) at moto."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env = aws_environment(moto_server.url, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@dataclass
class Bucket:
    name: str
    client: Any  # a boto3 S3 client talking to moto directly (never through the proxy)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def put_many(self, objects: dict[str, bytes]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: self.put(*item), objects.items()))

    def get(self, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return data

    def keys(self, prefix: str = "", *, internal: bool = False) -> list[str]:
        """The keys under `prefix`; with `internal`, also batchjob's own under `_batchjob/`
        (the write check every start leaves)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        )
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", ())]
        return keys if internal else [k for k in keys if "_batchjob/" not in k]

    def versions(self, prefix: str = "") -> dict[str, int]:
        """Key → how many versions (versioning must be on); not batchjob's own keys."""
        counts: dict[str, int] = {}
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.name, Prefix=prefix
        )
        for page in pages:
            for v in page.get("Versions", ()):
                if "_batchjob/" not in v["Key"]:
                    counts[v["Key"]] = counts.get(v["Key"], 0) + 1
        return counts

    def multipart_uploads(self) -> list[str]:
        uploads = self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", ())
        return [u["Key"] for u in uploads]


@pytest.fixture(name="bucket")
def bucket_fixture(moto_server: MotoServer, s3_env: dict[str, str]) -> Bucket:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server.url)
    name = f"bj-{os.getpid()}-{next(_buckets)}"
    client.create_bucket(Bucket=name)
    return Bucket(name, client)


# -- the fault-injecting proxy -----------------------------------------------------------------


@dataclass
class Fault:
    """Requests matching `method` and a `path` substring (the decoded path and query) get
    `status`/`code` instead of moto's answer; or, with `cut_at`, moto's answer cut short
    after that many body bytes; or, with `delay`, moto's answer after that many seconds.
    `times`: how many requests it hits (None: all)."""

    method: str
    path: str
    status: int = 503
    code: str = "SlowDown"
    times: int | None = None
    cut_at: int | None = None
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            method == self.method
            and self.path in path
            and (self.times is None or self.hits < self.times)
        )


@dataclass
class Request:
    method: str
    path: str  # decoded: key and query as the server sees them
    headers: dict[str, str]

    @property
    def lower_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # moto checks If-None-Match and then stores, not atomically as S3 does: two racing
    # conditional PUTs can both pass. Forwarding writes one at a time restores S3's behaviour.
    serialize_writes: bool = False
    # As S3 does: a request naming another account as the bucket's owner is refused (403).
    bucket_owner: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.write_lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
            return None

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def seen(self, method: str, path: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == method and path in r.path]

    def s3_requests(self) -> list[Request]:
        """The requests to S3 (SQS's, through the same endpoint, name an X-Amz-Target)."""
        with self._lock:
            return [r for r in self.requests if "x-amz-target" not in r.lower_headers]


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    upstream = urllib.parse.urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()
            path = urllib.parse.unquote(self.path)
            proxy.log(Request(self.command, path, dict(self.headers.items())))
            fault = proxy.fault_for(self.command, path)
            expected = self.headers.get("x-amz-expected-bucket-owner")
            if proxy.bucket_owner and expected not in (None, proxy.bucket_owner):
                fault = Fault(self.command, path, status=403, code="AccessDenied")
            if fault is not None and fault.delay:
                time.sleep(fault.delay)  # a stalled request: answered normally, late
                fault = None
            if fault is not None and fault.cut_at is None:
                return self._error(fault)
            serialized = proxy.serialize_writes and self.command in ("PUT", "POST")
            with proxy.write_lock if serialized else contextlib.nullcontext():
                response, data = self._forward(body)
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            if self.command == "HEAD":
                self.send_header("Content-Length", response.getheader("Content-Length") or "0")
                self.end_headers()
                return None
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault is not None and fault.cut_at is not None:
                self.wfile.write(data[: fault.cut_at])
                self.wfile.flush()
                self.close_connection = True
                return None
            self.wfile.write(data)
            return None

        def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                return response, response.read()
            finally:
                conn.close()

        def _error(self, fault: Fault) -> None:
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{fault.code}</Code><Message>injected by the test proxy</Message>"
                "<RequestId>test</RequestId></Error>"
            ).encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


@pytest.fixture(name="proxy")
def proxy_fixture(
    moto_server: MotoServer, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault-injecting proxy to moto; the code under test reaches S3 through it."""
    p = FaultProxy(moto_server.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    s3_env["AWS_ENDPOINT_URL"] = p.url
    try:
        yield p
    finally:
        p.stop()

"""`batchjob serve` in a subprocess on a loopback port, as the tests speak to it."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "entrypoint.sh"
JSONLINES = "application/jsonlines"


class Server:
    """`entrypoint.sh serve ...` in a subprocess; its log lines collected as they come.
    With `log_level`, `python -m batchjob --log-level LEVEL serve ...` instead (the
    entrypoint passes its arguments to the command, which has no such flag)."""

    def __init__(
        self, args: list[str], env: dict[str, str], cwd: Path, log_level: str | None = None
    ) -> None:
        environment = {
            **os.environ,
            # The entrypoint runs `python3 -m batchjob`: this venv's python3, as in the image.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **env,
        }
        head = [sys.executable, "-m", "batchjob", "--log-level", log_level] if log_level else []
        command = [*(head or [str(ENTRYPOINT)]), "serve"]
        command += ["--host", "127.0.0.1", "--replicas", "1", *args]
        self.proc = subprocess.Popen(
            command, env=environment, cwd=cwd, stderr=subprocess.PIPE, text=True
        )
        self.log: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._listening.wait(60):
            self.stop()
            raise AssertionError("server did not listen:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(found.group(1))
                self._listening.set()
        self._listening.set()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            conn.close()

    def post(self, body: bytes, content_type: str, accept: str | None = None) -> Any:
        headers = {"Content-Type": content_type} | ({"Accept": accept} if accept else {})
        status, kind, data = self.request("POST", "/invocations", body, headers)
        assert status == 200, data
        if kind == JSONLINES:
            return [json.loads(line) for line in data.decode().split("\n")]
        return json.loads(data)

    def wait_ready(self, timeout: float = 120) -> list[int]:
        """Poll /ping until 200; the statuses seen on the way."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            seen.append(self.request("GET", "/ping", timeout=5)[0])
            if seen[-1] == 200:
                return seen
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout} s:\n" + "".join(self.log))

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until `text` has appeared in `count` log lines."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.log) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {text!r} in the log:\n" + "".join(self.log))
            time.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def jsonlines(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()

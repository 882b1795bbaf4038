"""Progress: a tqdm bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("batchjob.progress")

LOG_EVERY_SECONDS = 10.0


class Progress:
    def __init__(self, mode: str, shards_total: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.shards_total = shards_total
        self.shards_done = 0
        self.documents = 0
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar = tqdm(unit="doc", dynamic_ncols=True, file=sys.stderr) if mode == "bar" else None

    def add(self, documents: int = 0, shards: int = 0) -> None:
        self.documents += documents
        self.shards_done += shards
        if self._bar is not None:
            self._bar.update(documents)
            if shards:
                self._bar.set_postfix_str(f"shards {self.shards_done}/{self.shards_total}")
            return
        now = time.monotonic()
        if self.mode == "log" and now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            log.info(
                "%.0fs %d documents (%.1f/s), shards %d/%d",
                now - self.started,
                self.documents,
                self.rate,
                self.shards_done,
                self.shards_total,
            )

    @property
    def rate(self) -> float:
        return self.documents / max(time.monotonic() - self.started, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

"""Publishing a directory whole: written in a staging directory beside its destination,
flushed to disk, then renamed into place. Readers see all of it or nothing, also when the
writer is killed halfway or when two writers race for one destination."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time

from batchjob.artifact import is_artifact
from batchjob.errors import UsageError

log = logging.getLogger("batchjob.compile")

STAGING_PREFIX = ".compiling-"
# A staging directory untouched this long belongs to a compile that was killed.
ABANDONED_STAGING_SECONDS = 24 * 3600


def make_staging(output: str) -> str:
    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent)
    except OSError as e:
        raise UsageError(f"{parent}: can't compile an artifact there: {e.strerror}") from None


def publish(staging: str, output: str, *, shared: bool) -> bool:
    """Rename the finished artifact in `staging` to `output`. False when `shared` (the compile
    cache) and another process published an artifact there first: the caller uses that one
    (and removes `staging`)."""
    _fsync_tree(staging)
    try:
        os.rename(staging, output)  # atomic; replaces an empty directory, never a full one
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if shared and is_artifact(output):
            return False
        raise UsageError(f"--output {output} exists and is not an empty directory") from None
    fsync_path(os.path.dirname(os.path.abspath(output)))
    return True


def _fsync_tree(root: str) -> None:
    """On disk before the rename publishes it: after a crash the artifact is whole or absent,
    never there with empty files."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_abandoned_staging(folder: str) -> None:
    """Staging directories of compiles that were killed (SIGKILL, a lost machine) before they
    could remove them. Only old ones: a live compile may be tracing for a long time."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(STAGING_PREFIX))
    except FileNotFoundError:
        return
    for name in names:
        staging = os.path.join(folder, name)
        try:
            idle = time.time() - _last_touched(staging)
        except OSError:  # gone meanwhile: its compile finished
            continue
        if idle > ABANDONED_STAGING_SECONDS:
            shutil.rmtree(staging, ignore_errors=True)
            log.info("removed %s, a compile abandoned %.0f h ago", staging, idle / 3600)


def _last_touched(root: str) -> float:
    paths = [root, *(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)]
    return max(os.stat(p).st_mtime for p in paths)

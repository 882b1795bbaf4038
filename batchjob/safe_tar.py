"""Unpacking a model archive that nobody vouched for: regular files and directories only,
every name below the target, within a size and a count. `tarfile`'s own extraction would
also make links and devices, and write wherever a name points (before Python 3.12's
filters, which 3.11.0-3.11.3 lack); this writes each file itself."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tarfile
import zlib
from typing import IO, Any

from batchjob.errors import UsageError

# Far above any encoder (a large one is ~2 GB), far below what a bomb would claim.
MAX_UNPACKED_BYTES = 64 << 30
MAX_MEMBERS = 100_000
COPY_BYTES = 1 << 20


def unpack(archive: str, target: str, url: str, flag: str) -> None:
    """Unpack `archive` into `target`: regular files and directories only, every name below
    `target` (see the module docstring). UsageError, one line, for a refused member."""

    def refuse(member: tarfile.TarInfo | None, why: str) -> UsageError:
        what = f"member {member.name!r}" if member is not None else "the archive"
        return UsageError(f"{flag} {url}: {what} refused: {why}")

    try:
        with tarfile.open(archive, "r:*") as tar:
            members: list[tuple[tarfile.TarInfo, list[str]]] = []
            files: set[tuple[str, ...]] = set()
            total = 0
            for member in tar:  # reads the headers through, writing nothing yet
                if len(members) >= MAX_MEMBERS:
                    raise refuse(None, f"more than {MAX_MEMBERS} entries")
                rel = _member_path(member, refuse)
                if rel is None:
                    continue
                if member.issym() or member.islnk():
                    raise refuse(member, f"a link (to {member.linkname!r}); only files are kept")
                if not (member.isfile() or member.isdir()):
                    raise refuse(member, "not a regular file or directory")
                if member.isfile():
                    if tuple(rel) in files:
                        raise refuse(member, "a file named twice")
                    files.add(tuple(rel))
                total += member.size
                if total > MAX_UNPACKED_BYTES:
                    raise refuse(None, f"its files add up to more than {MAX_UNPACKED_BYTES} bytes")
                members.append((member, rel))
            free = shutil.disk_usage(target).free
            if total > free:
                raise refuse(None, f"its files need {total} bytes, {free} are free")
            for member, rel in members:
                try:
                    _extract(tar, member, os.path.join(target, *rel))
                except (FileExistsError, NotADirectoryError, IsADirectoryError):
                    raise refuse(member, "a file and a directory of one name") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UsageError(f"{flag} {url}: not a readable tar archive: {e}") from None


def _member_path(member: tarfile.TarInfo, refuse: Any) -> list[str] | None:
    """The member's path components below the target; None for the archive's root (`./`)."""
    name = member.name
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise refuse(member, "an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse(member, "a '..' path component")
    if "\\" in name or "\0" in name:
        raise refuse(member, "a backslash or NUL in its name")
    return parts or None


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
    if member.isdir():
        os.makedirs(path, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    _copy(source, path)


def _copy(source: IO[bytes], path: str) -> None:
    with open(path, "xb") as f:  # x: never through a name made before
        shutil.copyfileobj(source, f, COPY_BYTES)
        flush(f)


def flush(f: IO[bytes]) -> None:
    """On disk before the entry is renamed into place: after a crash it is whole or absent."""
    f.flush()
    os.fsync(f.fileno())

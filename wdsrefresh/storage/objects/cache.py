"""A node-local cache of checked object blocks, bounded, shared by every worker on the node.

Guarantees:

- An entry is one object version: it is keyed by (URL, VersionId or ETag), so it can never be
  stale; a replaced object is a new entry.
- Only blocks that matched the snapshot's digests are written, under a temporary name and then
  renamed, so a reader sees a whole block or none; a cached block is checked against the
  digests again when it is read (a file damaged on the node is dropped and read from the store).
- Least recently used objects are evicted under a file lock that every process using the
  directory takes, so the cache stays under ``limit`` plus what processes write between two
  checks (each checks after writing ``limit / 64`` bytes, or one block). An evicted block being
  read is not lost: blocks are read whole into memory, and a block missing is read from the
  store.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import time

from ...format.digest import block_digest

log = logging.getLogger("wdsrefresh")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str, name: str = "cache_limit") -> int:
    """Bytes from ``123``, ``"50GB"``, ``"1.5 GiB"``; ValueError naming the option and value otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{name}={value!r}: expected bytes, or a size such as '50GB' or '512MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


class BlockCache:
    """Blocks of object versions in ``directory`` (made if missing), at most about ``limit`` bytes."""

    def __init__(self, directory: str, limit: int | str):
        self.directory = os.path.abspath(os.fspath(directory))
        self.limit = parse_size(limit)
        os.makedirs(self.directory, exist_ok=True)
        self._written = 0

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "limit": self.limit, "_written": 0}

    def _entry(self, url: str, version: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:40])

    def get(self, url: str, version: str, index: int, digest: bytes) -> bytes | None:
        """Block ``index`` of the object version, if cached and still matching ``digest``."""
        entry = self._entry(url, version)
        path = os.path.join(entry, f"{index}.blk")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if block_digest(data) != digest:
            log.warning("%s: cached block %d differs from its digest; dropped, read from the store", url, index)
            _unlink(path)
            return None
        try:
            os.utime(entry)  # used now: evicted last
        except FileNotFoundError:
            pass
        return data

    def put(self, url: str, version: str, index: int, data: bytes) -> None:
        """Keeps a block that matched its digest (callers check first)."""
        entry = self._entry(url, version)
        final = os.path.join(entry, f"{index}.blk")
        tmp = os.path.join(entry, f".{index}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            os.makedirs(entry, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as exn:  # a full or read-only cache only costs reads from the store
            # (FileNotFoundError: another process evicted this object meanwhile)
            (log.debug if isinstance(exn, FileNotFoundError) else log.warning)(
                "%s: block %d not cached: %s", url, index, exn)
            _unlink(tmp)
            return
        self._written += len(data)
        if self._written >= max(self.limit // 64, len(data)):
            self._written = 0
            self.evict()

    def evict(self) -> None:
        """Removes least recently used objects until the cache holds at most ``limit`` bytes."""
        with open(os.path.join(self.directory, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries, total = [], 0
            with os.scandir(self.directory) as it:
                for d in it:
                    if not d.is_dir(follow_symlinks=False):
                        continue
                    size = _size_of(d.path)
                    try:
                        used = d.stat(follow_symlinks=False).st_mtime_ns
                    except FileNotFoundError:
                        continue
                    entries.append((used, d.path, size))
                    total += size
            for _, path, size in sorted(entries):
                if total <= self.limit:
                    break
                shutil.rmtree(path, ignore_errors=True)
                total -= size

    def size(self) -> int:
        """Bytes the cache holds now."""
        with os.scandir(self.directory) as it:
            return sum(_size_of(d.path) for d in it if d.is_dir(follow_symlinks=False))


def _size_of(directory: str) -> int:
    total = 0
    try:
        with os.scandir(directory) as it:
            for f in it:
                try:
                    total += f.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass
    except FileNotFoundError:
        pass
    return total


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

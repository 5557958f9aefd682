"""Rebuilding a directory's manifest from its shards (``wdsrefresh index``).

Guarantees of ``index_directory``:
- every entry written describes the file as it was while it was read: sample count, digest
  and block digests from one pass over the file, ``filesize`` and ``mtime_ns`` from a stat
  taken before that pass and found unchanged after it;
- a file that changed while it was read, is incomplete (no end-of-archive marker yet: still
  being written, or truncated) or is not a readable tar is left out and reported with the
  reason, never described; readers index such files themselves;
- a file modified less than a second before it was read is read again once it has held
  still for a second (a write in the same timestamp tick as the read would not move its
  mtime);
- the manifest is replaced atomically and durably, while holding the directory's lock
  (as pack and ingest do), after a last look at the directory under that lock: shards
  published or changed meanwhile are indexed then, shards removed meanwhile are not listed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from ..format import manifest as manifestmod
from ..format.manifest import ManifestEntry
from ..format.names import SHARD_PATTERNS, is_shard_name
from ..format.tario import TarError, index_shard
from ..core.snapshot import FileId
from .publish import MANIFEST_NAME, out_lock

log = logging.getLogger("wdsrefresh")

QUIET_NS = 1_000_000_000  # like the resolver: a file this recently written may still change unseen


@dataclass(frozen=True)
class Skipped:
    """A shard file left out of the manifest, and why."""

    shard: str
    reason: str


@dataclass(frozen=True)
class IndexResult:
    manifest: str
    entries: tuple[ManifestEntry, ...]
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True)
class _Seen:
    """What one read of one file found: an entry, or the reason there is none."""

    file_id: FileId | None  # None: read again
    read_at: int  # time.time_ns() when the read started
    entry: ManifestEntry | None
    reason: str | None

    def still_valid(self, st: os.stat_result) -> bool:
        """Whether this read still describes the file ``st`` describes."""
        return FileId.of(st) == self.file_id and not _recent(st, self.read_at)


def _recent(st: os.stat_result, at: int) -> bool:
    """Whether ``st`` was modified so close to time ``at`` that a write at ``at`` might not
    have moved its mtime (timestamps are coarser than reads; clocks of NFS clients differ)."""
    return abs(at - st.st_mtime_ns) < QUIET_NS


def shard_files(directory: str) -> list[str]:
    """Names of the shard files directly in ``directory`` (temporary and hidden names excluded)."""
    return sorted(n for n in os.listdir(directory) if is_shard_name(n) and os.path.isfile(os.path.join(directory, n)))


def _read(directory: str, name: str) -> _Seen | None:
    """Indexes one file; None if it is gone."""
    path = os.path.join(directory, name)
    try:
        before = os.stat(path)
        read_at = time.time_ns()
        if before.st_size == 0:
            return _Seen(FileId.of(before), read_at, None, "empty (just created: still being written?)")
        try:
            index = index_shard(path, url=name)
        except TarError as exn:
            return _Seen(FileId.of(before), read_at, None, f"not a readable tar: {exn}")
        after = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exn:
        return _Seen(None, 0, None, f"cannot read: {exn}")
    if FileId.of(after) != FileId.of(before):
        return _Seen(None, read_at, None, "changed while it was read (still being written?)")
    if not index.complete:
        return _Seen(FileId.of(before), read_at, None,
                     "incomplete: ends before its end-of-archive marker (still being written, or truncated)")
    entry = ManifestEntry(name, index.nsamples, before.st_size, index.digest, index.blocks, before.st_mtime_ns)
    return _Seen(FileId.of(before), read_at, entry, None)


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="index", disable=not sys.stderr.isatty())


def index_directory(directory: str) -> IndexResult:
    """Rewrites ``directory``/manifest.json from the shard files in ``directory``.

    Returns the entries written (in name order) and the files left out with the reason (also
    logged as warnings). See the module docstring for what an entry guarantees. Raises
    FileNotFoundError when ``directory`` holds no shard file (nothing is written then).
    """
    names = shard_files(directory)
    seen: dict[str, _Seen] = {}
    sizes: dict[str, int] = {}
    for name in names:
        try:
            sizes[name] = os.path.getsize(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    with _progress_bar(sum(sizes.values())) as bar:
        for name, size in sizes.items():
            found = _read(directory, name)
            if found is not None:
                seen[name] = found
            bar.update(size)
    with out_lock(directory):
        entries, skipped = _settle(directory, seen)
        path = os.path.join(directory, MANIFEST_NAME)
        if not entries and not skipped:
            raise FileNotFoundError(f"{directory}: no shard files ({', '.join(SHARD_PATTERNS)})")
        manifestmod.save(path, entries)
    for s in skipped:
        log.warning("%s: left out of %s: %s", s.shard, path, s.reason)
    return IndexResult(path, tuple(entries), tuple(skipped))


def _settle(directory: str, seen: dict[str, _Seen]) -> tuple[list[ManifestEntry], list[Skipped]]:
    """The entries for the shard files in ``directory`` now: earlier reads that still hold,
    and new reads of files that appeared, changed, or were too recently written to trust."""
    again = []
    for name in shard_files(directory):
        try:
            st = os.stat(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        if name not in seen or not seen[name].still_valid(st):
            again.append((name, st))
    now = time.time_ns()
    recent = [st.st_mtime_ns for _, st in again if _recent(st, now)]
    if recent:  # wait until they have held still (at most 2 s: a clock far ahead is not waited for)
        time.sleep(max(0, min(max(recent) + QUIET_NS - now, 2 * QUIET_NS)) / 1e9)
    for name, _ in again:
        found = _read(directory, name)
        if found is None:
            seen.pop(name, None)
            continue
        try:
            st = os.stat(os.path.join(directory, name))
        except FileNotFoundError:
            seen.pop(name, None)
            continue
        if found.entry is not None and not found.still_valid(st):
            found = _Seen(None, found.read_at, None, "still being written (modified again while indexed)")
        seen[name] = found
    listed = set(shard_files(directory))
    entries, skipped = [], []
    for name in sorted(seen):
        if name not in listed:
            continue
        if seen[name].entry is not None:
            entries.append(seen[name].entry)
        else:
            skipped.append(Skipped(name, seen[name].reason or "unknown"))
    return entries, skipped

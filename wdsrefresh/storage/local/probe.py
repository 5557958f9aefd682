"""The readiness rule of local files: is this file a shard ready to read?

``probe`` answers for one file: ``Ready`` (a complete tar, with its count and digests),
``Pending`` (still being written), ``Rejected`` (not a shard that can be read), or None (there
is no such regular file). The resolver, the directory index, stream mode and the reader's
reload all ask it, so they cannot disagree about a file. The rule:

- A file renamed into place (a watcher saw the rename, or its ctime is later than its mtime)
  or described by a manifest entry that matches it is ready as soon as it is a complete tar.
- A file written in place is ready once it is a complete tar AND its writer is done with it:
  no process holds it open for writing (a read lease says so: lease.py), or a watcher saw its
  writer close it with no write since. Where neither can be known (no lease on network file
  systems or another user's files, no watcher), the fallback is time: it has not been written
  for ``settle`` seconds. Bytes alone never tell: a preallocated file's zero-filled tail looks
  like an end-of-archive marker, and its writer still holds it open.
- A file some process holds open for writing is pending whatever else is true of it (but a
  manifest entry that describes it), however long ago its last write was.
- A file that is not a complete tar is pending while it may still be written, and rejected as
  truncated once renamed or quiet for ``settle`` seconds; a file that is no tar is rejected.

An object in a store is ready once listed (``objects/backend.py``): a PUT or a completed multipart
upload is visible whole or not at all.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import replace

from ...core.candidate import Candidate, Outcome, Pending, Ready, Rejected
from ...core.options import Readiness
from ...core.snapshot import FileId, ShardInfo
from ...format.digest import DEFAULT_ALGO, split_digest
from ...format.tario import ShardChangedError, TarError, index_shard
from .index_cache import IndexCache
from .lease import open_for_writing

log = logging.getLogger("wdsrefresh")


class TruncatedShard(TarError):
    """A file that ends before its end-of-archive marker and is no longer being written."""


def quiet_for(st: os.stat_result, seconds: float) -> bool:
    """Whether the file was last written at least ``seconds`` ago."""
    return time.time_ns() - st.st_mtime_ns >= seconds * 1e9


def _changed_after_last_write(st: os.stat_result) -> bool:
    """ctime later than mtime: the file was renamed, or its times set (cp -p, rsync -t), after
    its last write; writers do that when they are done. Timestamps are coarse (a few ms), so a
    rename right after the last write often leaves them equal: then only events or time tell."""
    return st.st_ctime_ns > st.st_mtime_ns


RENAMED, CLOSED = "renamed", "closed"  # what a watcher saw a file's writer do last (``probe``'s ``seen``)


class WriterSignals:
    """What a watcher last saw each file's writer do, with no write since: ``RENAMED`` it into
    place or ``CLOSED`` it (a write, a new file or a removal forgets it). Owned by one thread."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def record(self, path: str, kind: str) -> None:
        """One file event of ``kind`` (inotify.Change.kind) on ``path``."""
        if kind == "moved_to":
            self._seen[path] = RENAMED
        elif kind == "closed":
            self._seen.setdefault(path, CLOSED)  # closed after its rename: still renamed
        elif kind in ("modified", "created", "deleted", "moved_from"):
            self._seen.pop(path, None)

    def get(self, path: str) -> str | None:
        return self._seen.get(path)

    def forget(self, path: str) -> None:
        self._seen.pop(path, None)


def probe(cand: Candidate, known: Mapping[str, ShardInfo], rules: Readiness = Readiness(), *,
          st: os.stat_result | None = None, seen: str | None = None, cache: IndexCache | None = None) -> Outcome:
    """What ``cand`` is now. ``known`` maps real paths to what was found before (reused while
    the file is unchanged); ``st`` is a stat of ``cand.path`` the caller already took; ``seen``
    says a watcher saw the file ``RENAMED`` into place or its writer ``CLOSED`` it, with no
    write since; ``cache``, a persistent index cache that stands in for indexing a file version
    it holds (the readiness rule is applied first, the same either way)."""
    try:
        st = st if st is not None else os.stat(cand.path)
    except FileNotFoundError:
        return None
    except OSError as exn:
        return Rejected(None, exn)
    if not stat.S_ISREG(st.st_mode):
        return None
    path = cand.real_path or os.path.realpath(cand.path)
    file_id = FileId.of(st)
    old = known.get(path)
    if old is not None and old.file_id == file_id and (old.digest or not rules.with_digest):
        return Ready(old)
    describes = _manifest_describes(cand, st)
    if describes and cand.nsamples is not None and st.st_size and (
            not rules.with_digest or (cand.digest and cand.blocks is not None)):
        return Ready(ShardInfo(cand.url, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, cand.nsamples,
                               cand.digest, cand.blocks, name=cand.name))
    writing = open_for_writing(cand.path, rules.settle)
    if writing:  # whatever its bytes and times say: a writer that holds it may still write
        return Pending(file_id, "written in place and still open for writing by another process; "
                                "read once its writer closes it")
    base = ShardInfo(cand.url, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, name=cand.name)
    if (seen == RENAMED or describes and cand.filesize is not None or _changed_after_last_write(st)
            or quiet_for(st, rules.settle)):  # published: a complete tar is ready, an incomplete one truncated
        if st.st_size == 0:
            return Rejected(file_id, TruncatedShard(cand.url, 0, "empty file, no longer being written"))
        return _indexed_or_cached(cand, base, st, rules, cache, describes)
    if writing is None and seen != CLOSED:
        return Pending(file_id, f"no signal that its writer is done; ready after {rules.settle:g} s without "
                                "a write, or publish by rename", timed=True)
    if st.st_size:
        outcome = _indexed_or_cached(cand, base, st, rules, cache, describes)
        if not (isinstance(outcome, Rejected) and isinstance(outcome.error, TruncatedShard)):
            return outcome
    done = "its writer closed it" if writing is None else "no process has it open for writing"
    return Pending(file_id, f"{'not a complete tar yet' if st.st_size else 'empty'}, though {done}; rejected "
                            f"as truncated after {rules.settle:g} s without a write", timed=True)


def _indexed_or_cached(cand: Candidate, base: ShardInfo, st: os.stat_result, rules: Readiness,
                       cache: IndexCache | None, describes: bool) -> Outcome:
    """The file indexed, or what the persistent cache holds of this version of it."""
    expected_digest = cand.digest if describes else None
    if cache is None or expected_digest is not None:
        return _indexed(cand, base, rules, expected_digest)
    cached = cache.get(base, st, rules.max_sample_bytes)
    if cached is not None:
        return Ready(cached)
    outcome = _indexed(cand, base, rules, None)
    if isinstance(outcome, Ready):
        cache.put(outcome.info, st, rules.max_sample_bytes)
    return outcome


def _indexed(cand: Candidate, base: ShardInfo, rules: Readiness, expected_digest: str | None) -> Outcome:
    """Reads the file once (count and digests); ready only if complete and unchanged meanwhile.
    ``expected_digest`` is a manifest's whole-file digest for this version of the file."""
    algo = split_digest(expected_digest)[0] if expected_digest else DEFAULT_ALGO
    with_digest = rules.with_digest
    try:
        index = index_shard(base.path, cand.url, with_digest=with_digest, algo=algo,
                            max_sample_bytes=rules.max_sample_bytes)
        after = os.stat(base.path)
    except FileNotFoundError:
        return None
    except (TarError, OSError) as exn:
        return Rejected(base.file_id, exn)
    if FileId.of(after) != base.file_id:
        return Pending(base.file_id, "changed while it was indexed")
    if not index.complete:
        return Rejected(base.file_id, TruncatedShard(cand.url, index.end, "ends before its end-of-archive "
                                                     "marker, and is no longer being written"))
    if expected_digest and with_digest and index.digest != expected_digest.lower():
        error = ShardChangedError(cand.url, 0, f"content differs from the manifest's {algo} digest")
        return Rejected(base.file_id, error)
    return Ready(replace(base, nsamples=index.nsamples, digest=index.digest, blocks=index.blocks))


def _manifest_describes(cand: Candidate, st: os.stat_result) -> bool:
    """Whether a manifest entry is about this version of the file: the same size and, when the
    entry records one, the same mtime_ns. An entry about another version (the file was replaced
    since) says nothing about this one: neither its count nor its digests are used."""
    if cand.filesize is not None and cand.filesize != st.st_size:
        return False
    return cand.mtime_ns is None or cand.mtime_ns == st.st_mtime_ns

"""The one readiness rule of the read path: is this file a shard ready to read?

``probe`` answers for one file: ``Ready`` (a complete tar that held still while it was
indexed, with its count and digests), ``Pending`` (still being written: empty, incomplete,
or rewritten in place moments ago), ``Rejected`` (not a shard that can be read), or None
(there is no such regular file). The resolver, the directory index, stream mode and the
reader's reload all ask it, so they cannot disagree about a file.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .format.digest import DEFAULT_ALGO, split_digest
from .format.tario import ShardChangedError, TarError, index_shard
from .snapshot import FileId, ShardInfo
from .sources import Candidate

log = logging.getLogger("wdsrefresh")

QUIET_NS = 1_000_000_000


@dataclass(frozen=True)
class Ready:
    info: ShardInfo

    @property
    def file_id(self) -> FileId:
        return self.info.file_id


@dataclass(frozen=True)
class Pending:
    file_id: FileId
    reason: str


@dataclass(frozen=True)
class Rejected:
    file_id: FileId | None
    error: BaseException


Outcome = Ready | Pending | Rejected | None


def quiet_since_written(st: os.stat_result) -> bool:
    """Whether a file was last written at least QUIET_NS ago.

    A shard rewritten in place keeps its size and end-of-archive marker throughout, so only
    time tells that its writer is done; reading it earlier could index a mix of two versions.
    """
    return time.time_ns() - st.st_mtime_ns >= QUIET_NS


def probe(cand: Candidate, known: Mapping[str, ShardInfo], *, with_digest: bool = True,
          st: os.stat_result | None = None) -> Outcome:
    """What ``cand`` is now. ``known`` maps real paths to what was found before (reused while
    the file is unchanged); ``st`` is a stat of ``cand.path`` the caller already took."""
    try:
        st = st if st is not None else os.stat(cand.path)
    except FileNotFoundError:
        return None
    except OSError as exn:
        return Rejected(None, exn)
    if not stat.S_ISREG(st.st_mode):
        return None
    path = os.path.realpath(cand.path)
    file_id = FileId.of(st)
    old = known.get(path)
    if old is not None and old.file_id == file_id and (old.digest or not with_digest):
        return Ready(old)
    if st.st_size == 0:
        return Pending(file_id, "empty (just created)")
    if old is not None and old.inode == st.st_ino and not quiet_since_written(st):
        return Pending(file_id, "rewritten in place moments ago")
    base = ShardInfo(cand.url, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    describes = _manifest_describes(cand, st)
    if describes and cand.nsamples is not None and (not with_digest or (cand.digest and cand.blocks is not None)):
        return Ready(replace(base, nsamples=cand.nsamples, digest=cand.digest, blocks=cand.blocks))
    return _indexed(cand, base, with_digest, cand.digest if describes else None)


def _indexed(cand: Candidate, base: ShardInfo, with_digest: bool, expected_digest: str | None) -> Outcome:
    """Reads the file once (count and digests); ready only if complete and unchanged meanwhile.
    ``expected_digest`` is a manifest's whole-file digest for this version of the file."""
    algo = split_digest(expected_digest)[0] if expected_digest else DEFAULT_ALGO
    try:
        index = index_shard(base.path, cand.url, with_digest=with_digest, algo=algo)
        after = os.stat(base.path)
    except FileNotFoundError:
        return None
    except (TarError, OSError) as exn:
        return Rejected(base.file_id, exn)
    if not index.complete or FileId.of(after) != base.file_id:
        log.debug("%s: not ready (still being written)", cand.url)
        return Pending(base.file_id, "incomplete (still being written)")
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

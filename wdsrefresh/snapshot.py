"""ShardInfo and Snapshot: the immutable list of shards one epoch reads, and how it is resolved.

Resolving stats every candidate a source names, reuses what the previous snapshot knew about
files whose identity (device, inode, size, mtime_ns) is unchanged, and indexes the rest once
(sample count and digests in one pass). A file is listed only when it is a complete tar
(end-of-archive marker present) and did not change while it was indexed; a shard still being
written simply waits for a later epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .format.digest import BLOCK_SIZE, DEFAULT_ALGO, split_digest
from .format.names import SHARD_PATTERNS
from .sources import Candidate, NoShardsError, ShardSource
from .format.tario import Expected, ShardChangedError, TarError, index_shard

log = logging.getLogger("wdsrefresh")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as a snapshot saw it."""

    url: str
    path: str
    size: int
    mtime_ns: int
    inode: int = 0
    device: int = 0
    nsamples: int | None = None
    digest: str | None = None
    blocks: bytes | None = field(default=None, repr=False)
    block_size: int = BLOCK_SIZE

    @property
    def identity(self) -> tuple[int, int, int, int]:
        return (self.device, self.inode, self.size, self.mtime_ns)

    def expected(self, with_digest: bool = True) -> Expected:
        """What a reader should find when it opens this shard."""
        return Expected(
            size=self.size,
            mtime_ns=self.mtime_ns,
            inode=self.inode or None,
            digest=self.digest if with_digest else None,
            blocks=self.blocks if with_digest else None,
            block_size=self.block_size,
        )


@dataclass(frozen=True)
class Snapshot:
    """The shards an epoch reads, in a deterministic order; ``id`` names its content."""

    epoch: int
    shards: tuple[ShardInfo, ...]
    id: str
    rejected: tuple[tuple[str, str], ...] = ()
    pending: tuple[str, ...] = ()
    created: float = 0.0

    @property
    def nsamples(self) -> int:
        return sum(s.nsamples or 0 for s in self.shards)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.shards)

    def diff(self, previous: Snapshot | None) -> tuple[list[str], list[str]]:
        """Urls added and removed since ``previous``."""
        before = set(previous.urls) if previous else set()
        now = set(self.urls)
        return sorted(now - before), sorted(before - now)

    def describe(self, previous: Snapshot | None = None) -> str:
        added, removed = self.diff(previous)
        return (
            f"epoch {self.epoch}: snapshot {self.id}, {len(self.shards)} shards "
            f"(+{len(added)} -{len(removed)}), {self.nsamples} samples"
            + (f", {len(self.pending)} pending" if self.pending else "")
            + (f", {len(self.rejected)} rejected" if self.rejected else "")
        )


def shard_key(s: ShardInfo) -> bytes:
    """What a snapshot id hashes of one shard."""
    return repr((s.url, s.path, s.size, s.mtime_ns, s.inode, s.nsamples, s.digest)).encode()


def snapshot_id(shards: tuple[ShardInfo, ...], keys: list[bytes] | None = None) -> str:
    """Names the content of ``shards``; ``keys``, if given, are their ``shard_key``s (precomputed)."""
    h = hashlib.sha256()
    h.update(b"".join(keys if keys is not None else map(shard_key, shards)))
    return h.hexdigest()[:16]


Handler = Callable[[BaseException], bool]

QUIET_NS = 1_000_000_000


def quiet_since_written(st: os.stat_result) -> bool:
    """Whether a file was last written at least QUIET_NS ago.

    A shard rewritten in place keeps its size and end-of-archive marker throughout, so only
    time tells that its writer is done; reading it earlier could index a mix of two versions.
    """
    return time.time_ns() - st.st_mtime_ns >= QUIET_NS


class Resolver:
    """Turns a source into snapshots, indexing only files it has not seen in this identity."""

    def __init__(self, source: ShardSource, with_digest: bool = True, handler: Handler | None = None):
        self.source = source
        self.with_digest = with_digest
        self.handler = handler
        self.known: dict[str, ShardInfo] = {}

    def remember(self, snapshot: Snapshot | None) -> None:
        if snapshot is not None:
            for shard in snapshot.shards:
                self.known.setdefault(shard.path, shard)

    def resolve(self, epoch: int, candidates: list[Candidate] | None = None) -> Snapshot:
        """The snapshot for ``epoch``; raises NoShardsError when the source names no shard."""
        if candidates is None:
            candidates = self.source.candidates()
        shards, rejected, pending = [], [], []
        waiting: set[str] = set()
        for cand in candidates:
            try:
                info = self.info(cand)
            except FileNotFoundError:
                continue
            except (TarError, ShardChangedError, OSError) as exn:
                self.reject(exn)
                rejected.append((cand.url, str(exn)))
                continue
            if info is None:
                pending.append(cand.url)
                waiting.add(os.path.realpath(cand.path))
            else:
                shards.append(info)
        if not shards and not pending and not rejected:
            raise NoShardsError(f"{self.source.describe()} matches no shard ({', '.join(SHARD_PATTERNS)})")
        # a pending file's last version stays known: it tells that the file is being rewritten
        live = {s.path for s in shards} | waiting
        self.known = {p: s for p, s in self.known.items() if p in live}
        self.known.update((s.path, s) for s in shards)
        ordered = tuple(shards)
        return Snapshot(epoch, ordered, snapshot_id(ordered), tuple(rejected), tuple(pending), time.time())

    def reject(self, exn: BaseException) -> None:
        """Raises ``exn`` unless the handler says to go on (then the file is left out)."""
        if self.handler is None or not self.handler(exn):
            raise exn.with_traceback(None)  # a watcher keeps the error: do not grow its traceback
        log.warning("shard left out of the snapshot: %s", exn)

    def info(self, cand: Candidate) -> ShardInfo | None:
        st = os.stat(cand.path)
        path = os.path.realpath(cand.path)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        known = self.known.get(path)
        if known is not None and known.identity == identity and (known.digest or not self.with_digest):
            return known
        if st.st_size == 0:  # just created by a producer writing in place
            return None
        if known is not None and known.inode == st.st_ino and not quiet_since_written(st):
            return None  # being rewritten in place: wait until it holds still, or we index a torn file
        base = ShardInfo(cand.url, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        if self._manifest_describes(cand, st.st_size):
            return replace(base, nsamples=cand.nsamples, digest=cand.digest, blocks=cand.blocks)
        algo = split_digest(cand.digest)[0] if cand.digest else DEFAULT_ALGO
        index = index_shard(path, cand.url, with_digest=self.with_digest, algo=algo)
        after = os.stat(path)
        if not index.complete or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            log.debug("%s: not ready (still being written)", cand.url)
            return None
        if cand.digest and self.with_digest and index.digest != cand.digest.lower():
            raise ShardChangedError(cand.url, 0, f"content differs from the manifest's {algo} digest")
        return replace(base, nsamples=index.nsamples, digest=index.digest, blocks=index.blocks)

    def _manifest_describes(self, cand: Candidate, size: int) -> bool:
        if cand.nsamples is None or (cand.filesize is not None and cand.filesize != size):
            return False
        return not self.with_digest or (cand.digest is not None and cand.blocks is not None)

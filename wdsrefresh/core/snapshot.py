"""ShardInfo and Snapshot: the immutable list of shards one epoch reads.

A snapshot is a value: every DataLoader worker of every rank receives the same one for an
epoch, and everything that varies per consumer (order, split) is computed from it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..format.digest import BLOCK_SIZE
from ..format.tario import Expected


@dataclass(frozen=True)
class FileId:
    """Which file a path names, and in which state: a change to any field is a new version."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ShardInfo:
    """One shard as a snapshot saw it.

    An object in a store (``etag`` set) has ``path == url``, ``mtime_ns`` its Last-Modified, no
    inode or device, and is read pinned to ``version_id`` (versioned buckets) or ``etag``.
    """

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
    name: str = ""  # relative to the source's root: the same wherever the data is copied
    etag: str | None = None  # an object's ETag (opaque): which version of it the snapshot lists
    version_id: str | None = None  # an object's VersionId, in a versioned bucket

    @property
    def file_id(self) -> FileId:
        return FileId(self.device, self.inode, self.size, self.mtime_ns)

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


class LazySequence(Sequence):
    """A read-only sequence whose items are made when asked for (``_item``); equal to any
    sequence of equal items, as a tuple would be."""

    def _item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self._item(i) for i in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} of {len(self)}")
        return self._item(index)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))


@dataclass(frozen=True)
class Snapshot:
    """The shards an epoch reads, in a deterministic order; ``id`` names its content.

    ``len(snapshot)`` is the number of samples its shards hold. ``resolved_at`` (wall-clock
    seconds) and ``resolve_seconds`` say when and how fast it was resolved (0.0 when unknown,
    e.g. a snapshot restored from a checkpoint); they are not part of its value.
    """

    epoch: int
    shards: Sequence[ShardInfo]  # a tuple, or a ShardTable that builds them on access
    id: str
    rejected: tuple[tuple[str, str], ...] = ()
    pending: tuple[str, ...] = ()
    resolved_at: float = field(default=0.0, compare=False)
    resolve_seconds: float = field(default=0.0, compare=False)
    pending_reasons: dict[str, str] = field(default_factory=dict, compare=False)  # pending url -> why it waits

    @property
    def nsamples(self) -> int:
        return sum(self.sample_counts())

    def sample_counts(self) -> list[int]:
        """Each shard's sample count (0 where unknown), in order; from the column when the shards
        are a ``snapshot_columns.ShardTable``, without building them."""
        counts = getattr(self.shards, "sample_counts", None)
        return counts() if counts is not None else [s.nsamples or 0 for s in self.shards]

    def __len__(self) -> int:
        return self.nsamples

    @property
    def nbytes(self) -> int:
        """The size of its shard files, in bytes."""
        return sum(s.size for s in self.shards)

    @property
    def lag(self) -> float | None:
        """Seconds from the last write of its newest shard (largest mtime) to ``resolved_at``:
        how far behind the producers this epoch reads. None without shards or ``resolved_at``."""
        if not self.shards or not self.resolved_at:
            return None
        return max(0.0, self.resolved_at - max(s.mtime_ns for s in self.shards) / 1e9)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.shards)

    def diff(self, previous: Snapshot | None) -> tuple[list[str], list[str]]:
        """Urls added and removed since ``previous``."""
        if previous is not None and type(previous.shards) is tuple and type(self.shards) is tuple \
                and previous.shards == self.shards:  # the same entries: compared by identity first, in C
            return [], []
        before = set(previous.urls) if previous is not None else set()
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
    """What a snapshot id hashes of one shard: its name below the source's root, size, count and
    content digest; never where the data lies (path, inode, mtime), so a copy of the data on
    another disk or node has the same ids and, with the same seed, the same shuffle."""
    return repr((s.name or os.path.basename(s.url), s.size, s.nsamples, s.digest)).encode()


def snapshot_id(shards: tuple[ShardInfo, ...], keys: list[bytes] | None = None) -> str:
    """Names the content of ``shards``; ``keys``, if given, are their ``shard_key``s (precomputed)."""
    h = hashlib.sha256()
    h.update(b"".join(keys if keys is not None else map(shard_key, shards)))
    return h.hexdigest()[:16]

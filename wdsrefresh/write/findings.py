"""What ``verify`` and ``ls`` find, for a directory and for an ``s3://`` prefix alike: problems,
a report of what was checked, listing rows, and how reading a shard differs from its entry."""

from __future__ import annotations

from dataclasses import dataclass

from ..format.digest import BLOCK_SIZE
from ..format.manifest import ManifestEntry


@dataclass(frozen=True)
class Problem:
    shard: str
    kind: str  # missing | size | tar | truncated | digest | blocks | nsamples | unlisted | empty
    detail: str


@dataclass(frozen=True)
class Listing:
    shard: str
    nsamples: int | None
    size: int | None
    digest: str | None
    age: float | None  # seconds since the last modification
    listed: bool  # named in the manifest (or in manifest.d/ when ``pending``)
    pending: bool = False  # named only in manifest.d/: a pack not yet committed
    replaced: bool = False  # the file or object is no longer the version its entry describes
    unreadable: str | None = None  # why a reader would not read this unlisted file (incomplete, not a tar)


@dataclass(frozen=True)
class Report:
    """What ``check`` looked at and what it found."""

    target: str
    manifest: str | None  # the manifest compared with, if any
    shards: int  # shards checked
    samples: int  # samples counted in them
    undigested: int  # shards whose manifest entry has no digest (digests not compared)
    pending: int  # shards of a pack not committed yet (checked against their manifest.d/ entries)
    problems: list[Problem]

    def summary(self) -> str:
        """One line: what was checked, and what was not."""
        text = f"{self.shards} shard{'s' * (self.shards != 1)}, {self.samples} samples: "
        if self.manifest is None:
            text += "tar structure walked and samples counted; no manifest, so sizes, digests and counts not compared"
        else:
            text += f"size, digests, sample count and tar structure checked against {self.manifest}"
            if self.undigested:
                text += f"; {self.undigested} without a digest in it, so their digests not compared"
        if self.pending:
            text += (f"; {self.pending} of a pack not committed yet (rerun it), checked against their entries "
                     "in manifest.d/")
        return text


def index_problems(entry: ManifestEntry, index, size: int) -> list[Problem]:
    """How what reading a shard found (``index``: complete, digest, blocks, nsamples) differs
    from its entry."""
    problems = []
    if not index.complete:
        problems.append(Problem(entry.url, "truncated", f"ends before its end-of-archive marker ({size} bytes)"))
    if index.digest is not None:
        problems += _digest_problems(entry, index.digest, index.blocks)
    if entry.nsamples is not None and index.complete and index.nsamples != entry.nsamples:
        problems.append(Problem(entry.url, "nsamples", f"{index.nsamples} samples, manifest says {entry.nsamples}"))
    return problems


def _digest_problems(entry: ManifestEntry, digest: str, blocks: bytes | None) -> list[Problem]:
    problems = []
    if entry.digest and digest != entry.digest.lower():
        problems.append(Problem(entry.url, "digest", f"{digest}, manifest says {entry.digest}"))
    if entry.blocks is not None and blocks is not None and blocks != entry.blocks:
        problems.append(Problem(entry.url, "blocks", f"first differing block at byte {_first_difference(blocks, entry.blocks)}"))
    return problems


def _first_difference(a: bytes, b: bytes) -> int:
    for i in range(0, max(len(a), len(b)), 8):
        if a[i : i + 8] != b[i : i + 8]:
            return (i // 8) * BLOCK_SIZE
    return 0

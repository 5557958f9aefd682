"""A shard a source names, and what the readiness rule finds it to be.

A ``Candidate`` is what any backend's listing yields (a file, or an object already indexed);
``Ready``, ``Pending`` and ``Rejected`` are the rule's answers, the same for every backend, so
the resolver, the directory index and stream mode read them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .snapshot import FileId, ShardInfo


@dataclass(frozen=True)
class Candidate:
    """A file a source names, with whatever a manifest says about it."""

    url: str
    path: str
    nsamples: int | None = None
    digest: str | None = None
    blocks: bytes | None = None
    filesize: int | None = None
    mtime_ns: int | None = None  # with filesize: the file version the manifest describes
    name: str = ""  # below the source's root (a directory's relative path, a manifest's url)
    real_path: str = ""  # the path with symlinks resolved, when the listing knew it ("": resolve it)


@dataclass(frozen=True)
class Ready:
    info: ShardInfo

    @property
    def file_id(self) -> FileId:
        return self.info.file_id


@dataclass(frozen=True)
class Pending:
    file_id: FileId
    reason: str  # why it waits, and when it is looked at again
    timed: bool = False  # only the settle time can make this version ready (no writer signal here)


@dataclass(frozen=True)
class Rejected:
    file_id: FileId | None
    error: BaseException


Outcome = Ready | Pending | Rejected | None

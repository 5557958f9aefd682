"""Backend: what every storage backend provides, written as abstract methods.

A backend is where one kind of shard lives: local files (``local/backend.py``) or objects in a
store (``objects/backend.py``). ``backend.backend_for`` picks one from a source spec or a
shard's URL; the rest of the package asks the backend and never tests a scheme or a class:

- what a source spec lists: ``source``;
- how a listed candidate becomes ready: ``ready`` (the readiness rule);
- how a shard version is opened, as a ``format.tario.ShardReader`` over a ByteSource that counts
  bytes and seconds in the reader's IOCounters: ``open``;
- whether a digest mismatch is corruption (the version did not change): ``unchanged``;
- how it is read again after a change (``on_change="reload"``): ``reread``;
- what it reads ahead of the next ``open``: ``prefetch`` and ``discard`` (nothing by default).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from ..core.candidate import Candidate, Outcome
from ..core.options import Readiness, ReadOptions
from ..core.snapshot import ShardInfo
from ..format.tario import Expected, IOCounters, ShardReader, TarError
from .source import ShardSource


class Backend(ABC):
    """One kind of storage (see the module docstring); ``name`` names it in messages and in the
    write side's table of destinations."""

    name: str
    local: bool = False  # its shards are files of this machine, named by paths, not URLs
    # errors that mean a shard cannot be read as it is (corrupt, or a store still failing after
    # its retries): counted as corrupt, and the handler decides
    read_failures: tuple[type[BaseException], ...] = (TarError,)

    @abstractmethod
    def source(self, spec: Any, storage_options: dict | None = None) -> ShardSource:
        """The ShardSource of ``spec`` (a path or URL, or a list of them that this backend lists
        together); ``storage_options`` are refused by a backend that takes none."""

    @abstractmethod
    def ready(self, cand: Candidate, known: Mapping[str, ShardInfo], rules: Readiness, *,
              st: Any = None, seen: str | None = None, cache: Any = None) -> Outcome:
        """What ``cand`` is now: Ready, Pending, Rejected, or None (it does not exist).
        ``known``, ``st``, ``seen`` and ``cache`` are what the caller already knows of it
        (``local/probe.py`` says what each means; a backend may ignore them)."""

    @abstractmethod
    def open(self, shard: ShardInfo, expected: Expected, options: ReadOptions,
             counters: IOCounters | None = None) -> tuple[ShardReader, Callable[[], None]]:
        """A reader of ``shard`` as ``expected`` (its snapshot's version, or a reloaded one), and
        the function that closes it; ``counters`` adds up what reading it costs."""

    @abstractmethod
    def unchanged(self, shard: ShardInfo, expected: Expected) -> bool:
        """Whether the storage still holds the version ``expected`` describes, so that bytes
        differing from its digests are corruption rather than a replacement."""

    @abstractmethod
    def reread(self, shard: ShardInfo, options: ReadOptions) -> tuple[Expected, int] | None:
        """What ``shard`` holds now, if it is ready by the backend's rule, and its sample count;
        None when it cannot be read again (gone, or not ready)."""

    def prefetch(self, shard: ShardInfo, options: ReadOptions) -> Any:
        """Starts reading ``shard`` ahead of its ``open``; returns the key ``discard`` takes."""
        return None

    def read_ahead(self, shard: ShardInfo, options: ReadOptions) -> int:
        """How many bytes of the shards after ``shard`` a consumer may have prefetched (0: only the next)."""
        return 0

    def discard(self, key: Any) -> None:
        """Stops the read-ahead ``prefetch`` started, if no ``open`` took it over."""

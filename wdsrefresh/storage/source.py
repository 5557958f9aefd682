"""ShardSource: what every backend's source is, and a list of sources.

A source only names candidate shards; statting, indexing and deciding which are ready is the
snapshot's job (``resolver.py``, through each candidate's backend). Listing order is sorted,
so a snapshot's order is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ..core.candidate import Candidate
from ..errors import WdsRefreshError


class NoShardsError(WdsRefreshError, FileNotFoundError):
    """A source matched no shard."""


class ShardSource:
    """Names the candidate shard files; ``describe()`` is used in error messages."""

    def candidates(self) -> list[Candidate]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def candidate(self, path: str) -> Candidate:
        """The candidate for one file this source names (a watcher saw it change)."""
        return Candidate(url=path, path=path, name=os.path.basename(path))

    @property
    def directory(self) -> str | None:
        """The local directory this source lists, when it is one: it can be watched for file
        events, and its shards are named relative to it. None for any other source."""
        return None

    def limit_samples(self, max_sample_bytes: int) -> None:
        """A source whose candidates arrive indexed (objects) refuses shards holding a member
        larger than this, as the resolver refuses files; others have nothing to do."""

    def close(self) -> None:
        """Stops what the source runs in the background (objects: indexing ahead); nothing here."""

    def store_for(self, url: str) -> Any | None:
        """The object store this source's shard at ``url`` is read through (made from the source's
        own options, so two sources never read through each other's endpoint or credentials);
        None: a local file."""
        return None


class ListSource(ShardSource):
    """Several sources, in the order given; a file named twice is listed once."""

    def __init__(self, sources: Iterable[ShardSource]):
        self.sources = list(sources)

    def candidates(self) -> list[Candidate]:
        seen: set[str] = set()
        out = []
        for source in self.sources:
            for c in source.candidates():
                if c.path not in seen:
                    seen.add(c.path)
                    out.append(c)
        return out

    def describe(self) -> str:
        return "list [" + ", ".join(s.describe() for s in self.sources) + "]"

    def store_for(self, url: str) -> Any | None:
        return next((store for s in self.sources if (store := s.store_for(url)) is not None), None)

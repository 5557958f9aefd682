"""Objects in a store as a Backend: listed by ``source.py`` (already indexed, so ready once
listed: a PUT or a completed multipart upload is visible whole or not at all), read block by
block, pinned and checked, by ``blocks.py``, through the store of the source that listed them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from ...core.candidate import Candidate, Outcome, Ready, Rejected
from ...core.options import Readiness, ReadOptions
from ...core.snapshot import ShardInfo
from ...format.tario import Expected, IOCounters, ShardReader, TarError
from ..interface import Backend
from ..source import ShardSource
from . import blocks
from .retry import ObjectReadError
from .source import ObjectSource


class ObjectStore(Backend):
    read_failures = (TarError, ObjectReadError)

    def __init__(self, scheme: str):
        self.name = scheme

    def source(self, spec: Any, storage_options: dict | None = None) -> ShardSource:
        return ObjectSource(spec, storage_options=storage_options)

    def ready(self, cand: Candidate, known: Mapping[str, ShardInfo], rules: Readiness, *,
              st: Any = None, seen: str | None = None, cache: Any = None) -> Outcome:
        if cand.error is not None:  # an ObjectCandidate: its source resolved it while listing
            return Rejected(cand.file_id, cand.error)
        return Ready(cand.info) if cand.info is not None else None

    def open(self, shard: ShardInfo, expected: Expected, options: ReadOptions,
             counters: IOCounters | None = None) -> tuple[ShardReader, Callable[[], None]]:
        # refused, naming the URL, if the entry lost its ETag (never read unpinned)
        return blocks.open_object(_store(shard, options), shard.url, expected, shard.etag, shard.version_id,
                                  max_sample_bytes=options.max_sample_bytes, counters=counters)

    def unchanged(self, shard: ShardInfo, expected: Expected) -> bool:
        return False  # a pinned read names a replacement itself (412); a digest mismatch raises as corrupt

    def reread(self, shard: ShardInfo, options: ReadOptions) -> tuple[Expected, int] | None:
        return blocks.reload(_store(shard, options), shard.url, shard.name, options.max_sample_bytes)

    def prefetch(self, shard: ShardInfo, options: ReadOptions) -> Any:
        return blocks.prefetch(_store(shard, options), shard.url, shard.expected(with_digest=options.verify != "off"),
                               shard.etag, shard.version_id)

    def read_ahead(self, shard: ShardInfo, options: ReadOptions) -> int:
        return _store(shard, options).memory_budget  # the window holds their bytes to it (window.py)

    def discard(self, key: Any) -> None:
        blocks.discard(key)


@cache
def objects_backend(scheme: str) -> ObjectStore:
    """The backend of ``scheme://`` URLs (one per scheme and process)."""
    return ObjectStore(scheme)


def _store(shard: ShardInfo, options: ReadOptions) -> Any:
    """The store of the source that listed ``shard`` (never one chosen by bucket or host: two
    sources may name the same bucket on two endpoints)."""
    store = options.store_for(shard.url) if options.store_for is not None else None
    if store is None:
        raise ValueError(f"{shard.url}: no object store to read it through; read it through the dataset whose "
                         "source listed it")
    return store

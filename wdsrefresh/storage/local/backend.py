"""Local files as a Backend: listed by ``sources.py``, ready by ``probe.py``, read by
``format/tario.open_shard`` (an mmap or a stream of the file, counted in its IOCounters)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ...core.candidate import Candidate, Outcome, Ready
from ...core.options import Readiness, ReadOptions
from ...core.snapshot import ShardInfo
from ...format.tario import Expected, IOCounters, ShardReader, open_shard
from ..interface import Backend
from ..source import ShardSource
from .probe import probe
from .sources import local_source


class LocalFiles(Backend):
    name = "files"
    local = True

    def source(self, spec: Any, storage_options: dict | None = None) -> ShardSource:
        if storage_options is not None:
            raise TypeError(f"storage_options apply to s3:// and https:// URLs, not to {spec!r}")
        return local_source(spec)

    def ready(self, cand: Candidate, known: Mapping[str, ShardInfo], rules: Readiness, *,
              st: Any = None, seen: str | None = None, cache: Any = None) -> Outcome:
        return probe(cand, known, rules, st=st, seen=seen, cache=cache)

    def open(self, shard: ShardInfo, expected: Expected, options: ReadOptions,
             counters: IOCounters | None = None) -> tuple[ShardReader, Callable[[], None]]:
        reader, fd = open_shard(shard.path, shard.url, expected, counters, max_sample_bytes=options.max_sample_bytes)
        return reader, lambda: os.close(fd)

    def unchanged(self, shard: ShardInfo, expected: Expected) -> bool:
        try:
            st = os.stat(shard.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (expected.size, expected.mtime_ns,
                                                           expected.inode or st.st_ino)

    def reread(self, shard: ShardInfo, options: ReadOptions) -> tuple[Expected, int] | None:
        outcome = probe(Candidate(shard.url, shard.path, name=shard.name), {shard.path: shard}, options.readiness)
        if not isinstance(outcome, Ready):
            return None
        info = outcome.info
        return Expected(info.size, info.mtime_ns, info.inode, info.digest, info.blocks), info.nsamples or 0


LOCAL_FILES = LocalFiles()

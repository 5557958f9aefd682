"""Resolving a source into a snapshot, indexing only files not seen in this version before."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ..core.candidate import Candidate, Outcome, Pending, Ready, Rejected
from ..core.options import Readiness
from ..core.snapshot import FileId, ShardInfo, Snapshot, snapshot_id
from ..format.names import SHARD_PATTERNS
from .backend import backend_for
from .local.index_cache import IndexCache
from .source import NoShardsError, ShardSource

log = logging.getLogger("wdsrefresh")

INVALID_POLICIES = ("warn", "raise")


class Resolver:
    """Turns a source into snapshots, reusing what it knows of files whose FileId is unchanged.

    Files that cannot be read as shards are left out of the snapshot and listed in its
    ``rejected``, with a WARNING once per file version (``on_invalid="warn"``), or raise
    (``on_invalid="raise"``); a rejected file is looked at again when it changes.
    """

    def __init__(self, source: ShardSource, rules: Readiness = Readiness(), on_invalid: str = "warn"):
        self.source = source
        self.rules = rules
        source.limit_samples(rules.max_sample_bytes)
        self.on_invalid = on_invalid
        self.known: dict[str, ShardInfo] = {}
        self._warned: set[tuple[str, FileId | None]] = set()
        self._pending_warned: dict[str, str] = {}  # each pending file's reason, as last warned
        self.cache = IndexCache(rules.index_cache) if rules.index_cache else None

    def remember(self, snapshot: Snapshot | None) -> None:
        if snapshot is not None:
            for shard in snapshot.shards:
                self.known.setdefault(shard.path, shard)

    def probe(self, cand: Candidate, st=None, seen: str | None = None) -> Outcome:
        """What ``cand`` is now, by its backend's readiness rule."""
        return backend_for(cand.url).ready(cand, self.known, self.rules, st=st, seen=seen, cache=self.cache)

    def flush_cache(self, force: bool = True) -> None:
        """Writes what was indexed to the persistent index cache (``force=False``: at most every 30 s)."""
        if self.cache is not None:
            self.cache.flush(force)

    def forget(self, path: str) -> None:
        """The file at ``path`` (a real path) is gone: neither known nor cached any more."""
        self.known.pop(path, None)
        if self.cache is not None:
            self.cache.forget(path)

    def resolve(self, epoch: int, candidates: list[Candidate] | None = None) -> Snapshot:
        """The snapshot for ``epoch``; raises NoShardsError when the source names no file (but
        for an existing directory, which gives an empty snapshot)."""
        if candidates is None:
            candidates = self.source.candidates()
        shards, rejected, pending = [], [], {}
        waiting: set[str] = set()
        for cand in candidates:
            outcome = self.probe(cand)
            if isinstance(outcome, Rejected):
                self.reject(cand.url, outcome)
                rejected.append((cand.url, str(outcome.error)))
            elif isinstance(outcome, Pending):
                pending[cand.url] = outcome
                waiting.add(os.path.realpath(cand.path))
            elif isinstance(outcome, Ready):
                shards.append(outcome.info)
        if not shards and not pending and not rejected:
            self.check_found_any()
        self._keep_known(shards, waiting)
        self.flush_cache()
        self.report_pending(pending)
        ordered = tuple(shards)
        return Snapshot(epoch, ordered, snapshot_id(ordered), tuple(rejected), tuple(pending),
                        pending_reasons={url: p.reason for url, p in pending.items()})

    def check_found_any(self) -> None:
        """The source named no file at all: NoShardsError, unless it is a directory that exists
        (a producer may not have started yet: an empty epoch, which the caller reports)."""
        if self.source.directory is None or not os.path.isdir(self.source.directory):
            raise NoShardsError(f"{self.source.describe()} matches no shard ({', '.join(SHARD_PATTERNS)})")

    def report_pending(self, pending: Mapping[str, Pending]) -> None:
        """A WARNING for each file that starts to wait, or waits for another reason than at the
        last snapshot: which file, why, and what makes it ready (a file growing under its writer
        is said once, not at every epoch)."""
        for url, outcome in pending.items():
            if self._pending_warned.get(url) != outcome.reason:
                log.warning("pending, not in this snapshot: %s: %s", url, outcome.reason)
        self._pending_warned = {url: outcome.reason for url, outcome in pending.items()}

    def _keep_known(self, shards: list[ShardInfo], waiting: set[str]) -> None:
        """Forgets files gone; a pending file's last version stays known: it tells a rewrite in place."""
        live = {s.path for s in shards} | waiting
        if self.cache is not None:
            for path in self.known.keys() - live:
                self.cache.forget(path)
        self.known = {p: s for p, s in self.known.items() if p in live}
        self.known.update((s.path, s) for s in shards)

    def reject(self, url: str, outcome: Rejected) -> None:
        """Raises the file's error under ``on_invalid="raise"``; else warns, once per file version."""
        if self.on_invalid == "raise":
            raise outcome.error.with_traceback(None)  # an index keeps the error: do not grow its traceback
        key = (url, outcome.file_id)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("left out of the snapshot: %s", _naming(url, outcome.error))


def _naming(url: str, error: BaseException) -> str:
    text = str(error)
    return text if url in text else f"{url}: {text}"

"""Resolving a source into a snapshot, indexing only files not seen in this version before."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .format.names import SHARD_PATTERNS
from .probe import Pending, Ready, Rejected, probe
from .snapshot import ShardInfo, Snapshot, snapshot_id
from .sources import Candidate, NoShardsError, ShardSource

log = logging.getLogger("wdsrefresh")

Handler = Callable[[BaseException], bool]


class Resolver:
    """Turns a source into snapshots, reusing what it knows of files whose FileId is unchanged."""

    def __init__(self, source: ShardSource, with_digest: bool = True, handler: Handler | None = None):
        self.source = source
        self.with_digest = with_digest
        self.handler = handler
        self.known: dict[str, ShardInfo] = {}

    def remember(self, snapshot: Snapshot | None) -> None:
        if snapshot is not None:
            for shard in snapshot.shards:
                self.known.setdefault(shard.path, shard)

    def probe(self, cand: Candidate, st=None):
        return probe(cand, self.known, with_digest=self.with_digest, st=st)

    def resolve(self, epoch: int, candidates: list[Candidate] | None = None) -> Snapshot:
        """The snapshot for ``epoch``; raises NoShardsError when the source names no shard."""
        if candidates is None:
            candidates = self.source.candidates()
        shards, rejected, pending = [], [], []
        waiting: set[str] = set()
        for cand in candidates:
            outcome = self.probe(cand)
            if isinstance(outcome, Rejected):
                self.reject(outcome.error)
                rejected.append((cand.url, str(outcome.error)))
            elif isinstance(outcome, Pending):
                pending.append(cand.url)
                waiting.add(os.path.realpath(cand.path))
            elif isinstance(outcome, Ready):
                shards.append(outcome.info)
        if not shards and not pending and not rejected:
            raise NoShardsError(f"{self.source.describe()} matches no shard ({', '.join(SHARD_PATTERNS)})")
        self._keep_known(shards, waiting)
        ordered = tuple(shards)
        return Snapshot(epoch, ordered, snapshot_id(ordered), tuple(rejected), tuple(pending))

    def _keep_known(self, shards: list[ShardInfo], waiting: set[str]) -> None:
        """Forgets files gone; a pending file's last version stays known: it tells a rewrite in place."""
        live = {s.path for s in shards} | waiting
        self.known = {p: s for p, s in self.known.items() if p in live}
        self.known.update((s.path, s) for s in shards)

    def reject(self, exn: BaseException) -> None:
        """Raises ``exn`` unless the handler says to go on (then the file is left out)."""
        if self.handler is None or not self.handler(exn):
            raise exn.with_traceback(None)  # a watcher keeps the error: do not grow its traceback
        log.warning("shard left out of the snapshot: %s", exn)

"""EpochSource: the first stage of ``mode="epoch"``: each iteration, this consumer's share of an epoch.

In the main process ``set_epoch`` resolves the epoch's snapshot (rank 0 resolves and
broadcasts under torch.distributed) and publishes it in the state directory. In each
consumer, an iteration loads the published snapshot of its epoch, computes its share with
the exact split and reads it. Checkpoints (``state_dict``) record the consumer's position;
the format and its guarantees are in resume.py.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass, replace
from typing import Any

from . import resume as resuming
from ..storage.backend import make_source
from ..storage.local import DirectoryIndex, poll_interval
from ..core.options import ReadOptions
from .reading import Cursor, ReadStats, read_assignment, read_positions
from ..storage.resolver import Resolver
from .feed import Consumer
from .slot import Slot
from ..core.snapshot import Snapshot
from ..storage.source import ShardSource
from ..storage.waiting import resolve_waiting
from .split import Assignment, rank_quota, split, worker_shares
from .stage import EpochStage
from .statedir import StateDirectory
from .stats import EpochStats, epoch_stats

log = logging.getLogger("wdsrefresh")

@dataclass
class _Iteration:
    """One consumer's iteration: fixed when its iterator is created, current while it runs."""

    consumer: Consumer
    snapshot: Snapshot
    assignment: Assignment
    stats: ReadStats
    cursor: Cursor
    explicit: bool = False  # pieces redistributed at a resume, not the split's own
    shuffle: dict | None = None  # a checkpointed .shuffle() buffer, re-read before the cursor's samples


class EpochSource(EpochStage):
    """The first pipeline stage of ``mode="epoch"``; see the module docstring."""

    def __init__(self, source: Any, *, shardshuffle: bool, seed: int, options: ReadOptions,
                 partial: bool, state_dir: str | None, watch: bool | str = False, poll: bool | float = False,
                 min_shards: int = 0, timeout: float | None = None, on_invalid: str = "warn",
                 storage_options: dict[str, Any] | None = None, warn_empty: bool = True):
        self.source: ShardSource = make_source(source, storage_options)
        self.shardshuffle = bool(shardshuffle)
        self.seed = seed
        self.options = options
        self.partial = partial
        self.on_invalid = on_invalid
        self._init_stage(StateDirectory(state_dir))
        self._resolver: Resolver | None = None
        self._snapshot_doc: dict | None = None
        # watch: a DirectoryIndex in this process only (never in DataLoader workers), made lazily
        self.watch, self.poll, self.min_shards, self.timeout = watch, poll, min_shards, timeout
        self._index: DirectoryIndex | None = None
        self.warn_empty = warn_empty  # False where an empty epoch raises instead (empty_check=True)
        self._empty_warned = False  # the last snapshot was empty, and a WARNING said so
        self._owner_pid = os.getpid()
        weakref.finalize(self, self.statedir.cleanup)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_resolver"] = state["_index"] = None
        state["_next"] = state["_live"] = state["_snapshot_doc"] = state["_resumed"] = None
        return state

    # resolving, in the main process
    def _resolve(self, epoch: int, previous: Snapshot | None = None) -> Snapshot:
        index = self._watched_index()
        if index is not None:
            once = lambda: index.snapshot(epoch)  # noqa: E731
        else:
            resolver = self._rescanner()
            resolver.remember(previous)
            once = lambda: resolver.resolve(epoch)  # noqa: E731
        self.attempts = 0  # resolutions tried: more than one when min_shards made it wait

        def counted() -> Snapshot:
            self.attempts += 1
            return once()

        started = time.monotonic()
        snapshot = resolve_waiting(counted, describe=self.source.describe(), min_shards=self.min_shards,
                                   timeout=self.timeout, index=index, poll=poll_interval(self.poll, 1.0))
        snapshot = replace(snapshot, resolved_at=time.time(), resolve_seconds=time.monotonic() - started)
        if not snapshot.shards and self.warn_empty and not self._empty_warned:  # once, until shards come
            log.warning("%s: no ready shard, epoch %d is empty (%d pending, %d rejected); min_shards=N waits "
                        "for N ready shards", self.source.describe(), epoch, len(snapshot.pending),
                        len(snapshot.rejected))
        self._empty_warned = not snapshot.shards
        if log.isEnabledFor(logging.INFO):  # the diff in the line costs a pass over every shard
            log.info("%s", snapshot.describe(previous))
        return snapshot

    def resolve(self, epoch: int, previous: Snapshot | None = None) -> Snapshot:
        """The snapshot of ``epoch`` resolved now, in this process, without publishing it (a mix
        resolves each of its sources so); ``attempts`` then says how many tries ``min_shards`` took."""
        return self._resolve(epoch, previous)

    def _rescanner(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(self.source, self.options.readiness, self.on_invalid)
        return self._resolver

    def _watched_index(self) -> DirectoryIndex | None:
        """The watched index of the source, in the process that built the dataset (None elsewhere)."""
        if not self.watch or os.getpid() != self._owner_pid or self.source.directory is None:
            return None
        if self._index is None:
            backend = self.watch if isinstance(self.watch, str) else "auto"
            self._index = DirectoryIndex(self.source, rules=self.options.readiness, on_invalid=self.on_invalid,
                                         poll=self.poll, backend=backend)
        return self._index

    @property
    def watching(self) -> str | None:
        """How this process keeps its index of the directory current: "inotify", "watchdog",
        "poll"; None when it rescans at each epoch (or no epoch was resolved yet)."""
        if self._index is None:
            return None
        return "poll" if self._index.watcher is None else self._index.watcher.name

    def close(self) -> None:
        """Stops the directory watcher this process started, if any, and the source's own
        background work."""
        index, self._index = self._index, None
        if index is not None and os.getpid() == self._owner_pid:
            index.close()
        self.source.close()

    def _stats_of(self, snap: Snapshot, previous: Snapshot | None, records: list[dict], control: dict) -> EpochStats:
        return epoch_stats(snap, previous, records, rank=control["rank"], world_size=control["world_size"],
                           partial=self.partial, name_of=self.name_of)

    def shares(self, epoch: int, num_workers: int | None = None) -> list[int]:
        """The samples each of this rank's consumers yields in ``epoch`` (published) when read
        by ``num_workers`` DataLoader workers (0: one consumer; None: any, when only the sum
        matters). After ``load_state_dict`` of that epoch: what remains of each consumer's
        share, as the resume redistributes it. Raises ResumeError when that state cannot resume
        on ``num_workers`` (consumers missing from it)."""
        control = self.statedir.control()
        rank, world_size = control["rank"], control["world_size"]
        resume = self._resumed
        if resume is not None and resume.epoch == epoch:
            workers = resume.num_workers if num_workers is None else max(1, num_workers)
            assignment_of = self._saved_split(resume)
            return [resuming.restart(resume, assignment_of, Slot(rank, world_size, worker, workers),
                                     partial=self.partial, warn=False).samples for worker in range(workers)]
        snapshot = self.snapshot(epoch)
        quota, _ = rank_quota(snapshot.nsamples if snapshot is not None else 0, rank, world_size, self.partial)
        return worker_shares(quota, num_workers or 0)

    def name_of(self, url: str) -> str:
        """A file's name as stats report it: relative to a directory source, else its base name."""
        if self.source.directory is not None:
            return os.path.relpath(url, self.source.directory)
        return os.path.basename(url)

    # iterating, in each consumer
    def _fresh_iteration(self, epoch: int, slot: Slot, snapshot: Snapshot) -> _Iteration:
        assignment = split(snapshot, seed=self.seed, epoch=epoch, slot=slot, shuffle=self.shardshuffle,
                           partial=self.partial)
        return _Iteration(Consumer(slot, epoch, snapshot.id), snapshot, assignment, ReadStats(), Cursor())

    def _samples(self, it: _Iteration):
        slot = it.consumer.slot
        # padding keeps ranks equal; a single rank has nothing to keep equal with. Objects are read
        # through the stores of this consumer's own copy of the source.
        options = replace(self.options, equalize=self.options.equalize and slot.world_size > 1,
                          store_for=self.source.store_for)
        try:
            if it.shuffle:
                yield from read_positions(it.snapshot, [tuple(p) for p in it.shuffle["buffer"]], options)
            yield from read_assignment(it.snapshot, it.assignment, options, it.stats, it.cursor)
        finally:
            record = it.stats.as_dict() | {"left_out": it.assignment.left_out, "rank": slot.rank,
                                           "worker": slot.worker}
            self.statedir.write_stats(it.consumer.epoch, slot.rank, slot.worker, record)
            log.debug("epoch %d rank %d worker %d: %s", it.consumer.epoch, slot.rank, slot.worker, record)

    def last_position(self) -> tuple[int, int] | None:
        """(shard index in the snapshot, sample index) of the sample this consumer yielded last;
        None for a sample repeated to keep ranks equal. Asked by a .shuffle() buffer."""
        it = self._live
        piece, offset = it.cursor.position(it.stats)
        if piece >= len(it.assignment.pieces) or offset < 1:
            return None
        p = it.assignment.pieces[piece]
        return p.shard, p.start + offset - 1

    # checkpoint and resume (the format and its guarantees: resume.py)
    def fingerprint(self) -> dict:
        return resuming.fingerprint(self.source.describe(), self.seed, self.shardshuffle, self.partial)

    def _state_before_any_epoch(self) -> dict:
        return resuming.make_state(self.fingerprint(), None, None, 1, 1, [])

    def _state_of(self, it: _Iteration, shuffle: dict | None) -> dict:
        slot = it.consumer.slot
        carry = slot.worker == 0  # one consumer per rank carries the snapshot; the others name it
        if self._snapshot_doc is None or (self._snapshot_doc["id"], "count" in self._snapshot_doc) != (
                it.snapshot.id, carry):
            self._snapshot_doc = resuming.snapshot_doc(it.snapshot, carry)  # cached: the same object each step
        piece, offset = it.cursor.position(it.stats)
        position = resuming.SavedPosition(
            slot.rank, slot.worker, piece, offset, it.stats.as_dict(),
            it.assignment.pieces if it.explicit else None, shuffle,
        )
        return resuming.make_state(self.fingerprint(), it.consumer.epoch, self._snapshot_doc, slot.world_size,
                                   slot.num_workers, [position.as_dict()])

    def _merge(self, states: Any) -> dict:
        return resuming.merge(states)

    def _parse(self, state: dict) -> resuming.ResumeState | None:
        return resuming.parse(state, self.fingerprint(), self._published_snapshot)

    def _saved_snapshot(self, resume: resuming.ResumeState) -> Snapshot:
        return replace(resume.snapshot, epoch=resume.epoch)

    def _saved_split(self, resume: resuming.ResumeState):
        """The split of the saved epoch, for a slot of the saved layout."""
        def assignment_of(saved: Slot) -> Assignment:
            return split(resume.snapshot, seed=self.seed, epoch=resume.epoch, slot=saved, shuffle=self.shardshuffle,
                         partial=self.partial, order=resume.order)

        return assignment_of

    def _resumed_iteration(self, resume: resuming.ResumeState, epoch: int, slot: Slot) -> _Iteration:
        start = resuming.restart(resume, self._saved_split(resume), slot, partial=self.partial)
        stats = resuming.read_stats(start.stats, ReadStats)
        log.info("epoch %d rank %d worker %d: resuming at piece %d, sample %d of %d pieces", epoch, slot.rank,
                 slot.worker, start.piece, start.offset, len(start.assignment.pieces))
        return _Iteration(Consumer(slot, epoch, resume.snapshot.id), resume.snapshot, start.assignment, stats,
                          Cursor(start.piece, start.offset), start.explicit, start.shuffle)

"""RefreshingWebDataset: a webdataset pipeline whose shard list is re-resolved every epoch."""

from __future__ import annotations

import logging
import os
import random
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import webdataset as wds
from webdataset.filters import _shuffle
from webdataset.handlers import reraise_exception

from .epochs import EpochState, broadcast_from_rank0, consumer_slot, dist_info, rank_and_world
from . import resume as resuming
from .reading import CHANGE_POLICIES, VERIFY_MODES, Cursor, ReadOptions, ReadStats, read_assignment
from .snapshot import Resolver, Snapshot
from .sources import DirectorySource, ShardSource, make_source
from .split import Assignment, epoch_seed, split
from .watch import DEFAULT_POLL, DirectoryIndex, resolve_waiting

log = logging.getLogger("wdsrefresh")


@dataclass(frozen=True)
class Consumer:
    """Who is reading, and which epoch: one (rank, worker) pair."""

    epoch: int
    snapshot_id: str
    rank: int
    world_size: int
    worker: int
    num_workers: int


@dataclass
class _Plan:
    """One consumer's iteration: fixed when its iterator is created, current while it runs."""

    consumer: Consumer
    snapshot: Snapshot
    assignment: Assignment
    stats: ReadStats
    cursor: Cursor
    explicit: bool = False  # pieces redistributed at a resume, not the split's own


@dataclass(frozen=True)
class EpochStats:
    """What one epoch read, on this node: from the snapshot and from every consumer's counters.

    ``replaced``, ``deleted`` and ``corrupt`` count shards; the others count samples.
    """

    epoch: int
    snapshot_id: str
    shards: int
    samples: int
    added: int
    removed: int
    left_out: int
    yielded: int
    replaced: int
    deleted: int
    corrupt: int
    skipped: int
    padded: int
    consumers: int


class EpochSource:
    """The first pipeline stage: at each iteration, the samples of this consumer's share of an epoch."""

    def __init__(self, source: Any, *, shardshuffle: bool, seed: int, options: ReadOptions,
                 partial: bool, state_dir: str | None, watch: bool = False, poll: bool | float = False,
                 min_shards: int = 0, timeout: float | None = None):
        self.source: ShardSource = make_source(source)
        self.shardshuffle = bool(shardshuffle)
        self.seed = seed
        self.options = options
        self.partial = partial
        self.state = EpochState(state_dir)
        rank, world_size = dist_info()
        self.state.set_control(0, rank, world_size, bump=False)
        self.current: Consumer | None = None
        self._resolver: Resolver | None = None
        # checkpoint/resume (resume.py): the prepared and the running iteration, a loaded state
        self._plan: _Plan | None = None
        self._live: _Plan | None = None
        self._pending: tuple[resuming.ResumeState, int, dict] | None = None
        self._loads = 0
        self._snapshot_doc: dict | None = None
        # watch: a DirectoryIndex in this process only (never in DataLoader workers), made lazily
        self.watch, self.poll, self.min_shards, self.timeout = watch, poll, min_shards, timeout
        self._index: DirectoryIndex | None = None
        self._owner_pid = os.getpid()
        weakref.finalize(self, self.state.cleanup)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_resolver"] = None
        state["_index"] = None
        state["_plan"] = state["_live"] = state["_snapshot_doc"] = None
        return state

    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(self.source, with_digest=self.options.verify != "off",
                                      handler=self.options.handler)
        return self._resolver

    def index(self) -> DirectoryIndex | None:
        """The watched index of the source, in the process that built the dataset (None elsewhere)."""
        if not self.watch or os.getpid() != self._owner_pid or not isinstance(self.source, DirectorySource):
            return None
        if self._index is None:
            self._index = DirectoryIndex(self.source, with_digest=self.options.verify != "off",
                                         handler=self.options.handler, poll=self.poll)
        return self._index

    def resolve(self, epoch: int, previous: Snapshot | None = None) -> Snapshot:
        index = self.index()
        if index is None:
            resolver = self.resolver()
            resolver.remember(previous)
        once = (lambda: index.snapshot(epoch)) if index is not None else (lambda: resolver.resolve(epoch))
        snapshot = resolve_waiting(once, describe=self.source.describe(), min_shards=self.min_shards,
                                   timeout=self.timeout, index=index,
                                   poll=float(self.poll) if self.poll and self.poll is not True else DEFAULT_POLL)
        log.info("%s", snapshot.describe(previous))
        return snapshot

    def close(self) -> None:
        """Stops the directory watcher this process started, if any."""
        index, self._index = self._index, None
        if index is not None and os.getpid() == self._owner_pid:
            index.close()

    def set_epoch(self, epoch: int) -> Snapshot:
        if self._pending is not None and self._pending[0].epoch == epoch:
            return self._publish_resumed(self._pending[0], self._pending[2], force=True)
        rank, world_size = dist_info()
        previous = self.state.latest(before=epoch)
        if world_size > 1:
            snapshot = broadcast_from_rank0(lambda: self.resolve(epoch, previous))
        else:
            snapshot = self.resolve(epoch, previous)
        with self.state.lock():
            self.state.publish(snapshot)
            self.state.set_control(epoch, rank, world_size)
        return snapshot

    def _snapshot_for(self, epoch: int, world_size: int) -> Snapshot:
        snapshot = self.state.load(epoch)
        if snapshot is not None:
            return snapshot
        if world_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"no snapshot published for epoch {epoch}: under torch.distributed call "
                f"ds.set_epoch(epoch) in every rank before each epoch, so all ranks read the same shards"
            )
        return self.state.get_or_resolve(epoch, lambda previous: self.resolve(epoch, previous))

    def prepare(self) -> None:
        """Fixes this consumer's next iteration (epoch, snapshot, share) when its iterator is made."""
        self._plan = self._next_plan()

    def __call__(self):
        plan, self._plan = self._plan, None
        if plan is None:
            plan = self._next_plan()
        self._live = plan
        self.current = plan.consumer
        return self._samples(plan.snapshot, plan.assignment, plan.consumer, plan)

    def _next_plan(self) -> _Plan:
        worker, num_workers = consumer_slot()
        epoch, control = self.state.next_epoch_for(worker, num_workers)
        rank, world_size = rank_and_world(control)
        resumed = self._resumed_plan(epoch, control["generation"], rank, world_size, worker, num_workers)
        if resumed is not None:
            return resumed
        snapshot = self._snapshot_for(epoch, world_size)
        assignment = split(
            snapshot, seed=self.seed, epoch=epoch, rank=rank, world_size=world_size,
            worker=worker, num_workers=num_workers, shuffle=self.shardshuffle, partial=self.partial,
        )
        consumer = Consumer(epoch, snapshot.id, rank, world_size, worker, num_workers)
        return _Plan(consumer, snapshot, assignment, ReadStats(), Cursor())

    def _samples(self, snapshot, assignment, consumer: Consumer, plan: _Plan | None = None):
        stats = plan.stats if plan is not None else ReadStats()
        # padding keeps ranks equal; a single rank has nothing to keep equal with
        options = replace(self.options, equalize=self.options.equalize and consumer.world_size > 1)
        try:
            yield from read_assignment(snapshot, assignment, options, stats, plan.cursor if plan else None)
        finally:
            record = stats.as_dict() | {"left_out": assignment.left_out, "rank": consumer.rank,
                                        "worker": consumer.worker}
            self.state.write_stats(consumer.epoch, consumer.rank, consumer.worker, record)
            log.debug("epoch %d rank %d worker %d: %s", consumer.epoch, consumer.rank, consumer.worker, record)


    # checkpoint and resume (the format and its guarantees: resume.py)
    def identity(self) -> dict:
        return resuming.identity(self.source.describe(), self.seed, self.shardshuffle, self.partial)

    def state_dict(self) -> dict:
        """This consumer's position in its epoch, as plain values (see resume.py)."""
        if self._plan is None and self._live is None and self._pending is not None:
            return self._pending[2]
        plan = self._plan or self._live
        if plan is None:
            return resuming.make_state(self.identity(), None, None, 1, 1, [])
        c = plan.consumer
        if self._snapshot_doc is None or self._snapshot_doc["id"] != plan.snapshot.id:
            self._snapshot_doc = resuming.snapshot_doc(plan.snapshot)
        piece, offset = plan.cursor.position(plan.stats)
        consumer = resuming.ConsumerState(
            c.rank, c.worker, piece, offset, plan.stats.as_dict(),
            plan.assignment.pieces if plan.explicit else None,
        )
        return resuming.make_state(self.identity(), c.epoch, self._snapshot_doc, c.world_size, c.num_workers,
                                   [consumer.as_dict()])

    def load_state_dict(self, state: dict) -> None:
        """Makes the next iteration resume the saved epoch where ``state`` left it."""
        resume = resuming.parse(state, self.identity())
        self._plan = self._live = None
        if resume is None:
            self._pending = None
            return
        self._publish_resumed(resume, state, force=self._loads > 0)
        self._loads += 1

    def _publish_resumed(self, resume: resuming.ResumeState, state: dict, force: bool) -> Snapshot:
        """Publishes the saved snapshot as its epoch's and makes that epoch the next one iterated."""
        snapshot = replace(resume.snapshot, epoch=resume.epoch)
        with self.state.lock():
            published = self.state.load(resume.epoch)
            if published is None or published.id != snapshot.id:
                self.state.publish(snapshot)
            generation = resuming.restart_epoch(self.state, resume, force)
        self._pending = (resume, generation, state)
        return snapshot

    def _resumed_plan(self, epoch: int, generation: int, rank: int, world_size: int, worker: int,
                      num_workers: int) -> _Plan | None:
        pending, self._pending = self._pending, None
        if pending is None or pending[1] != generation or pending[0].epoch != epoch:
            return None
        resume = pending[0]

        def assignment_of(r: int, w: int) -> Assignment:
            return split(resume.snapshot, seed=self.seed, epoch=epoch, rank=r, world_size=resume.world_size,
                         worker=w, num_workers=resume.num_workers, shuffle=self.shardshuffle, partial=self.partial)

        start = resuming.restart(resume, assignment_of, rank=rank, world_size=world_size, worker=worker,
                                 num_workers=num_workers, partial=self.partial)
        stats = resuming.read_stats(start.stats, ReadStats)
        consumer = Consumer(epoch, resume.snapshot.id, rank, world_size, worker, num_workers)
        log.info("epoch %d rank %d worker %d: resuming at piece %d, sample %d of %d pieces", epoch, rank, worker,
                 start.piece, start.offset, len(start.assignment.pieces))
        return _Plan(consumer, resume.snapshot, start.assignment, stats, Cursor(start.piece, start.offset),
                     start.explicit)


class _EpochShuffle:
    """A sample shuffle buffer seeded by (seed, epoch, rank, worker): reproducible, new each epoch."""

    def __init__(self, epochs: EpochSource, bufsize: int, initial: int):
        self.epochs = epochs
        self.bufsize = bufsize
        self.initial = initial

    def __call__(self, data):
        c = self.epochs.current
        rng = random.Random(epoch_seed(c.snapshot_id, self.epochs.seed, c.epoch, c.rank, c.worker, self.bufsize))
        return _shuffle(data, self.bufsize, self.initial, rng=rng)


class RefreshingWebDataset(wds.DataPipeline, wds.FluidInterface):
    """A streaming WebDataset whose shards are re-resolved from ``source`` at every epoch.

    Guarantees, for each epoch: every DataLoader worker of every rank reads the same snapshot;
    every sample of the snapshot is yielded exactly once across ranks x workers (less at most
    ``world_size - 1`` left out, unless ``partial=True``); every rank yields the same number of
    samples; shard order is a pure function of (snapshot, seed, epoch). Samples are
    webdataset dicts, so ``.decode()``, ``.to_tuple()``, ``.batched()`` work as usual.
    """

    def __init__(
        self,
        source: Any,
        *,
        shardshuffle: bool = True,
        seed: int = 0,
        verify: str = "inline",
        on_change: str = "reload",
        handler: Callable[[BaseException], bool] = reraise_exception,
        watch: bool = True,
        mode: str = "epoch",
        partial: bool = False,
        equalize: bool = True,
        state_dir: str | None = None,
        min_shards: int = 0,
        timeout: float | None = None,
        poll: bool | float = False,
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}: expected one of {VERIFY_MODES}")
        if on_change not in CHANGE_POLICIES:
            raise ValueError(f"on_change={on_change!r}: expected one of {CHANGE_POLICIES}")
        if mode not in ("epoch", "stream"):
            raise ValueError(f"mode={mode!r}: expected 'epoch' or 'stream'")
        options = ReadOptions(verify=verify, on_change=on_change, handler=handler, equalize=equalize)
        self.mode = mode
        if mode == "stream":  # a StreamSource stands in for the EpochSource (same current/seed/close)
            from .stream import StreamSource

            self.epochs = StreamSource(source, options=options, state_dir=state_dir, poll=poll, seed=seed)
        else:
            self.epochs = EpochSource(source, shardshuffle=shardshuffle, seed=seed, options=options,
                                      partial=partial, state_dir=state_dir, watch=watch, poll=poll,
                                      min_shards=min_shards, timeout=timeout)
        self.watch = watch
        super().__init__(self.epochs)

    def close(self) -> None:
        """Epoch mode: stops the directory watcher. Stream mode: ends the stream in every consumer."""
        self.epochs.close()

    def set_epoch(self, epoch: int) -> Snapshot:
        """Resolves the snapshot for ``epoch`` and makes it the one every consumer reads next.

        Under torch.distributed, call it in every rank (rank 0's snapshot is broadcast).
        Without it, each iteration advances the epoch by one.
        """
        return self.epochs.set_epoch(epoch)

    def __iter__(self):
        if isinstance(self.epochs, EpochSource):
            self.epochs.prepare()  # a checkpoint taken before the first sample knows its epoch
        return super().__iter__()

    def state_dict(self) -> dict:
        """This consumer's position in the current epoch, as a versioned dict of plain values.

        torchdata's StatefulDataLoader calls it in each worker (on the main-process dataset when
        num_workers=0). Positions count samples that left the source stage, so a ``.shuffle()``
        buffer (samples read but not yet delivered) makes an exact checkpoint impossible and
        raises. Format and guarantees: ``wdsrefresh.resume``.
        """
        if not isinstance(self.epochs, EpochSource):
            raise NotImplementedError(f"state_dict(): mode={self.mode!r} has no checkpoint; use mode='epoch'")
        if any(isinstance(stage, _EpochShuffle) for stage in self.pipeline):
            raise RuntimeError(
                "state_dict(): this pipeline has a .shuffle() buffer, whose samples were read but not yet "
                "delivered; a checkpoint would lose them. Shuffle shards (shardshuffle=True) instead"
            )
        return self.epochs.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resumes from ``state`` at the next iteration: the saved epoch, its saved snapshot, each
        consumer's saved position; the epoch after it resolves a fresh snapshot.

        ``state`` is one consumer's (as StatefulDataLoader passes it to each worker) or a
        ``wdsrefresh.resume.merge()`` of several, which also resumes with a different
        num_workers or world size. Raises ``wdsrefresh.resume.ResumeError`` for a state of another
        dataset or a corrupted one.
        """
        if not isinstance(self.epochs, EpochSource):
            raise NotImplementedError(f"load_state_dict(): mode={self.mode!r} has no checkpoint; use mode='epoch'")
        self.epochs.load_state_dict(state)

    def snapshot(self, epoch: int | None = None) -> Snapshot | None:
        """The published snapshot of ``epoch`` (default: the latest)."""
        return self.epochs.state.latest() if epoch is None else self.epochs.state.load(epoch)

    def stats(self, epoch: int | None = None) -> EpochStats:
        """Per-epoch statistics on this node (default: the latest published epoch).

        In stream mode: a ``StreamStats`` (shards, samples, drop-to-first-sample latencies).
        """
        if self.mode == "stream":
            return self.epochs.stats()
        state = self.epochs.state
        snap = self.snapshot(epoch)
        if snap is None:
            raise LookupError(f"no snapshot published for epoch {epoch}")
        added, removed = snap.diff(state.latest(before=snap.epoch))
        records = state.read_stats(snap.epoch)
        total = lambda key: sum(r.get(key, 0) for r in records)  # noqa: E731
        shards = lambda key: len(set().union(*(r.get(key, ()) for r in records)))  # noqa: E731
        left_out = max((r.get("left_out", 0) for r in records), default=0)
        return EpochStats(
            epoch=snap.epoch, snapshot_id=snap.id, shards=len(snap.shards), samples=snap.nsamples,
            added=len(added), removed=len(removed), left_out=left_out, yielded=total("yielded"),
            replaced=shards("replaced"), deleted=shards("deleted"), corrupt=shards("corrupt"),
            skipped=total("skipped"), padded=total("padded"), consumers=len(records),
        )

    def shuffle(self, size: int, initial: int = 100, **kw):
        """A sample shuffle buffer seeded per (seed, epoch, rank, worker)."""
        if size < 1:
            return self
        return self.compose(_EpochShuffle(self.epochs, size, min(initial, size)))

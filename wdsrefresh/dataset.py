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

from .epochs import EpochState, broadcast_from_rank0, dist_info
from .reading import CHANGE_POLICIES, VERIFY_MODES, ReadOptions, ReadStats, read_assignment
from .snapshot import Resolver, Snapshot
from .sources import ShardSource, make_source
from .split import epoch_seed, split

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


def _worker() -> tuple[int, int]:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class EpochSource:
    """The first pipeline stage: at each iteration, the samples of this consumer's share of an epoch."""

    def __init__(self, source: Any, *, shardshuffle: bool, seed: int, options: ReadOptions,
                 partial: bool, state_dir: str | None):
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
        weakref.finalize(self, self.state.cleanup)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_resolver"] = None
        return state

    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(self.source, with_digest=self.options.verify != "off",
                                      handler=self.options.handler)
        return self._resolver

    def resolve(self, epoch: int, previous: Snapshot | None = None) -> Snapshot:
        resolver = self.resolver()
        resolver.remember(previous)
        snapshot = resolver.resolve(epoch)
        log.info("%s", snapshot.describe(previous))
        return snapshot

    def set_epoch(self, epoch: int) -> Snapshot:
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

    def __call__(self):
        worker, num_workers = _worker()
        epoch, control = self.state.next_epoch_for(worker, num_workers)
        rank, world_size = control["rank"], control["world_size"]
        if num_workers == 1 and worker == 0:
            rank, world_size = dist_info() if dist_info()[1] > 1 else (rank, world_size)
        snapshot = self._snapshot_for(epoch, world_size)
        assignment = split(
            snapshot, seed=self.seed, epoch=epoch, rank=rank, world_size=world_size,
            worker=worker, num_workers=num_workers, shuffle=self.shardshuffle, partial=self.partial,
        )
        self.current = Consumer(epoch, snapshot.id, rank, world_size, worker, num_workers)
        return self._samples(snapshot, assignment, self.current)

    def _samples(self, snapshot, assignment, consumer: Consumer):
        stats = ReadStats()
        # padding keeps ranks equal; a single rank has nothing to keep equal with
        options = replace(self.options, equalize=self.options.equalize and consumer.world_size > 1)
        try:
            yield from read_assignment(snapshot, assignment, options, stats)
        finally:
            record = stats.as_dict() | {"left_out": assignment.left_out, "rank": consumer.rank,
                                        "worker": consumer.worker}
            self.state.write_stats(consumer.epoch, consumer.rank, consumer.worker, record)
            log.debug("epoch %d rank %d worker %d: %s", consumer.epoch, consumer.rank, consumer.worker, record)


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
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}: expected one of {VERIFY_MODES}")
        if on_change not in CHANGE_POLICIES:
            raise ValueError(f"on_change={on_change!r}: expected one of {CHANGE_POLICIES}")
        if mode not in ("epoch",):
            raise ValueError(f"mode={mode!r}: expected 'epoch'")
        options = ReadOptions(verify=verify, on_change=on_change, handler=handler, equalize=equalize)
        self.epochs = EpochSource(source, shardshuffle=shardshuffle, seed=seed, options=options,
                                  partial=partial, state_dir=state_dir)
        self.watch = watch
        super().__init__(self.epochs)

    def set_epoch(self, epoch: int) -> Snapshot:
        """Resolves the snapshot for ``epoch`` and makes it the one every consumer reads next.

        Under torch.distributed, call it in every rank (rank 0's snapshot is broadcast).
        Without it, each iteration advances the epoch by one.
        """
        return self.epochs.set_epoch(epoch)

    def snapshot(self, epoch: int | None = None) -> Snapshot | None:
        """The published snapshot of ``epoch`` (default: the latest)."""
        return self.epochs.state.latest() if epoch is None else self.epochs.state.load(epoch)

    def stats(self, epoch: int | None = None) -> EpochStats:
        """Per-epoch statistics on this node (default: the latest published epoch)."""
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

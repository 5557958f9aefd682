"""Deterministic shard order and the exact, equal split of an epoch's samples.

The shards of a snapshot are put in an order that is a pure function of (snapshot id, seed,
epoch); their samples, concatenated in that order, form one sequence. Unless ``partial``,
the last ``total % world_size`` samples of the sequence are left out (they rotate with the
order), and every rank gets an equal contiguous range; each rank's range is divided among its
DataLoader workers (equal to within one sample, identically on every rank, so batch counts
agree too). A range may start and end inside a shard.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy
import numpy.random  # imported here, in the main process, and not at a worker's first epoch

from .slot import Slot
from ..core.snapshot import LazySequence, Snapshot

# How shard_order permutes: 2 = numpy's legacy MT19937 RandomState (frozen by numpy: the same in
# every numpy release), about 100x faster than 1 = random.shuffle, which version 2 checkpoints used.
ORDER = 2
ORDERS = (1, 2)


class Piece(NamedTuple):
    """Samples ``start <= i < stop`` of the shard at ``shard`` in the snapshot's list."""

    shard: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


class Pieces(LazySequence):
    """A consumer's pieces as three columns, each ``Piece`` made when asked for: a share of 100k
    shards costs no 50k objects at the epoch's start."""

    def __init__(self, shards, starts, stops):
        self.shards, self.starts, self.stops = shards, starts, stops

    def __len__(self) -> int:
        return len(self.shards)

    def _item(self, index: int) -> Piece:
        return Piece(int(self.shards[index]), int(self.starts[index]), int(self.stops[index]))

    def total(self) -> int:
        return int((self.stops - self.starts).sum())

    def __repr__(self) -> str:
        return f"Pieces({list(self)!r:.200})"


@dataclass(frozen=True)
class Assignment:
    """What one consumer reads in one epoch."""

    slot: Slot
    pieces: Sequence[Piece]  # a tuple, or Pieces
    left_out: int

    @property
    def quota(self) -> int:
        if isinstance(self.pieces, Pieces):
            return self.pieces.total()
        return sum(p.count for p in self.pieces)


def epoch_seed(snapshot_id: str, seed: int, epoch: int, *more: int) -> int:
    """A 64-bit seed from the given values, the same in every process and Python version."""
    text = ":".join(str(v) for v in (snapshot_id, seed, epoch, *more))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def shard_order(snapshot: Snapshot, seed: int, epoch: int, shuffle: bool = True, order: int = ORDER) -> list[int]:
    """Indexes into ``snapshot.shards`` in the order this epoch reads them (``order``: see ORDER)."""
    return _order(snapshot, seed, epoch, shuffle, order).tolist()


def _order(snapshot: Snapshot, seed: int, epoch: int, shuffle: bool, order: int):
    n = len(snapshot.shards)
    if not shuffle:
        return numpy.arange(n, dtype=numpy.int64)
    key = epoch_seed(snapshot.id, seed, epoch)
    if order == 1:
        indexes = list(range(n))
        random.Random(key).shuffle(indexes)
        return numpy.array(indexes, dtype=numpy.int64)
    words = numpy.array([key & 0xFFFFFFFF, key >> 32], dtype=numpy.uint32)
    return numpy.random.RandomState(words).permutation(n).astype(numpy.int64)


def _sample_counts(snapshot: Snapshot):
    column = getattr(snapshot.shards, "sample_count_array", None)
    return column() if column is not None else numpy.array(snapshot.sample_counts(), dtype=numpy.int64)


def even_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering [0, total), sizes differing by at most one."""
    base, extra = divmod(total, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def split(
    snapshot: Snapshot,
    *,
    seed: int,
    epoch: int,
    slot: Slot,
    shuffle: bool = True,
    partial: bool = False,
    order: int = ORDER,
) -> Assignment:
    """The pieces ``slot`` reads in ``epoch``; see the module docstring."""
    indexes = _order(snapshot, seed, epoch, shuffle, order)
    counts = _sample_counts(snapshot)[indexes]
    offsets = numpy.concatenate(([0], numpy.cumsum(counts)))
    total = int(offsets[-1])
    dropped = left_out(total, slot.world_size, partial)
    lo, hi = slot_range(total - dropped, slot)
    return Assignment(slot, _pieces(indexes, offsets, lo, hi), dropped)


def left_out(total: int, world_size: int, partial: bool) -> int:
    """How many of an epoch's ``total`` samples no rank reads: the last ``total % world_size``,
    so that every rank reads as many; none under ``partial`` (ranks may then differ by one).
    The one owner of this rule: the split, the stats and a resume on another world all ask it."""
    return 0 if partial else total % world_size


def rank_quota(total: int, rank: int, world_size: int, partial: bool) -> tuple[int, int]:
    """(samples rank ``rank`` yields, samples no rank reads) of an epoch of ``total`` samples."""
    dropped = left_out(total, world_size, partial)
    lo, hi = even_ranges(total - dropped, world_size)[rank]
    return hi - lo, dropped


def worker_shares(samples: int, num_workers: int) -> list[int]:
    """The samples each of a rank's ``num_workers`` consumers (0: one) reads of the rank's ``samples``."""
    return [hi - lo for lo, hi in even_ranges(samples, max(1, num_workers))]


def slot_range(total: int, slot: Slot) -> tuple[int, int]:
    """The positions [lo, hi) of ``total`` that ``slot`` reads: equal per rank, then per worker."""
    rank_start, rank_stop = even_ranges(total, slot.world_size)[slot.rank]
    lo, hi = even_ranges(rank_stop - rank_start, slot.num_workers)[slot.worker]
    return rank_start + lo, rank_start + hi


def _pieces(order, offsets, start: int, stop: int) -> Pieces:
    """The pieces covering positions [start, stop) of the concatenated sample sequence, whose
    k-th shard (``order[k]``) holds positions ``offsets[k] <= i < offsets[k + 1]``."""
    if start >= stop:
        return Pieces(order[:0], order[:0], order[:0])
    first = int(numpy.searchsorted(offsets, start, side="right")) - 1
    last = int(numpy.searchsorted(offsets, stop, side="left"))  # the shards [first, last) overlap
    base = offsets[first:last]
    starts = numpy.maximum(base, start) - base
    stops = numpy.minimum(offsets[first + 1:last + 1], stop) - base
    keep = stops > starts  # empty shards hold no piece
    return Pieces(order[first:last][keep], starts[keep], stops[keep])

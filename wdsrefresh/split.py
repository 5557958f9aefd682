"""Deterministic shard order and the exact, equal split of an epoch's samples.

The shards of a snapshot are put in an order that is a pure function of (snapshot id, seed,
epoch); their samples, concatenated in that order, form one sequence. Unless ``partial``,
the last ``total % world_size`` samples of the sequence are left out (they rotate with the
order), and every rank gets an equal contiguous range; each rank's range is divided among its
DataLoader workers (equal to within one sample, identically on every rank, so batch counts
agree too). A range may start and end inside a shard.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass

from .slot import Slot
from .snapshot import Snapshot


@dataclass(frozen=True)
class Piece:
    """Samples ``start <= i < stop`` of the shard at ``shard`` in the snapshot's list."""

    shard: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Assignment:
    """What one consumer reads in one epoch."""

    slot: Slot
    pieces: tuple[Piece, ...]
    left_out: int

    @property
    def quota(self) -> int:
        return sum(p.count for p in self.pieces)


def epoch_seed(snapshot_id: str, seed: int, epoch: int, *more: int) -> int:
    """A 64-bit seed from the given values, the same in every process and Python version."""
    text = ":".join(str(v) for v in (snapshot_id, seed, epoch, *more))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def shard_order(snapshot: Snapshot, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Indexes into ``snapshot.shards`` in the order this epoch reads them."""
    order = list(range(len(snapshot.shards)))
    if shuffle:
        random.Random(epoch_seed(snapshot.id, seed, epoch)).shuffle(order)
    return order


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
) -> Assignment:
    """The pieces ``slot`` reads in ``epoch``; see the module docstring."""
    order = shard_order(snapshot, seed, epoch, shuffle)
    counts = [snapshot.shards[i].nsamples or 0 for i in order]
    total = sum(counts)
    left_out = 0 if partial else total % slot.world_size
    lo, hi = slot_range(total - left_out, slot)
    return Assignment(slot, _pieces(order, counts, lo, hi), left_out)


def slot_range(total: int, slot: Slot) -> tuple[int, int]:
    """The positions [lo, hi) of ``total`` that ``slot`` reads: equal per rank, then per worker."""
    rank_start, rank_stop = even_ranges(total, slot.world_size)[slot.rank]
    lo, hi = even_ranges(rank_stop - rank_start, slot.num_workers)[slot.worker]
    return rank_start + lo, rank_start + hi


def _pieces(order: list[int], counts: list[int], start: int, stop: int) -> tuple[Piece, ...]:
    """The pieces covering positions [start, stop) of the concatenated sample sequence."""
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    pieces = []
    k = bisect.bisect_right(offsets, start) - 1
    while start < stop and k < len(order):
        shard_start, shard_stop = offsets[k], offsets[k + 1]
        lo, hi = max(start, shard_start), min(stop, shard_stop)
        if hi > lo:
            pieces.append(Piece(order[k], lo - shard_start, hi - shard_start))
        start = max(start, shard_stop)
        k += 1
    return tuple(pieces)

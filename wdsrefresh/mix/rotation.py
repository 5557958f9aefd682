"""Which samples of a source an epoch of a mix reads: the rotation across epochs.

A source holding more samples than its count for the epoch gives a subset, and the subset
rotates: samples never read come first, newest shards first (fresh data is read at once, not
when its turn comes), then the least recently read; every sample of the source is read once
before any is read twice. A source holding fewer samples is read whole as many times as fit,
then the rest by the same rule, so no sample is read more than ceil(count / size) times.

The rotation's state is per shard, never per sample: a shard's samples are read in order, so
what one shard has given in the current cycle is a count (``done``: its first ``done`` samples),
plus when it was last read (``last``: the source's read counter then; -1 never). A shard is known
by its name below the source's root and a token of its content (digest, else ETag, else size and
mtime), so a replaced shard is a new one, unread. Shards that left the source's snapshot leave the
state: its size is bounded by the source's current shards, about 25 bytes plus the name each.
The cycle wraps when every sample of the snapshot was read in it.

Everything here is a pure function of (snapshot, state, count, seed, epoch): rank 0 computes it
and every rank receives the result with the epoch's MixSnapshot.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy
import numpy.random

from ..core.snapshot import ShardInfo, Snapshot
from ..core.columns import pack_int64, unpack_int64
from ..epoch.split import Piece, epoch_seed

_SEPARATOR = "\0"


@dataclass(frozen=True)
class Mark:
    """What one shard gave in the current cycle (its first ``done`` samples), and when last read."""

    token: str
    done: int = 0
    last: int = -1


@dataclass(frozen=True)
class Rotation:
    """A source's rotation state: the cycle number (wraps so far), its read counter, each shard's mark."""

    cycle: int = 0
    reads: int = 0
    marks: dict[str, Mark] = field(default_factory=dict)

    def progress(self, size: int) -> float:
        """The fraction of the source's ``size`` samples read in the current cycle."""
        return sum(m.done for m in self.marks.values()) / size if size else 0.0

    def to_doc(self) -> dict:
        """Plain values: names and tokens joined, marks as packed int64 columns."""
        names = list(self.marks)
        return {"cycle": self.cycle, "reads": self.reads, "names": _SEPARATOR.join(names),
                "tokens": _SEPARATOR.join(self.marks[n].token for n in names),
                "done": pack_int64(self.marks[n].done for n in names),
                "last": pack_int64(self.marks[n].last for n in names)}

    @classmethod
    def from_doc(cls, doc: object, where: str = "rotation") -> Rotation:
        """The rotation ``to_doc`` gave; ValueError naming ``where`` and the field when malformed."""
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: expected a dict, got {type(doc).__name__}")
        try:
            names = doc["names"].split(_SEPARATOR) if doc["names"] else []
            tokens = doc["tokens"].split(_SEPARATOR) if names else []
            done = unpack_int64(doc["done"], len(names), f"{where}.done")
            last = unpack_int64(doc["last"], len(names), f"{where}.last")
            cycle, reads = int(doc["cycle"]), int(doc["reads"])
        except (KeyError, TypeError, AttributeError, ValueError) as exn:
            raise ValueError(f"{where}: malformed ({type(exn).__name__}: {exn})") from None
        if len(tokens) != len(names):
            raise ValueError(f"{where}: {len(tokens)} tokens for {len(names)} shards")
        return cls(cycle, reads, {n: Mark(t, d, l) for n, t, d, l in zip(names, tokens, done, last)})


def shard_token(shard: ShardInfo) -> str:
    """What tells two contents of one shard name apart (16 hex digits): the tail of its content
    digest, else a hash of its ETag, else of its size, mtime and count."""
    if shard.digest:
        return shard.digest[-16:]
    content = shard.etag or f"{shard.size}:{shard.mtime_ns}:{shard.nsamples}"
    return hashlib.blake2b(content.encode(), digest_size=8).hexdigest()


def shard_keys(snapshot: Snapshot) -> list[str]:
    """Each shard's name in the rotation state: its name below the source's root (its url where
    two shards share a name)."""
    names = [s.name or os.path.basename(s.url) for s in snapshot.shards]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [n if seen[n] == 1 else s.url for n, s in zip(names, snapshot.shards)]


def select(snapshot: Snapshot, rotation: Rotation, count: int, *, seed: int, epoch: int, name: str,
           shuffle: bool = True) -> tuple[list[Piece], Rotation]:
    """The ``count`` samples ``snapshot`` gives this epoch, as pieces in reading order (a seeded
    order of the pieces when ``shuffle``, else the snapshot's), and the rotation after them."""
    keys = shard_keys(snapshot)
    sizes = [s.nsamples or 0 for s in snapshot.shards]
    total = sum(sizes)
    marks = []
    for key, shard, size in zip(keys, snapshot.shards, sizes):
        token = shard_token(shard)
        mark = rotation.marks.get(key)
        marks.append(Mark(token, min(mark.done, size), mark.last) if mark is not None and mark.token == token
                     else Mark(token))
    state = _State(snapshot, sizes, marks, rotation.cycle, rotation.reads + 1)
    pieces: list[Piece] = []
    if total and count:
        passes = count // total
        for n in range(min(passes, 2)):  # a whole pass leaves every shard's mark where it was, so from
            one = state.take(total)      # the second pass on each pass is the same and wraps once
            pieces += one
        if passes > 2:
            pieces += one * (passes - 2)
            state.cycle += passes - 2
        pieces += state.take(count % total)
    after = Rotation(state.cycle, state.reads if pieces else rotation.reads, dict(zip(keys, state.marks)))
    return _ordered(pieces, snapshot, seed, epoch, name, shuffle), after


class _State:
    """The marks as one epoch's selection moves them."""

    def __init__(self, snapshot: Snapshot, sizes: list[int], marks: list[Mark], cycle: int, reads: int):
        self.snapshot, self.sizes, self.marks = snapshot, sizes, marks
        self.cycle, self.reads = cycle, reads

    def take(self, count: int) -> list[Piece]:
        """``count`` samples (at most the snapshot's): the rest of the current cycle in priority
        order, then, once it is exhausted, a new cycle, never reaching samples taken in this call."""
        pieces: list[Piece] = []
        taken_from: dict[int, int] = {}  # shard -> where this call's piece of it started
        for j in self._priority(lambda j: self.marks[j].done < self.sizes[j]):
            if count == 0:
                break
            start = self.marks[j].done
            n = min(count, self.sizes[j] - start)
            pieces.append(Piece(j, start, start + n))
            taken_from[j] = start
            self.marks[j] = Mark(self.marks[j].token, start + n, self.reads)
            count -= n
        if count == 0:
            return pieces
        self.cycle += 1  # every sample was read in this cycle: the next one starts
        self.marks = [Mark(m.token, 0, m.last) for m in self.marks]
        untouched = [j for j in self._priority(lambda j: self.sizes[j] > 0) if j not in taken_from]
        for j in untouched + sorted(taken_from):
            if count == 0:
                break
            n = min(count, taken_from.get(j, self.sizes[j]))
            if n:
                pieces.append(Piece(j, 0, n))
                self.marks[j] = Mark(self.marks[j].token, n, self.reads)
                count -= n
        return pieces

    def _priority(self, eligible) -> list[int]:
        """Shards never read first, newest (mtime) first; then the least recently read."""
        shards, marks = self.snapshot.shards, self.marks
        keys = [(0, -shards[j].mtime_ns, j) if marks[j].last < 0 else (1, marks[j].last, j)
                for j in range(len(self.sizes)) if eligible(j)]
        return [j for _, _, j in sorted(keys)]


def _ordered(pieces: list[Piece], snapshot: Snapshot, seed: int, epoch: int, name: str,
             shuffle: bool) -> list[Piece]:
    if not shuffle:
        return sorted(pieces)
    key = epoch_seed(snapshot.id, seed, epoch, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))
    words = numpy.array([key & 0xFFFFFFFF, key >> 32], dtype=numpy.uint32)
    return [pieces[i] for i in numpy.random.RandomState(words).permutation(len(pieces))]

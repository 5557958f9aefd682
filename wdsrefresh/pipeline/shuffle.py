"""The sample shuffle buffer: reproducible per (seed, epoch, rank, worker), new each epoch,
and checkpointable: its state is the positions of the samples it holds, never their bytes.

The buffer works as webdataset's (the same order for the same rng). For a checkpoint it
notes where each buffered sample came from, (shard index in the snapshot, sample index),
asking the first stage as it takes each sample in; stages between the two must map one
sample to one sample. At a resume the first stage reads those samples again, first, and the
buffer takes them back without yielding, with the saved rng state: the resumed stream is
the uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..epoch.split import epoch_seed

Position = tuple[int, int]


class ShuffleRun:
    """One iteration of the buffer; ``checkpoint()`` while it is suspended at a yield."""

    def __init__(self, bufsize: int, initial: int, rng: random.Random, where=None):
        self.bufsize = bufsize
        self.initial = min(initial, bufsize)
        self.rng = rng
        self.where = where  # () -> Position of the sample the first stage yielded last
        self.buf: list = []
        self.positions: list[Position | None] = []

    def samples(self, data: Iterator, refill: list[Position] | None = None,
                rng_state: tuple | None = None) -> Iterator:
        if refill:
            for position, sample in zip(refill, data):  # the first stage re-reads them first
                self.buf.append(sample)
                self.positions.append(position)
        if rng_state is not None:
            self.rng.setstate(rng_state)
        for sample in data:
            self._take(sample)
            if len(self.buf) < self.bufsize:
                try:
                    self._take(next(data))
                except StopIteration:
                    pass
            if len(self.buf) >= self.initial:
                yield self._pick()
        while self.buf:
            yield self._pick()

    def _take(self, sample) -> None:
        self.buf.append(sample)
        self.positions.append(self.where() if self.where is not None else None)

    def _pick(self):
        k = self.rng.randint(0, len(self.buf) - 1)
        sample = self.buf[k]
        self.buf[k] = self.buf[-1]
        self.buf.pop()
        self.positions[k] = self.positions[-1]
        self.positions.pop()
        return sample

    def checkpoint(self) -> dict:
        if any(p is None for p in self.positions):
            raise RuntimeError("the .shuffle() buffer holds samples repeated to keep ranks equal (padding), "
                               "which cannot be re-read: checkpoint once the epoch has ended")
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "buffer": [list(p) for p in self.positions]}


class EpochShuffle:
    """A pipeline stage: the buffer with an rng seeded by (seed, epoch, rank, worker, size), taken
    from the consumer the first stage is serving; or the user's own ``rng`` (not checkpointable)."""

    def __init__(self, source, bufsize: int, initial: int, seed: int | None = None,
                 rng: random.Random | None = None):
        self.source = source
        self.bufsize = bufsize
        self.initial = initial
        self.seed = seed
        self.rng = rng
        self.live: ShuffleRun | None = None

    def __call__(self, data: Iterator) -> Iterator:
        run = ShuffleRun(self.bufsize, self.initial, self.rng or self._epoch_rng(), self.source.last_position)
        self.live = run
        refill, rng_state = self.source.shuffle_resume()
        return run.samples(data, refill, rng_state)

    def checkpoint(self) -> dict | None:
        if self.rng is not None:
            raise RuntimeError(".shuffle(rng=...) cannot be checkpointed: its rng is the caller's; "
                               "pass seed= instead")
        return self.live.checkpoint() if self.live is not None else None

    def _epoch_rng(self) -> random.Random:
        c = self.source.current
        seed = self.source.seed if self.seed is None else self.seed
        return random.Random(epoch_seed(c.snapshot_id, seed, c.epoch, c.slot.rank, c.slot.worker, self.bufsize))

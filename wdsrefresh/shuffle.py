"""The sample shuffle buffer: reproducible per (seed, epoch, rank, worker), new each epoch."""

from __future__ import annotations

import random
from collections.abc import Iterator

from .split import epoch_seed


def shuffled(data: Iterator[dict], bufsize: int, initial: int, rng: random.Random) -> Iterator[dict]:
    """webdataset's buffer shuffle (same order for the same ``rng``): fill to ``initial``, then
    yield a random buffered sample for each one taken in, keeping up to ``bufsize``."""
    initial = min(initial, bufsize)
    buf: list[dict] = []
    for sample in data:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(data))
            except StopIteration:
                pass
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list[dict], rng: random.Random) -> dict:
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


class EpochShuffle:
    """A pipeline stage: ``shuffled`` with an rng seeded by (seed, epoch, rank, worker, size),
    taken from the consumer the first stage is serving; or the user's own ``rng``."""

    def __init__(self, source, bufsize: int, initial: int, seed: int | None = None,
                 rng: random.Random | None = None):
        self.source = source
        self.bufsize = bufsize
        self.initial = initial
        self.seed = seed
        self.rng = rng

    def __call__(self, data: Iterator[dict]) -> Iterator[dict]:
        return shuffled(data, self.bufsize, self.initial, self.rng or self._epoch_rng())

    def _epoch_rng(self) -> random.Random:
        c = self.source.current
        seed = self.source.seed if self.seed is None else self.seed
        return random.Random(epoch_seed(c.snapshot_id, seed, c.epoch, c.slot.rank, c.slot.worker, self.bufsize))

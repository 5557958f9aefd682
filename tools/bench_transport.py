"""The transport ceiling of ``tools/bench.py``: ready-made batches through DataLoader workers.

Each worker collates the same samples, made once (the set's payload sizes, the bench's batch
size), into a batch again and again until its share of the set's samples is sent; nothing is
read. What a pass then measures is the collation and the DataLoader's path from a worker's
``yield`` to the main process's ``next``: packing, pickling, the pipe (or shared memory),
unpickling and the loader's loop. No reader through the same loader and collation can beat it,
and its inverse is the cost per sample of crossing the worker pipe with that collation.

``packed``: items go the way RefreshingWebDataset sends them (``wdsrefresh.pipeline.crossing``); else
as torch sends any iterable dataset's items (what wdsrefresh did before issue 26).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch.utils.data
from webdataset.filters import default_collation_fn

from wdsrefresh.pipeline.crossing import packing


def _shares(samples: int, workers: int, batch: int, worker: int) -> list[int]:
    """The batch sizes worker ``worker`` yields: its even share of ``samples``, in full batches
    and one shorter batch at the end, as a split of the set among workers gives."""
    share = samples // workers + (1 if worker < samples % workers else 0)
    return [batch] * (share // batch) + ([share % batch] if share % batch else [])


class ReadyBatches(torch.utils.data.IterableDataset):
    """The same ready-made batches, ``samples`` samples in all across the loader's workers."""

    def __init__(self, make_sample: Callable[[int], tuple], samples: int, batch: int,
                 collate: Callable = default_collation_fn, packed: bool = True):
        self.make_sample = make_sample
        self.samples = samples
        self.batch = batch
        self.collate = collate
        self.packed = packed

    def __iter__(self):
        batches = self._batches()
        return packing(batches, sys._getframe(1)) if self.packed else batches

    def _batches(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        made: dict[int, list] = {}
        for size in _shares(self.samples, workers, self.batch, worker):
            if size not in made:
                made[size] = [self.make_sample(i) for i in range(size)]
            yield self.collate(made[size])


class TransportCeiling:
    """A bench reader: one pass is every batch of a ``ReadyBatches`` through a DataLoader with
    persistent workers; ``one_pass`` counts the samples received."""

    def __init__(self, make_sample: Callable[[int], tuple], samples: int, workers: int, batch: int,
                 collate: Callable = default_collation_fn, packed: bool = True):
        dataset = ReadyBatches(make_sample, samples, batch, collate, packed)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                  persistent_workers=True)

    def prepare(self) -> None:
        pass

    def one_pass(self) -> int:
        return sum(len(b[0]) for b in self.loader)

    def close(self) -> None:
        self.loader._iterator = None  # lets the persistent workers exit

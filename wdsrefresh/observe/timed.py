"""``wr.timed``: how long a training loop waits for its loader's batches, per pass, added to
the stats of the epoch it read."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any


class TimedLoader:
    """Iterates a loader like the loader itself, measuring how long each pass waited for data.

    After each pass (exhausted, or left early): ``batches`` (items the loader gave), ``seconds``
    (wall-clock time of the pass) and ``wait_seconds`` (the part spent inside the loader's
    ``__next__``: waiting for workers, collating, copying). When the loader's dataset is a
    RefreshingWebDataset (or ``dataset=`` names one), the pass is added to the stats of the
    epoch it read (the latest published snapshot's), per rank: ``ds.stats(epoch).wait_seconds``.
    """

    def __init__(self, loader: Iterable, dataset: Any = None):
        self.loader = loader
        self.dataset = dataset if dataset is not None else getattr(loader, "dataset", loader)
        self.batches = 0
        self.seconds = 0.0
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property
    def wait_share(self) -> float | None:
        return self.wait_seconds / self.seconds if self.seconds else None

    def __iter__(self) -> Iterator:
        clock = time.perf_counter
        start = clock()
        wait = 0.0
        batches = 0
        it = iter(self.loader)
        try:
            while True:
                asked = clock()
                try:
                    item = next(it)
                except StopIteration:
                    wait += clock() - asked
                    break
                wait += clock() - asked
                batches += 1
                yield item
        finally:
            self.batches, self.seconds, self.wait_seconds = batches, clock() - start, wait
            recorder = getattr(self.dataset, "record_loop", None)
            if recorder is not None:
                recorder(batches, self.seconds, wait)


def timed(loader: Iterable, dataset: Any = None) -> TimedLoader:
    """``for batch in wr.timed(loader):`` measures how long the training loop waits for data.

    See TimedLoader: the wait and loop time of each pass go into the dataset's EpochStats
    (``wait_seconds``, ``loop_seconds``, ``batches``), and so into ``stats.jsonl`` and
    ``log_stats``. The cost is two clock reads per batch.
    """
    return TimedLoader(loader, dataset)

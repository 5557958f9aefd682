"""Batching without look-ahead: a batch is yielded the moment it is full.

webdataset's ``batched`` pulls the next sample before it yields a full batch, so a
checkpoint taken after a batch counts one sample no batch carried: a resume loses it. Here
a stage that yields holds nothing, so a position saved after any batch is exact.

In ``mode="stream"`` the input may pause for as long as no shard lands, so a partial batch is
yielded once no sample arrived for ``partial_after`` seconds. The samples it waits on are then
pulled by a helper thread, and a checkpoint names the samples the stage holds (their positions
in the stream), so the stream resumes before them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from webdataset.filters import default_collation_fn

DEFAULT_PARTIAL_AFTER = 1.0  # seconds without a new sample before a stream's partial batch is yielded
_END = object()


def batches(data: Iterator, batchsize: int, collation_fn: Callable | None = default_collation_fn,
            partial: bool = True) -> Iterator:
    """Lists of ``batchsize`` samples (collated), and the last, shorter one when ``partial``."""
    if batchsize < 1:
        raise ValueError(f"batchsize={batchsize!r}: expected a positive integer")
    batch: list = []
    for sample in data:
        batch.append(sample)
        if len(batch) == batchsize:
            yield collation_fn(batch) if collation_fn is not None else batch
            batch = []
    if batch and partial:
        yield collation_fn(batch) if collation_fn is not None else batch


class Batched:
    """The pipeline stage for ``RefreshingWebDataset.batched`` (same arguments as webdataset's).

    With a ``stream`` (a source that says where its last sample came from), a partial batch is
    yielded after ``partial_after`` seconds without a new sample.
    """

    def __init__(self, batchsize: int, collation_fn: Callable | None = default_collation_fn, partial: bool = True,
                 partial_after: float = DEFAULT_PARTIAL_AFTER, stream: Any = None):
        if batchsize < 1:
            raise ValueError(f"batchsize={batchsize!r}: expected a positive integer")
        if not partial_after > 0:
            raise ValueError(f"partial_after={partial_after!r}: expected seconds > 0")
        self.batchsize = batchsize
        self.collation_fn = collation_fn
        self.partial = partial
        self.partial_after = partial_after
        self.stream = stream
        self._run: _TimedBatches | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_run": None}

    def __call__(self, data: Iterator) -> Iterator:
        if self.stream is None:
            return batches(data, self.batchsize, self.collation_fn, self.partial)
        self.stream.tracks_transit = True
        self._run = _TimedBatches(data, self)
        return self._run.batches()

    def held(self) -> list:
        """Stream positions of the samples this stage took in and has not yielded yet."""
        return self._run.held() if self._run is not None else []


class _TimedBatches:
    """One iteration of a stream's batches: a helper thread pulls one sample at a time, only when
    the batch needs one, so the stage holds at most the samples of the batch it is filling."""

    def __init__(self, data: Iterator, stage: Batched):
        self.data, self.stage = data, stage
        self.results: queue.Queue = queue.Queue()
        self.wanted = threading.Semaphore(0)
        self.lock = stage.stream.lock  # taken with the stream's: no sample is ever in neither place
        self.batch: list = []
        self.positions: list = []  # of the samples in self.batch, then of one pulled and not yet taken
        self.pulling = False
        self.closed = False

    def held(self) -> list:
        with self.lock:
            return list(self.positions)

    def _pull(self) -> None:
        while True:
            self.wanted.acquire()
            if self.closed:  # the batches were abandoned: end the input (its watcher, its files) here
                self.data.close()
                return
            try:
                sample = next(self.data)
            except StopIteration:
                self.results.put((_END, None))
                return
            except BaseException as exn:  # handed to the consumer's thread, which raises it
                self.results.put((_END, exn))
                return
            with self.lock:
                self.positions.append(self.stage.stream.take_in_transit())
            self.results.put((sample, None))

    def _next(self, timeout: float | None):
        if not self.pulling:
            self.pulling = True
            self.wanted.release()
        sample, error = self.results.get(timeout=timeout)
        self.pulling = False
        if error is not None:
            raise error
        return sample

    def batches(self) -> Iterator:
        threading.Thread(target=self._pull, name="wdsrefresh-batched", daemon=True).start()
        try:
            yield from self._batches()
        finally:  # a pull in flight ends when the stream yields again or is closed
            self.closed = True
            self.wanted.release()

    def _batches(self) -> Iterator:
        stage = self.stage
        while True:
            try:
                sample = self._next(stage.partial_after if self.batch else None)
            except queue.Empty:
                yield self._take()
                continue
            if sample is _END:
                break
            self.batch.append(sample)
            if len(self.batch) == stage.batchsize:
                yield self._take()
        if self.batch and stage.partial:
            yield self._take()

    def _take(self):
        with self.lock:
            batch, self.batch = self.batch, []
            del self.positions[:len(batch)]
        return self.stage.collation_fn(batch) if self.stage.collation_fn is not None else batch

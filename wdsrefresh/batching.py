"""Batching without look-ahead: a batch is yielded the moment it is full.

webdataset's ``batched`` pulls the next sample before it yields a full batch, so a
checkpoint taken after a batch counts one sample no batch carried: a resume loses it. Here
a stage that yields holds nothing, so a position saved after any batch is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from webdataset.filters import default_collation_fn


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
    """The pipeline stage for ``RefreshingWebDataset.batched`` (same arguments as webdataset's)."""

    def __init__(self, batchsize: int, collation_fn: Callable | None = default_collation_fn, partial: bool = True):
        self.batchsize = batchsize
        self.collation_fn = collation_fn
        self.partial = partial

    def __call__(self, data: Iterator) -> Iterator:
        return batches(data, self.batchsize, self.collation_fn, self.partial)

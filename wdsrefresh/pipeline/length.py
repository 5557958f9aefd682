"""Epoch length: how many samples (or batches) one rank yields in an epoch, known in advance.

The exact split makes it a pure function of the snapshot: every rank yields the same number
of samples (``total // world_size``, less nothing: left-out samples are no rank's), and each
rank's DataLoader workers get shares equal to within one sample. Batches are counted per
worker, since each worker batches its own share: with ``partial`` batches (webdataset's
default) a worker's last, short batch counts too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import WdsRefreshError


class EpochLengthUnknown(WdsRefreshError, TypeError):
    """The length cannot be known yet (no ``set_epoch``) or not from what was given.

    A TypeError, as Python's ``len()`` raises for objects without a length, so tools that
    probe ``len()`` (tqdm, Lightning) treat the dataset as one of unknown length."""


@dataclass(frozen=True)
class Batching:
    """The batching stage of a pipeline: batch size, and whether a short last batch is kept."""

    size: int
    partial: bool = True


def find_batching(stages: Sequence) -> Batching | None:
    """The pipeline's batching stage (webdataset's ``.batched``/``.listed``, or any stage with
    ``batchsize`` and ``partial`` attributes); None without one. Raises EpochLengthUnknown
    when the stages make the count of items unknowable from here (two batchings, unbatching)."""
    found: Batching | None = None
    for stage in stages:
        batching = _batching_of(stage)
        name = getattr(getattr(stage, "f", None), "__name__", "")
        if name in ("_unbatched", "_unlisted"):
            raise EpochLengthUnknown("the pipeline unbatches after batching: pass batch_size= (or None) "
                                     "to say what one item is")
        if batching is None:
            continue
        if found is not None:
            raise EpochLengthUnknown("the pipeline batches twice: pass batch_size= to say what one item is")
        found = batching
    return found


def _batching_of(stage) -> Batching | None:
    size = getattr(stage, "batchsize", None)
    if isinstance(size, int):
        return Batching(size, bool(getattr(stage, "partial", True)))
    f = getattr(stage, "f", None)
    if getattr(f, "__name__", "") != "_batched":
        return None
    args, kw = getattr(stage, "args", ()), getattr(stage, "kw", {})
    size = args[0] if args else kw.get("batchsize", 20)  # webdataset's default
    partial = args[2] if len(args) > 2 else kw.get("partial", True)
    return Batching(int(size), bool(partial))


@dataclass
class LengthHints:
    """What ``set_epoch`` said about the epochs to come: the epoch set last, and the loader's
    ``num_workers`` if given (kept for later epochs). Shared by the pipelines composed from one dataset."""

    epoch: int | None = None
    num_workers: int | None = None


def rank_items(shares: Sequence[int], batching: Batching | None) -> int:
    """Items one rank yields: the samples of its consumers' ``shares``, or the batches each
    consumer makes of its own share."""
    if batching is None:
        return sum(shares)
    round_ = math.ceil if batching.partial else math.floor
    return sum(round_(share / batching.size) for share in shares)

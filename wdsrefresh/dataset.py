"""RefreshingWebDataset: a webdataset pipeline whose shard list is re-resolved every epoch."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import webdataset as wds
from webdataset.filters import default_collation_fn
from webdataset.handlers import reraise_exception

from .epoch_source import EpochSource, EpochStats
from .format.tario import MAX_SAMPLE_BYTES
from .probe import DEFAULT_SETTLE
from .reading import CHANGE_POLICIES, VERIFY_MODES, ReadOptions
from .resolver import INVALID_POLICIES
from .sample_source import SampleSource
from .batching import Batched
from .shuffle import EpochShuffle
from .snapshot import Snapshot
from .watch import BACKENDS

log = logging.getLogger("wdsrefresh")

__all__ = ["EpochStats", "RefreshingWebDataset"]
MODES = ("epoch", "stream")


class RefreshingWebDataset(wds.DataPipeline, wds.FluidInterface):
    """A streaming WebDataset whose shards are re-resolved from ``source`` at every epoch.

    Guarantees, for each epoch: every DataLoader worker of every rank reads the same snapshot;
    every sample of the snapshot is yielded exactly once across ranks x workers (less at most
    ``world_size - 1`` left out, unless ``partial=True``); every rank yields the same number of
    samples; shard order is a pure function of (snapshot, seed, epoch). Samples are
    webdataset dicts, so ``.decode()``, ``.to_tuple()``, ``.batched()`` work as usual.
    """

    def __init__(
        self,
        source: Any,
        *,
        shardshuffle: bool = True,
        seed: int = 0,
        verify: str = "inline",
        on_change: str = "reload",
        handler: Callable[[BaseException], bool] = reraise_exception,
        watch: bool = True,
        mode: str = "epoch",
        partial: bool = False,
        equalize: bool = True,
        state_dir: str | None = None,
        min_shards: int = 0,
        timeout: float | None = None,
        poll: bool | float = False,
        settle: float = DEFAULT_SETTLE,
        on_invalid: str = "warn",
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
    ):
        _check_choice("verify", verify, VERIFY_MODES)
        _check_choice("on_change", on_change, CHANGE_POLICIES)
        _check_choice("mode", mode, MODES)
        if not isinstance(watch, bool):
            _check_choice("watch", watch, BACKENDS)
        _check_choice("on_invalid", on_invalid, INVALID_POLICIES)
        if settle < 0:
            raise ValueError(f"settle={settle!r}: expected seconds >= 0")
        options = ReadOptions(verify=verify, on_change=on_change, handler=handler, equalize=equalize, settle=settle,
                              max_sample_bytes=max_sample_bytes)
        self.sample_source: SampleSource
        if mode == "stream":
            from .stream import StreamSource

            self.sample_source = StreamSource(source, options=options, state_dir=state_dir, poll=poll, seed=seed,
                                              equal_ranks=equalize)
        else:
            self.sample_source = EpochSource(source, shardshuffle=shardshuffle, seed=seed, options=options,
                                             partial=partial, state_dir=state_dir, watch=watch, poll=poll,
                                             min_shards=min_shards, timeout=timeout, on_invalid=on_invalid)
        super().__init__(self.sample_source)

    def close(self) -> None:
        """Epoch mode: stops the directory watcher. Stream mode: ends the stream in every consumer."""
        self.sample_source.close()

    def set_epoch(self, epoch: int) -> Snapshot:
        """Resolves the snapshot for ``epoch`` and makes it the one every consumer reads next.

        Under torch.distributed, call it in every rank (rank 0's snapshot is broadcast).
        Without it, each iteration advances the epoch by one.
        """
        return self.sample_source.set_epoch(epoch)

    def __iter__(self):
        self.sample_source.prepare()  # a checkpoint taken before the first sample knows its epoch
        return super().__iter__()

    def state_dict(self) -> dict:
        """This consumer's position in the current epoch, as a versioned dict of plain values.

        torchdata's StatefulDataLoader calls it in each worker (on the main-process dataset when
        num_workers=0). A ``.shuffle()`` buffer is saved as the positions of the samples it holds
        (never their bytes) and its rng state; ``.batched()`` holds nothing when it yields. So a
        resumed run yields exactly what the uninterrupted one would have. webdataset's own
        sample-holding stages (its shuffle, ``unbatched``) refuse. Format: ``wdsrefresh.resume``.
        """
        _refuse_stages_holding_samples(self.pipeline[1:])
        shuffles = [stage for stage in self.pipeline if isinstance(stage, EpochShuffle)]
        if len(shuffles) > 1:
            raise RuntimeError("state_dict(): a pipeline with two .shuffle() buffers cannot be checkpointed")
        return self.sample_source.state_dict(shuffle=shuffles[0].checkpoint() if shuffles else None)

    def load_state_dict(self, state: Any) -> None:
        """Resumes from ``state`` at the next iteration: the saved epoch, its saved snapshot, each
        consumer's saved position; the epoch after it resolves a fresh snapshot.

        ``state`` is one consumer's (as StatefulDataLoader passes it to each worker), or anything
        holding several: a StatefulDataLoader's ``state_dict()``, a list of every rank's. Loaded
        into the dataset before its DataLoader is built, it resumes with another num_workers or
        world size (the unread samples are redistributed, each exactly once), and ``set_epoch``
        for the saved epoch returns the saved snapshot. Raises ``wdsrefresh.resume.ResumeError``
        for a state of another dataset or a corrupted one.
        """
        self.sample_source.load_state_dict(state)

    @property
    def state_directory(self) -> str:
        """The dataset's private state directory (made at construction, removed with the dataset)."""
        return self.sample_source.statedir.directory

    @property
    def watching(self) -> str | None:
        """How this process keeps the shard directory's index current: "inotify", "watchdog" or
        "poll"; None when it rescans the source at each epoch (``watch=False``, a non-directory
        source, or before the first epoch)."""
        return self.sample_source.watching

    def snapshot(self, epoch: int | None = None) -> Snapshot | None:
        """The published snapshot of ``epoch`` (default: the latest)."""
        return self.sample_source.snapshot(epoch)

    def stats(self, epoch: int | None = None):
        """Per-epoch statistics of this rank (default: the latest published epoch): an EpochStats.

        In stream mode: a ``StreamStats`` (shards, samples, drop-to-first-sample latencies).
        """
        return self.sample_source.stats(epoch)

    def batched(self, batchsize: int, collation_fn: Callable | None = default_collation_fn, partial: bool = True):
        """Batches of ``batchsize`` samples, as webdataset's ``batched`` (same collation), yielded
        the moment they are full, so a checkpoint after any batch is exact."""
        return self.compose(Batched(batchsize, collation_fn, partial))

    def shuffle(self, size: int, initial: int = 100, *, seed: int | None = None, rng: random.Random | None = None):
        """A sample shuffle buffer of ``size`` samples, yielding from ``initial`` on.

        Seeded per (seed, epoch, rank, worker): reproducible, different each epoch. ``seed``
        defaults to the dataset's; ``rng`` (a ``random.Random``) replaces the per-epoch seeding.
        """
        if size < 1:
            return self
        return self.compose(EpochShuffle(self.sample_source, size, min(initial, size), seed=seed, rng=rng))


_HOLDING_STAGES = {"_shuffle": ".shuffle() of webdataset", "_unbatched": ".unbatched()"}


def _refuse_stages_holding_samples(stages: list) -> None:
    """webdataset stages that hold samples they took in but did not yield cannot be checkpointed."""
    for stage in stages:
        name = getattr(getattr(stage, "f", None), "__name__", "")
        if name in _HOLDING_STAGES:
            raise RuntimeError(
                f"state_dict(): the pipeline's {_HOLDING_STAGES[name]} stage holds samples it read but did not "
                f"yield yet; a checkpoint would lose them. Use RefreshingWebDataset's .shuffle() and .batched()")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")

"""RefreshingWebDataset: a webdataset pipeline whose shard list is re-resolved every epoch."""

from __future__ import annotations

import logging
import random
import sys
from typing import Any, Callable

import webdataset as wds
from webdataset.filters import default_collation_fn
from webdataset.handlers import reraise_exception

from .compat import argument_names, check_ported, shard_shuffle
from .crossing import packing
from ..epoch.epochs import EpochSource, EpochStats
from ..format.tario import MAX_SAMPLE_BYTES
from ..mix.config import is_mix
from ..storage.local import WATCHERS, cache_directory
from .length import Batching, EpochLengthUnknown, LengthHints, find_batching, rank_items
from ..core.options import CHANGE_POLICIES, DEFAULT_SETTLE, VERIFY_MODES, ReadOptions
from ..storage.resolver import INVALID_POLICIES
from ..epoch.feed import SampleSource
from .batching import DEFAULT_PARTIAL_AFTER, Batched
from .shuffle import EpochShuffle
from ..core.snapshot import Snapshot
from ..storage.source import NoShardsError
from ..epoch.stats import gather
from ..observe.stats_log import StatsRecorder
from .tuples import ToTuple

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

    ``source`` may also be a dict of named sources, mixed with ``weights`` (and ``epoch_size``)
    or ``repeat``: each source gives exactly its count per epoch, interleaved, rotating through
    its samples; every sample carries ``__source__`` (see "Mixing sources" in the documentation).
    Every argument is described under "Options" in the documentation's reference.
    """

    def __init__(
        self,
        source: Any,
        *,
        shardshuffle: bool | int | None = True,
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
        stats_dir: str | None = None,
        index_cache: bool | str = True,
        storage_options: dict[str, Any] | None = None,
        weights: dict[str, float] | None = None,
        epoch_size: int | None = None,
        repeat: dict[str, float] | None = None,
        **webdataset_args: Any,
    ):
        # webdataset's own arguments (nodesplitter, resampled, empty_check, ...): see compat.py
        self.empty_check = check_ported(webdataset_args, argument_names(RefreshingWebDataset.__init__))
        shardshuffle = shard_shuffle(shardshuffle)
        if mode == "resampled":
            raise ValueError('mode="resampled" is webdataset\'s resampling; see resampled=True for what replaces it')
        _check_choice("verify", verify, VERIFY_MODES)
        _check_choice("on_change", on_change, CHANGE_POLICIES)
        _check_choice("mode", mode, MODES)
        if not isinstance(watch, bool):
            _check_choice("watch", watch, WATCHERS)
        _check_choice("on_invalid", on_invalid, INVALID_POLICIES)
        if settle < 0:
            raise ValueError(f"settle={settle!r}: expected seconds >= 0")
        options = ReadOptions(verify=verify, on_change=on_change, handler=handler, equalize=equalize, settle=settle,
                              max_sample_bytes=max_sample_bytes, index_cache=cache_directory(index_cache))
        if stats_dir is not None and mode == "stream":
            raise ValueError('stats_dir= writes one line per epoch, and mode="stream" has no epochs: '
                             "read ds.stats() (a StreamStats) instead")
        if storage_options is not None and mode == "stream":
            raise ValueError('storage_options= apply to s3:// and https:// sources, and mode="stream" reads a local '
                             'directory: use mode="epoch" for an object store')
        self.sample_source: SampleSource
        mixed = is_mix(source, weights, epoch_size, repeat)
        if not mixed and repeat not in (None, False):  # webdataset's repeat, or a mix's without its sources
            check_ported({"repeat": repeat}, argument_names(RefreshingWebDataset.__init__))
        if mixed and mode == "stream":
            raise ValueError('mode="stream" reads one directory\'s shards as they land; a mix holds its proportions '
                             'per epoch (a source with nothing new would stall or skew a stream): use mode="epoch" '
                             'for a mix of sources')
        if mixed:
            from ..mix.source import MixSource

            self.sample_source = MixSource(source, weights=weights, epoch_size=epoch_size, repeat=repeat,
                                           shardshuffle=shardshuffle, seed=seed, options=options, partial=partial,
                                           state_dir=state_dir, watch=watch, poll=poll, min_shards=min_shards,
                                           timeout=timeout, on_invalid=on_invalid, storage_options=storage_options)
        elif mode == "stream":
            from ..epoch.stream import StreamSource

            self.sample_source = StreamSource(source, options=options, state_dir=state_dir, poll=poll, seed=seed,
                                              equal_ranks=equalize)
        else:
            self.sample_source = EpochSource(source, shardshuffle=shardshuffle, seed=seed, options=options,
                                             partial=partial, state_dir=state_dir, watch=watch, poll=poll,
                                             min_shards=min_shards, timeout=timeout, on_invalid=on_invalid,
                                             storage_options=storage_options, warn_empty=not self.empty_check)
        # shared by the pipelines composed from this one
        self.stats_recorder = StatsRecorder(stats_dir, self.sample_source)
        self.length_hints = LengthHints()
        super().__init__(self.sample_source)

    def close(self) -> None:
        """Epoch mode: writes the stats lines not written yet (``stats_dir``) and stops the
        directory watcher. Stream mode: ends the stream in every consumer."""
        self.stats_recorder.flush()
        self.sample_source.close()

    def __enter__(self) -> RefreshingWebDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_epoch(self, epoch: int, *, num_workers: int | None = None) -> Snapshot:
        """Resolves the snapshot for ``epoch`` and makes it the one every consumer reads next
        (a ``MixSnapshot`` for a mix of sources: ``.sources``, ``.counts``).

        Under torch.distributed, call it in every rank (rank 0's snapshot is broadcast).
        Without it, each iteration advances the epoch by one. With ``stats_dir``, the stats of
        the epochs before ``epoch`` (complete now) are appended to ``stats.jsonl`` first.
        ``num_workers``: the DataLoader's, so that ``len(ds)`` counts a batched pipeline's
        batches from now on (kept for later epochs; see ``epoch_length``).
        """
        if num_workers is not None:
            _non_negative("num_workers", num_workers)
        self.stats_recorder.flush(before=epoch)
        snapshot = self.sample_source.set_epoch(epoch)
        self.length_hints.epoch = epoch
        if num_workers is not None:
            self.length_hints.num_workers = num_workers
        if self.empty_check:
            _check_not_empty(snapshot, self.sample_source.source.describe())
        return snapshot

    def __iter__(self):
        self.sample_source.prepare()  # a checkpoint taken before the first sample knows its epoch
        if self.empty_check:
            upcoming = getattr(self.sample_source, "upcoming", None)
            if upcoming is not None:
                _check_not_empty(upcoming, self.sample_source.source.describe())
        return packing(super().__iter__(), sys._getframe(1))

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
        held = [position for stage in self.pipeline if isinstance(stage, Batched) for position in stage.held()]
        shuffle = shuffles[0].checkpoint() if shuffles else None
        return self.sample_source.state_dict(shuffle=shuffle, held=held)

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

    def stats(self, epoch: int | None = None, *, all_ranks: bool = False):
        """What ``epoch`` read on this rank (default: the latest published epoch): an EpochStats,
        whose docstring says what each field counts. Complete once the epoch's loop ended.

        ``all_ranks=True`` returns every rank's EpochStats, in rank order, gathered over
        torch.distributed: a collective, so call it in every rank's main process (for the same
        epoch). In stream mode: a ``StreamStats`` (shards, samples, drop-to-first-sample latencies).
        """
        stats = self.sample_source.stats(epoch)
        if isinstance(stats, EpochStats):
            stats = self.stats_recorder.joined(stats)
        if all_ranks:
            if not isinstance(stats, EpochStats):
                raise ValueError('stats(all_ranks=True) gathers epochs; mode="stream" has none')
            return gather(stats)
        return stats

    def record_loop(self, batches: int, seconds: float, wait_seconds: float) -> None:
        """Adds a pass of ``wr.timed(loader)`` to the stats of the epoch it read (the latest
        published one); ``wr.timed`` calls it."""
        published = self.sample_source.statedir.published_epochs()
        if published:
            self.stats_recorder.record_loop(max(published), batches, seconds, wait_seconds)

    def epoch_length(self, epoch: int | None = None, *, batch_size: int | None | str = "auto",
                     num_workers: int | None = None) -> int:
        """How many items this rank yields in ``epoch`` (default: the one set last by ``set_epoch``).

        Samples; or, when the pipeline batches (``.batched(n)``, found among its stages, or
        ``batch_size=n`` given), batches. Each DataLoader worker batches its own share, so the
        count of batches depends on ``num_workers`` (0 or 1: one consumer); by default the one
        given to ``set_epoch``, else the number the last loader over this dataset used. After
        ``load_state_dict``, the saved epoch counts what remains of it. ``batch_size=None``
        counts samples whatever the pipeline does. Stages that drop samples (``.select()``, a
        handler that skips corrupt samples) or padding make the real count differ; the split
        itself never does: every rank yields this many. Raises EpochLengthUnknown (a TypeError)
        before ``set_epoch``.
        """
        if epoch is None:
            epoch = self.length_hints.epoch
        snapshot = self.sample_source.snapshot(epoch) if epoch is not None else None
        if snapshot is None:
            raise EpochLengthUnknown(
                "the length of an epoch is known once its snapshot is resolved: call ds.set_epoch(epoch) first"
                + ("" if epoch is None else f" (no snapshot is published for epoch {epoch})"))
        batching = find_batching(self.pipeline[1:]) if batch_size == "auto" else (
            None if batch_size is None else Batching(_positive("batch_size", batch_size)))
        if batching is not None and num_workers is None:
            num_workers = self.length_hints.num_workers
            if num_workers is None:
                num_workers = self.sample_source.statedir.last_num_workers()
            if num_workers is None:
                raise EpochLengthUnknown(
                    f"this pipeline yields batches of {batching.size}, and each DataLoader worker batches its own "
                    f"share: call ds.set_epoch(epoch, num_workers=N) with the loader's num_workers (or "
                    f"ds.epoch_length(num_workers=N); it is known by itself once a loader has iterated this dataset)")
        return rank_items(self.sample_source.shares(epoch, num_workers), batching)

    def __len__(self) -> int:
        """``epoch_length()``: this rank's samples (or batches) in the epoch set last by
        ``set_epoch``; raises EpochLengthUnknown (a TypeError) before it."""
        return self.epoch_length()

    def batched(self, batchsize: int, collation_fn: Callable | None = default_collation_fn, partial: bool = True,
                *, partial_after: float = DEFAULT_PARTIAL_AFTER):
        """Batches of ``batchsize`` samples, as webdataset's ``batched`` (same collation), yielded
        the moment they are full, so a checkpoint after any batch is exact. In ``mode="stream"``
        a partial batch is yielded once no new sample arrived for ``partial_after`` seconds."""
        from ..epoch.stream import StreamSource

        stream = self.sample_source if isinstance(self.sample_source, StreamSource) else None
        return self.compose(Batched(batchsize, collation_fn, partial, partial_after, stream))

    def to_tuple(self, *args: str, **kw: Any):
        """Samples as tuples of the named fields, exactly as webdataset's ``to_tuple`` (same
        arguments, ``;`` alternatives, handler), with its per-sample work done once."""
        return self.compose(ToTuple(*args, **kw))

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


def _check_not_empty(snapshot: Snapshot, source: str) -> None:
    """``empty_check=True``: an epoch with no sample to read is an error, as in webdataset."""
    if snapshot.nsamples == 0:
        raise NoShardsError(
            f"{source}: epoch {snapshot.epoch} has no sample to read ({len(snapshot.shards)} ready shards, "
            f"{len(snapshot.pending)} pending, {len(snapshot.rejected)} rejected); empty_check=True makes that an "
            f"error (min_shards=N waits for shards instead)")


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return value


def _non_negative(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    return value


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")

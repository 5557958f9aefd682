"""MixSource: the first stage of a mix of named sources, each re-resolved every epoch.

In the main process ``set_epoch`` resolves every source's snapshot (each through its own
``EpochSource``: its watcher, its readiness, its ``min_shards``), fixes the epoch's counts
(``plan.epoch_counts``) and each source's selection (``rotation.select``), and publishes the
``MixSnapshot`` in the state directory; under torch.distributed rank 0 does it and broadcasts
the result. Each consumer takes its positions of the epoch's schedule (``plan.turns``) and reads
each source's pieces for them with ``reading.read_assignment``, one cursor per source, so every
policy of a single-source epoch (digests, ``on_change``, padding to keep ranks equal) holds per
source. Every sample carries ``__source__``, its source's name.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..epoch.epochs import EpochSource
from ..core.options import ReadOptions
from ..epoch.reading import Cursor, ReadStats, read_assignment, read_positions
from ..epoch.resume import read_stats
from ..epoch.feed import Consumer
from ..epoch.slot import Slot, dist_info, in_dataloader_worker
from ..epoch.stage import EpochStage
from ..core.snapshot import Snapshot
from ..epoch.split import Assignment, slot_range, worker_shares
from . import resume as resuming
from .config import MixConfig, parse
from .plan import epoch_counts
from .rotation import Rotation, select
from .snapshot import (EMPTY_REDISTRIBUTED, EMPTY_WAITED, MixSnapshot, MixStateDirectory, SourcePlan, mix_id,
                       selection_array)
from .stats import mix_epoch_stats

log = logging.getLogger("wdsrefresh")


class MixSources:
    """The named sources of a mix, as ``ds.sample_source.source`` (what errors describe)."""

    def __init__(self, members: Mapping[str, EpochSource]):
        self.members = dict(members)

    def describe(self) -> str:
        return "mix of " + ", ".join(f"{n} ({m.source.describe()})" for n, m in self.members.items())


@dataclass
class _Iteration:
    consumer: Consumer
    snapshot: MixSnapshot
    share: resuming.Share
    stats: dict[str, ReadStats]
    cursors: dict[str, Cursor]
    dry: int = 0  # positions whose source had nothing left to yield (shards gone, without padding)
    explicit: bool = False
    shuffle: dict | None = None
    order: Any = None  # the source of each position of the share (an array), once reading began

    def position(self) -> int:
        """Positions of the share passed: each source's samples (padding included), dry ones."""
        return sum(s.yielded + s.padded for s in self.stats.values()) + self.dry


class MixSource(EpochStage):
    """The first pipeline stage of a mix; see the module docstring."""

    _KIND = "mix"

    def __init__(self, sources: Mapping, *, weights: Any = None, epoch_size: Any = None, repeat: Any = None,
                 shardshuffle: bool, seed: int, options: ReadOptions, partial: bool, state_dir: str | None,
                 watch: bool | str = False, poll: bool | float = False, min_shards: int = 0,
                 timeout: float | None = None, on_invalid: str = "warn",
                 storage_options: dict[str, Any] | None = None):
        self.config: MixConfig = parse(sources, weights=weights, epoch_size=epoch_size, repeat=repeat)
        self.shardshuffle, self.seed, self.partial = bool(shardshuffle), seed, partial
        self.members: dict[str, EpochSource] = {}
        for m in self.config.members:
            own = m.options
            member_options = replace(options, verify=own.get("verify", options.verify),
                                     on_change=own.get("on_change", options.on_change))
            self.members[m.name] = EpochSource(
                m.spec, shardshuffle=shardshuffle, seed=seed, options=member_options, partial=partial,
                state_dir=state_dir, watch=watch, poll=poll, min_shards=own.get("min_shards", min_shards),
                timeout=timeout, on_invalid=on_invalid,
                storage_options=own.get("storage_options", storage_options if _remote(m.spec) else None))
        self.source = MixSources(self.members)
        self._init_stage(MixStateDirectory(state_dir))
        self._ghosts: dict[str, Any] = {}  # sources of a loaded state no longer in the mix: their stores
        self._mix_doc: tuple[str, bool, dict] | None = None
        weakref.finalize(self, self.statedir.cleanup)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_next"] = state["_live"] = state["_mix_doc"] = state["_resumed"] = None
        return state

    @property
    def specs(self) -> dict[str, str]:
        return {n: m.source.describe() for n, m in self.members.items()}

    @property
    def watching(self) -> str | None:
        """How this process keeps its sources' indexes current, by source: "name: inotify, ..."."""
        seen = [f"{n}: {m.watching}" for n, m in self.members.items() if m.watching]
        return ", ".join(seen) or None

    def close(self) -> None:
        for m in self.members.values():
            m.close()

    # resolving, in the main process
    def _resolve(self, epoch: int, previous: MixSnapshot | None) -> MixSnapshot:
        snapshots, waited = {}, set()
        for name, m in self.members.items():
            before = previous.plans[name].snapshot if previous is not None and name in previous.plans else None
            snapshots[name] = m.resolve(epoch, before)
            if m.min_shards > 0 and m.attempts > 1:
                waited.add(name)
        _, world_size = dist_info()
        cfg = self.config
        counts, left_out = epoch_counts({n: s.nsamples for n, s in snapshots.items()}, weights=cfg.weights,
                                        epoch_size=cfg.epoch_size, repeat=cfg.repeat, world_size=world_size,
                                        partial=self.partial)
        plans = {}
        for name, snap in snapshots.items():
            rotation = previous.plans[name].rotation if previous is not None and name in previous.plans else Rotation()
            pieces, after = select(snap, rotation, counts[name], seed=self.seed, epoch=epoch, name=name,
                                   shuffle=self.shardshuffle)
            empty = EMPTY_WAITED if name in waited else (
                EMPTY_REDISTRIBUTED if snap.nsamples == 0 and _asked(cfg, name) else None)
            plans[name] = SourcePlan(snap, counts[name], selection_array(pieces), after, cfg.share(name), empty,
                                     self.members[name].source.describe())
        mix = MixSnapshot(epoch, mix_id(plans), plans, left_out)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", mix.describe(previous))
        return mix

    def _stats_of(self, mix: MixSnapshot, previous: MixSnapshot | None, records: list[dict], control: dict):
        return mix_epoch_stats(mix, previous, records, rank=control["rank"], world_size=control["world_size"],
                               partial=self.partial, name_of={n: m.name_of for n, m in self.members.items()})

    def shares(self, epoch: int, num_workers: int | None = None) -> list[int]:
        """The samples each of this rank's consumers yields in ``epoch`` (see EpochSource.shares)."""
        control = self.statedir.control()
        rank, world_size = control["rank"], control["world_size"]
        resume = self._resumed
        if resume is not None and resume.epoch == epoch:
            workers = resume.num_workers if num_workers is None else max(1, num_workers)
            return [resuming.restart(resume, Slot(rank, world_size, w, workers), self.partial, warn=False).samples
                    for w in range(workers)]
        mix = self.snapshot(epoch)
        total = len(mix) if mix is not None else 0
        lo, hi = slot_range(total, Slot(rank, world_size))
        return worker_shares(hi - lo, num_workers or 0)

    # iterating, in each consumer
    def _fresh_iteration(self, epoch: int, slot: Slot, mix: MixSnapshot) -> _Iteration:
        return _Iteration(Consumer(slot, epoch, mix.id), mix, resuming.share_of(mix, slot),
                          {n: ReadStats() for n in mix.plans}, {n: Cursor() for n in mix.plans})

    def _options(self, name: str, slot: Slot, snap: Snapshot) -> ReadOptions:
        member = self.members.get(name)
        if member is None:  # a source of a loaded state that left the mix: read with default options
            options, store_for = self._ghost_store(name, [s.url for s in snap.shards[:1]])
        else:
            options, store_for = member.options, member.source.store_for
        return replace(options, equalize=options.equalize and slot.world_size > 1, store_for=store_for)

    def _ghost_store(self, name: str, urls):
        """Options and stores for a source no longer in the mix, whose saved epoch is being finished:
        an object source is read through a store made from the environment (endpoint, credentials)."""
        if name not in self._ghosts:
            from ..storage.backend import make_source

            remote = [u for u in urls if _remote(u)]
            self._ghosts[name] = make_source(remote[:1]).store_for if remote else None
        options = next(iter(self.members.values())).options
        return options, self._ghosts[name]

    def _samples(self, it: _Iteration):
        slot = it.consumer.slot
        names = list(it.snapshot.plans)
        generators, takes = [], []
        for i, name in enumerate(names):
            snap = it.snapshot.plans[name].snapshot
            options = self._options(name, slot, snap)
            g = read_assignment(snap, Assignment(slot, it.share.pieces[i], 0), options, it.stats[name],
                                it.cursors[name])
            generators.append(g)
            takes.append((g.__next__, name))
        try:
            if it.shuffle:
                yield from self._refill(it, names, slot)
            it.order = it.share.order()
            for take, name in [takes[s] for s in it.order[it.position():].tolist()]:  # bound once: per sample,
                try:                                                                  # one call and one store
                    sample = take()
                except StopIteration:
                    it.dry += 1
                    continue
                sample["__source__"] = name
                yield sample
            for g in generators:  # each source's share is taken: let its reader finish (its counters, end time)
                for extra in g:
                    raise RuntimeError(f"{extra.get('__url__')}: a source yielded more samples than its share")
        finally:
            for g in generators:
                g.close()
            record = {"rank": slot.rank, "worker": slot.worker, "dry": it.dry,
                      "sources": {n: it.stats[n].as_dict() | {"left_out": 0} for n in names}}
            self.statedir.write_stats(it.consumer.epoch, slot.rank, slot.worker, record)

    def _refill(self, it: _Iteration, names: list[str], slot: Slot):
        """A checkpointed .shuffle() buffer's samples, read back in the saved order."""
        buffer = [tuple(p) for p in it.shuffle["buffer"]]
        found = {}
        for i, name in enumerate(names):
            positions = [(shard, index) for source, shard, index in buffer if source == i]
            if positions:
                snap = it.snapshot.plans[name].snapshot
                options = self._options(name, slot, snap)
                for position, sample in zip(positions, read_positions(snap, positions, options)):
                    found[(i, *position)] = sample
        for position in buffer:
            sample = found[position]
            sample["__source__"] = names[position[0]]
            yield sample

    def last_position(self) -> tuple[int, int, int] | None:
        """(source index, shard index, sample index) of the sample this consumer yielded last;
        None for padding. Asked by a .shuffle() buffer."""
        it = self._live
        p = it.position() - 1  # asked right after a sample is taken: the position it was yielded at
        if p < 0 or it.order is None:
            return None
        source = int(it.order[p])
        name = list(it.snapshot.plans)[source]
        cursor, pieces = it.cursors[name], it.share.pieces[source]
        piece, offset = cursor.position(it.stats[name])
        if piece >= len(pieces) or offset < 1:
            return None
        got = pieces[piece]
        return source, got.shard, got.start + offset - 1

    # checkpoint and resume (the format: mix/resume.py)
    def fingerprint(self) -> dict:
        return resuming.fingerprint(self.seed, self.shardshuffle, self.partial, self.specs)

    def _state_before_any_epoch(self) -> dict:
        return resuming.make_state(self.fingerprint(), None, None, 1, 1, [])

    def _state_of(self, it: _Iteration, shuffle: dict | None) -> dict:
        slot = it.consumer.slot
        carry = slot.worker == 0
        if self._mix_doc is None or self._mix_doc[:2] != (it.snapshot.id, carry):
            self._mix_doc = (it.snapshot.id, carry, resuming.mix_doc(it.snapshot, carry))
        cursors = {n: it.cursors[n].position(it.stats[n]) for n in it.snapshot.plans}
        saved = resuming.SavedConsumer(slot.rank, slot.worker, it.dry, cursors,
                                       {n: it.stats[n].as_dict() for n in it.snapshot.plans},
                                       it.share if it.explicit else None, shuffle)
        fp = {**self.fingerprint(), "sources": {**self._saved_specs(it.snapshot), **self.specs}}
        return resuming.make_state(fp, it.consumer.epoch, self._mix_doc[2], slot.world_size, slot.num_workers,
                                   [saved.as_dict()])

    def _saved_specs(self, mix: MixSnapshot) -> dict[str, str]:
        """The specs of the sources an epoch reads, those no longer in the mix included."""
        return {n: p.spec for n, p in mix.plans.items()}

    def _merge(self, states: Any) -> dict:
        return resuming.merge(states)

    def _parse(self, state: dict) -> resuming.MixResume | None:
        fp = self.fingerprint()
        if isinstance(state, dict) and state.get("mode") == resuming.MODE and not in_dataloader_worker():
            gone, new = resuming.changed_names(state, fp["sources"])
            if gone:
                log.warning("resuming a mix: source(s) %s of the saved state are no longer in the dataset; the "
                            "interrupted epoch still reads them as saved, the next epochs do not", gone)
            if new:
                log.warning("resuming a mix: source(s) %s are new; they are read from the epoch after the "
                            "interrupted one", new)
        return resuming.parse(state, fp, self._published_snapshot)

    def _saved_snapshot(self, resume: resuming.MixResume) -> MixSnapshot:
        return resume.mix

    def _resumed_iteration(self, resume: resuming.MixResume, epoch: int, slot: Slot) -> _Iteration:
        start = resuming.restart(resume, slot, self.partial)
        names = list(resume.mix.plans)
        stats = {n: read_stats(start.stats[n], ReadStats) if n in start.stats else ReadStats() for n in names}
        cursors = {n: Cursor(*start.cursors.get(n, (0, 0))) for n in names}
        log.info("epoch %d rank %d worker %d: resuming the mix at position %d of %d", epoch, slot.rank, slot.worker,
                 sum(s.yielded + s.padded for s in stats.values()) + start.dry, start.share.samples)
        return _Iteration(Consumer(slot, epoch, resume.mix.id), resume.mix, start.share, stats, cursors, start.dry,
                          start.explicit, start.shuffle)


def _asked(cfg: MixConfig, name: str) -> bool:
    """Whether weights give ``name`` a share that, empty, it gives to the others (under repeat= or a
    concatenation an empty source's count is 0: it has nothing to give)."""
    return cfg.weights is not None and cfg.weights[name] > 0


def _remote(spec: object) -> bool:
    """Whether ``spec`` names objects (the dataset's storage_options are their default)."""
    from ..storage.backend import backend_for

    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    return bool(specs) and not any(backend_for(s).local for s in specs)

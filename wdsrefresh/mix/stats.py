"""What an epoch of a mix read on one rank: an ``EpochStats`` summing its sources, with each
source's own numbers in ``sources[name]``.

Each source's fields are those of a single-source ``EpochStats`` of its snapshot (its diff
against the previous epoch's, and what this rank's consumers met reading it), with ``quota``
this rank's scheduled samples of it, and besides:

- ``spec``: the source as described (``directory '/data/base'``); ``weight``: the share of the
  epoch its weight asks for (None without ``weights=``); ``share``: the share it was given
  (``count / len(mix)``, after an empty source's share went to the others); ``count``: its
  samples in the epoch summed over ranks (n_i); ``delivered``: the real samples (padding left
  out) this rank yielded of it, and ``delivered_share`` their share of this rank's real samples.
- ``repeats``: samples of the epoch beyond its snapshot's size (read a second time or more);
  ``max_reads``: the most times any sample was scheduled (ceil(count / samples)).
- ``rotation_progress``: the fraction of its samples read since its rotation last wrapped
  (after this epoch); ``rotation_cycles``: how many times it wrapped.
- ``empty``: "redistributed" when it held no sample and its share went to the others, "waited"
  when its ``min_shards`` made ``set_epoch`` wait for shards (``resolve_seconds`` holds the
  wait), None otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ..epoch.stats import NAMES_CAP, EpochStats, epoch_stats
from ..epoch.split import slot_range
from ..epoch.slot import Slot
from .plan import taken
from .snapshot import MixSnapshot

_DROPPED = ("epoch", "rank", "world_size", "batches", "loop_seconds", "wait_seconds", "sources", "left_out")
_NAMED = ("added_names", "changed_names", "removed_names", "pending_names", "replaced_names", "deleted_names",
          "corrupt_names")
_REASONS = ("pending_reasons", "rejected_reasons")
_SUMMED_FLOATS = ("read_seconds", "verify_seconds", "resolve_seconds")


def rank_counts(mix: MixSnapshot, rank: int, world_size: int) -> list[int]:
    """Each source's samples in rank ``rank``'s part of the epoch's schedule."""
    counts = list(mix.counts.values())
    lo, hi = slot_range(len(mix), Slot(rank, world_size))
    return [taken(counts, i, hi) - taken(counts, i, lo) for i in range(len(counts))]


def mix_epoch_stats(mix: MixSnapshot, previous: MixSnapshot | None, records: Sequence[dict], *, rank: int,
                    world_size: int, partial: bool, name_of: dict[str, Callable[[str], str]]) -> EpochStats:
    """The EpochStats of ``mix``'s epoch on ``rank`` from the consumers' ``records``."""
    quotas = rank_counts(mix, rank, world_size)
    per_source: dict[str, EpochStats] = {}
    for (name, plan), quota in zip(mix.plans.items(), quotas):
        before = previous.plans[name].snapshot if previous is not None and name in previous.plans else None
        mine = [r["sources"][name] for r in records if name in r.get("sources", {})]
        one = epoch_stats(plan.snapshot, before, mine, rank=rank, world_size=world_size, partial=partial,
                          name_of=name_of.get(name, lambda u: u.rsplit("/", 1)[-1]))
        per_source[name] = dataclasses.replace(one, quota=quota, left_out=0)
    delivered = sum(s.yielded for s in per_source.values())
    sources = {name: _source_fields(mix, name, per_source[name], delivered) for name in mix.plans}
    return _summed(mix, per_source, records, rank, world_size, quotas, sources)


def _source_fields(mix: MixSnapshot, name: str, stats: EpochStats, delivered: int) -> dict:
    plan = mix.plans[name]
    doc = {k: v for k, v in stats.to_dict().items() if k not in _DROPPED}
    size = plan.snapshot.nsamples
    doc.update(
        spec=plan.spec, weight=plan.weight, share=plan.count / len(mix) if len(mix) else 0.0, count=plan.count,
        delivered=stats.yielded, delivered_share=stats.yielded / delivered if delivered else 0.0,
        repeats=plan.repeats, max_reads=-(-plan.count // size) if size else 0,
        rotation_progress=round(plan.rotation.progress(size), 6), rotation_cycles=plan.rotation.cycle,
        empty=plan.empty,
    )
    return doc


def _summed(mix: MixSnapshot, per_source: dict[str, EpochStats], records: Sequence[dict], rank: int,
            world_size: int, quotas: list[int], sources: dict) -> EpochStats:
    values: dict = {}
    for f in dataclasses.fields(EpochStats):
        if f.name in _DROPPED or f.name == "snapshot_id":
            continue
        got = [(name, getattr(s, f.name)) for name, s in per_source.items()]
        if f.name in _NAMED:
            values[f.name] = tuple(sorted(f"{n}:{v}" for n, vs in got for v in vs)[:NAMES_CAP])
        elif f.name in _REASONS:
            values[f.name] = tuple(sorted((f"{n}:{k}", why) for n, vs in got for k, why in vs)[:NAMES_CAP])
        elif f.name == "lag_seconds":
            lags = [v for _, v in got if v is not None]
            values[f.name] = min(lags) if lags else None
        elif f.name in _SUMMED_FLOATS:
            known = [v for _, v in got if v is not None]
            values[f.name] = float(sum(known)) if known else None
        elif f.type in ("int", int):
            values[f.name] = sum(v for _, v in got)
    starts, ends = [], []
    for r in records:
        for doc in r.get("sources", {}).values():
            if doc.get("started") and doc.get("ended"):
                starts.append(doc["started"])
                ends.append(doc["ended"])
    seconds = max(ends) - min(starts) if starts else None
    values.update(epoch=mix.epoch, rank=rank, world_size=world_size, snapshot_id=mix.id, consumers=len(records),
                  quota=sum(quotas), left_out=mix.left_out, seconds=seconds,
                  samples_per_second=(values["yielded"] + values["padded"]) / seconds if seconds else None,
                  sources=sources)
    return EpochStats(**values)

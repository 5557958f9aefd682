"""What an epoch read, on one rank: ``EpochStats``, and every rank's, gathered.

``EpochStats`` joins two sources: the epoch's snapshot compared with the one before it (what
the producers did between the two epochs: the same on every rank), and the counters each
consumer (DataLoader worker) of this rank wrote to the state directory when it finished its
share (what reading met: shards replaced or deleted under it, bytes, seconds). ``wr.timed``
(``observe/timed.py``) adds how long the training loop waited for batches.

Export: ``EpochStats.to_dict()`` (plain JSON values); ``gather`` collects every rank's stats
over torch.distributed. How they leave the process is ``observe/``: ``stats.jsonl``
(``stats_log.py``) and TensorBoard (``tensorboard.py``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.snapshot import ShardInfo, Snapshot
from .split import rank_quota

NAMES_CAP = 20  # names kept per list; the count next to a list is always complete


@dataclass(frozen=True)
class EpochStats:
    """What epoch ``epoch`` read on rank ``rank``.

    Field names say what they count: ``shards`` and the plain names (``added``, ``changed``,
    ``removed``, ``pending``, ``rejected``, ``replaced``, ``deleted``, ``corrupt``) count
    shard files; ``samples`` and every ``*_samples`` field count samples; ``*_names`` list
    shard names (relative to the source's directory), sorted, at most ``NAMES_CAP`` of them.

    The snapshot, compared with the previous epoch's (the same on every rank):

    - ``shards``, ``samples``, ``shard_bytes``: shards in the snapshot, the samples they hold
      (``len(snapshot)``) and their size in bytes.
    - ``added`` / ``added_samples``: shards in this snapshot whose name was not in the previous
      one, and their samples. Every shard of the first epoch is added.
    - ``changed`` / ``changed_samples``: shards whose name was in the previous snapshot with
      other content (digest; size, mtime and inode when digests are off): replaced or rewritten
      between the two epochs; their samples now.
    - ``removed`` / ``removed_samples``: shards of the previous snapshot missing from this one,
      and the samples they held.
    - ``pending``: files named like shards that were not ready when the snapshot was resolved
      (still open for writing, incomplete, or written in place with no sign that the writer is
      done): read once they are; ``pending_reasons`` says why each waits (``(name, reason)``
      pairs). ``rejected`` / ``rejected_reasons``: files left out because they cannot be read as
      shards (junk, truncated), each with the reason (``(name, reason)`` pairs).
    - ``resolve_seconds``: how long resolving the snapshot took (on the process that resolved
      it: rank 0 under torch.distributed), including any wait for ``min_shards``.
    - ``lag_seconds``: the age of the newest shard (its mtime) when the snapshot was resolved:
      how far behind the producers this epoch reads. None when unknown.

    This rank's consumers (from the counters each wrote when it finished its share):

    - ``consumers``: how many consumers (DataLoader workers, or 1) reported.
    - ``quota``: the samples this rank is to yield this epoch (``ds.epoch_length(epoch)``).
    - ``yielded``: samples read and yielded; ``padded``: samples repeated to keep ranks equal
      (marked ``__padded__``); ``skipped``: samples of the share that were not yielded
      (shards deleted, replaced under ``on_change="skip"``, corrupt with a handler that goes on).
    - ``left_out``: samples of the snapshot no rank reads this epoch (``total % world_size``,
      unless ``partial=True``); the same on every rank.
    - ``replaced``, ``deleted``, ``corrupt``: shards that were replaced, deleted, or found
      corrupt *while* this epoch read them (after its snapshot), as handled by ``on_change``
      and ``handler``. A shard replaced between epochs is ``changed`` in the next epoch instead.
    - ``grown_samples``: samples that shards replaced while this epoch read them hold beyond what
      the snapshot counted (``on_change="reload"`` reads the new content up to the snapshot's
      count: the split has no place for more); the next epoch reads them. Counted once per shard.
    - ``bytes_read``: bytes the consumers' read calls returned (objects in a store: the bytes of
      the blocks fetched for them). ``read_seconds``: seconds they spent blocked in those calls
      (I/O; objects: waiting for blocks, so fetches that read-ahead overlapped with parsing cost
      none). ``verify_seconds``: seconds spent hashing bytes to check digests. Each is a sum
      over consumers (workers run in parallel, so the sums can exceed ``seconds``); measured per
      read call and per checked chunk (objects: per block), never per sample.
    - ``seconds``: wall-clock seconds from the first consumer starting its share to the last
      one finishing it (None if none finished); ``samples_per_second``: ``(yielded + padded) /
      seconds``. Workers wait while the loader's prefetch queue is full, so this is the rate at
      which the rank took samples; what reading costs is ``read_seconds`` and ``verify_seconds``.

    The training loop, when it iterated ``wr.timed(loader)`` (else None):

    - ``batches``: items the loader gave; ``loop_seconds``: wall-clock seconds of the loop;
      ``wait_seconds``: the part of them spent waiting for the loader's next item (the rest is
      the training step). ``wait_share`` is their ratio.

    A mix of sources (``wr.RefreshingWebDataset({name: source, ...})``): the fields above sum
    its sources (names prefixed ``source:``), ``snapshot_id`` is the MixSnapshot's and
    ``left_out`` what the epoch's total lost to rounding to the world size; ``sources`` holds
    each source's own fields by name (plain values; ``wdsrefresh/mix/stats.py`` says what they are).
    """

    epoch: int
    rank: int = 0
    world_size: int = 1
    snapshot_id: str = ""
    shards: int = 0
    samples: int = 0
    shard_bytes: int = 0
    added: int = 0
    added_samples: int = 0
    added_names: tuple[str, ...] = ()
    changed: int = 0
    changed_samples: int = 0
    changed_names: tuple[str, ...] = ()
    removed: int = 0
    removed_samples: int = 0
    removed_names: tuple[str, ...] = ()
    pending: int = 0
    pending_names: tuple[str, ...] = ()
    pending_reasons: tuple[tuple[str, str], ...] = ()
    rejected: int = 0
    rejected_reasons: tuple[tuple[str, str], ...] = ()
    resolve_seconds: float | None = None
    lag_seconds: float | None = None
    consumers: int = 0
    quota: int = 0
    yielded: int = 0
    padded: int = 0
    skipped: int = 0
    left_out: int = 0
    replaced: int = 0
    replaced_names: tuple[str, ...] = ()
    deleted: int = 0
    deleted_names: tuple[str, ...] = ()
    corrupt: int = 0
    corrupt_names: tuple[str, ...] = ()
    grown_samples: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    verify_seconds: float = 0.0
    seconds: float | None = None
    samples_per_second: float | None = None
    batches: int | None = None
    loop_seconds: float | None = None
    wait_seconds: float | None = None
    sources: dict = field(default_factory=dict)  # a mix's sources: name -> that source's fields

    @property
    def wait_share(self) -> float | None:
        """The share of the training loop's time spent waiting for data (None without ``wr.timed``)."""
        if self.wait_seconds is None or not self.loop_seconds:
            return None
        return self.wait_seconds / self.loop_seconds

    def to_dict(self) -> dict:
        """Plain JSON values: lists for the name tuples, ``*_reasons`` as {name: reason},
        seconds rounded to microseconds. ``EpochStats.from_dict`` reads it back."""
        doc: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _REASONS:
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, float):
                value = round(value, 6)
            doc[f.name] = value
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> EpochStats:
        """The EpochStats ``to_dict`` gave; fields it does not know are ignored, missing ones default."""
        kinds = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in doc.items():
            if key not in kinds:
                continue
            if key in _REASONS:
                value = tuple((str(k), str(v)) for k, v in (value.items() if isinstance(value, dict) else value))
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return cls(**values)


_REASONS = ("pending_reasons", "rejected_reasons")  # (name, reason) pairs, {name: reason} in JSON

# --------------------------------------------------------------------------- building


def _capped(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(names)[:NAMES_CAP])


def _capped_reasons(reasons: Iterable[tuple[str, str]], name_of) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name_of(url), why) for url, why in reasons))[:NAMES_CAP]


def _same_content(a: ShardInfo, b: ShardInfo) -> bool:
    if a.digest and b.digest:
        return a.digest == b.digest
    return (a.size, a.mtime_ns, a.inode, a.nsamples) == (b.size, b.mtime_ns, b.inode, b.nsamples)


def shard_name(shard: ShardInfo) -> str:
    return shard.name or os.path.basename(shard.url)


def epoch_stats(snapshot: Snapshot, previous: Snapshot | None, records: Sequence[dict], *, rank: int,
                world_size: int, partial: bool, name_of: Callable[[str], str] = os.path.basename,
                loop: dict | None = None) -> EpochStats:
    """The EpochStats of ``snapshot``'s epoch on ``rank``, from the snapshot before it and the
    consumers' ``records`` (ReadStats.as_dict() of each); ``name_of`` names a file by its url
    (for files the snapshot has no entry for: pending, rejected); ``loop`` is what ``timed`` saw."""
    now = {s.url: s for s in snapshot.shards}
    before = {s.url: s for s in previous.shards} if previous is not None else {}
    added = [s for u, s in now.items() if u not in before]
    changed = [s for u, s in now.items() if u in before and not _same_content(s, before[u])]
    removed = [s for u, s in before.items() if u not in now]
    names = {u: shard_name(s) for u, s in (before | now).items()}

    def named(urls: set[str]) -> tuple[str, ...]:
        return _capped(names.get(u) or name_of(u) for u in urls)

    def urls(key: str) -> set[str]:
        return set().union(*(r.get(key, ()) for r in records))

    def total(key: str):
        return sum(r.get(key, 0) for r in records)

    read_time = {k: urls(k) for k in ("replaced", "deleted", "corrupt")}
    grown: dict[str, int] = {}
    for r in records:  # two consumers that reloaded one shard saw the same samples beyond the snapshot
        for url, n in r.get("grown", {}).items():
            grown[url] = max(grown.get(url, 0), n)
    quota, left_out = rank_quota(snapshot.nsamples, rank, world_size, partial)
    starts = [r["started"] for r in records if r.get("started") and r.get("ended")]
    ends = [r["ended"] for r in records if r.get("started") and r.get("ended")]
    seconds = max(ends) - min(starts) if starts else None
    yielded, padded = total("yielded"), total("padded")
    loop = loop or {}
    return EpochStats(
        epoch=snapshot.epoch, rank=rank, world_size=world_size, snapshot_id=snapshot.id,
        shards=len(snapshot.shards), samples=snapshot.nsamples, shard_bytes=snapshot.nbytes,
        added=len(added), added_samples=sum(s.nsamples or 0 for s in added),
        added_names=_capped(shard_name(s) for s in added),
        changed=len(changed), changed_samples=sum(s.nsamples or 0 for s in changed),
        changed_names=_capped(shard_name(s) for s in changed),
        removed=len(removed), removed_samples=sum(s.nsamples or 0 for s in removed),
        removed_names=_capped(shard_name(s) for s in removed),
        pending=len(snapshot.pending), pending_names=_capped(name_of(u) for u in snapshot.pending),
        pending_reasons=_capped_reasons(snapshot.pending_reasons.items(), name_of),
        rejected=len(snapshot.rejected),
        rejected_reasons=_capped_reasons(snapshot.rejected, name_of),
        resolve_seconds=snapshot.resolve_seconds if snapshot.resolved_at else None, lag_seconds=snapshot.lag,
        consumers=len(records), quota=quota, yielded=yielded, padded=padded, skipped=total("skipped"),
        left_out=left_out,
        replaced=len(read_time["replaced"]), replaced_names=named(read_time["replaced"]),
        deleted=len(read_time["deleted"]), deleted_names=named(read_time["deleted"]),
        corrupt=len(read_time["corrupt"]), corrupt_names=named(read_time["corrupt"]),
        grown_samples=sum(grown.values()),
        bytes_read=total("bytes_read"), read_seconds=float(total("read_seconds")),
        verify_seconds=float(total("verify_seconds")),
        seconds=seconds, samples_per_second=(yielded + padded) / seconds if seconds else None,
        batches=loop.get("batches"), loop_seconds=loop.get("seconds"), wait_seconds=loop.get("wait_seconds"),
    )


def gather(stats: EpochStats) -> list[EpochStats]:
    """Every rank's stats, in rank order (a collective: call it in every rank's main process).
    Without torch.distributed, ``[stats]``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [stats]
    docs: list = [None] * dist.get_world_size()
    dist.all_gather_object(docs, stats.to_dict())
    return [EpochStats.from_dict(d) for d in docs]

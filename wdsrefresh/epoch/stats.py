"""What an epoch read, on one rank: ``EpochStats``, and how it leaves the process.

``EpochStats`` joins two sources: the epoch's snapshot compared with the one before it (what
the producers did between the two epochs: the same on every rank), and the counters each
consumer (DataLoader worker) of this rank wrote to the state directory when it finished its
share (what reading met: shards replaced or deleted under it, bytes, seconds). ``wr.timed``
adds how long the training loop waited for batches.

Export: ``EpochStats.to_dict()`` (plain JSON values); ``StatsLog`` appends one JSON line per
epoch to ``stats.jsonl`` (the dataset's ``stats_dir=``); ``log_stats`` writes the numbers to a
TensorBoard ``SummaryWriter``; ``gather`` collects every rank's stats over torch.distributed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.snapshot import ShardInfo, Snapshot
from .split import rank_quota

log = logging.getLogger("wdsrefresh")

NAMES_CAP = 20  # names kept per list; the count next to a list is always complete
STATS_FILE = "stats.jsonl"


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


# --------------------------------------------------------------------------- stats.jsonl


class StatsLog:
    """``DIR/stats.jsonl``: one JSON line (``EpochStats.to_dict()``) per epoch and rank.

    Every rank's main process appends to the same file: each line is one ``write`` on a
    descriptor opened with O_APPEND, under an fcntl lock (which NFS honours), so lines from
    several ranks never interleave.
    """

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, STATS_FILE)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exn:
            raise OSError(exn.errno, f"stats_dir {self.directory}: {exn.strerror}") from None

    def append(self, stats: EpochStats) -> None:
        line = (json.dumps(stats.to_dict(), separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exn:
            raise OSError(exn.errno, f"{self.path}: cannot append the stats of epoch {stats.epoch}: "
                                     f"{exn.strerror}") from None


def read_jsonl(path: str) -> list[EpochStats]:
    """The EpochStats lines of ``path`` (a stats.jsonl, or a directory holding one), in file order.
    Raises ValueError naming the file and line for a line that is not a JSON object."""
    if os.path.isdir(path):
        path = os.path.join(path, STATS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: give a stats_dir= directory or its {STATS_FILE}")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exn:
                raise ValueError(f"{path}: line {number}: not JSON ({exn})") from None
            if not isinstance(doc, dict) or "epoch" not in doc:
                raise ValueError(f"{path}: line {number}: not an epoch's stats (no 'epoch')")
            out.append(EpochStats.from_dict(doc))
    return out


class StatsRecorder:
    """The main process's side of ``stats_dir=`` and ``wr.timed``: the training loop's timing
    per epoch, and each epoch's line in ``stats.jsonl``.

    An epoch's line is appended once, at the first of: ``flush`` after it (the next
    ``set_epoch``, ``close()``), the end of the recorder (the last dataset sharing it garbage
    collected) or interpreter exit; with every field known then. ``source`` is the dataset's
    EpochSource, never the dataset itself, so the hook keeps no dataset alive. Lives in the
    dataset; workers' copies write nothing.
    """

    def __init__(self, stats_dir: str | None, source: Any = None):
        self.log = StatsLog(stats_dir) if stats_dir is not None else None
        self.logged: set[int] = set()
        self.loops: dict[int, dict] = {}
        self.source = source
        if self.log is not None and source is not None:
            # created after the source's own finalizer (its state directory's removal), so at
            # exit it runs first: finalizers run newest first
            weakref.finalize(self, _flush_at_end, self.log, source, self.loops, self.logged)

    def record_loop(self, epoch: int, batches: int, seconds: float, wait_seconds: float) -> None:
        """Adds one pass of a timed loop to ``epoch``'s (several passes in one epoch add up)."""
        loop = self.loops.setdefault(epoch, {"batches": 0, "seconds": 0.0, "wait_seconds": 0.0})
        loop["batches"] += batches
        loop["seconds"] += seconds
        loop["wait_seconds"] += wait_seconds
        for old in sorted(self.loops)[:-16]:
            del self.loops[old]

    def joined(self, stats: EpochStats) -> EpochStats:
        """``stats`` with what the timed loop saw of its epoch, if it saw it."""
        return with_loop(stats, self.loops)

    def flush(self, before: int | None = None) -> None:
        """Appends the line of each published epoch not logged yet (only those < ``before``)."""
        if self.log is not None and self.source is not None:
            _flush(self.log, self.source, self.loops, self.logged, before)


def with_loop(stats: EpochStats, loops: dict[int, dict]) -> EpochStats:
    """``stats`` with the timed loop's pass over its epoch (``loops``: per epoch), if any."""
    loop = loops.get(stats.epoch)
    if loop is None:
        return stats
    return dataclasses.replace(stats, batches=loop["batches"], loop_seconds=loop["seconds"],
                               wait_seconds=loop["wait_seconds"])


def _flush(stats_log: StatsLog, source: Any, loops: dict[int, dict], logged: set[int],
           before: int | None = None) -> None:
    if os.getpid() != source.statedir.owner_pid:
        return  # a worker's copy: the main process logs
    for epoch in sorted(source.statedir.published_epochs()):
        if epoch in logged or (before is not None and epoch >= before):
            continue
        stats_log.append(with_loop(source.stats(epoch), loops))
        logged.add(epoch)


def _flush_at_end(stats_log: StatsLog, source: Any, loops: dict[int, dict], logged: set[int]) -> None:
    try:
        _flush(stats_log, source, loops, logged)
    except Exception as exn:  # at exit or in garbage collection: nobody to raise to
        log.warning("%s: the stats lines of the last epochs were not written: %s", stats_log.path, exn)


# --------------------------------------------------------------------------- the training loop


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


# --------------------------------------------------------------------------- TensorBoard


SCALARS = (
    "shards", "samples", "shard_bytes", "added", "added_samples", "changed", "changed_samples", "removed",
    "removed_samples", "pending", "rejected", "resolve_seconds", "lag_seconds", "quota", "yielded", "padded",
    "skipped", "left_out", "replaced", "deleted", "corrupt", "bytes_read", "read_seconds", "verify_seconds",
    "seconds", "samples_per_second", "batches", "loop_seconds", "wait_seconds", "wait_share",
)


def log_stats(writer: Any, stats: EpochStats | Sequence[EpochStats], step: int | None = None,
              prefix: str = "wdsrefresh") -> int:
    """Writes the numbers of ``stats`` as scalars to a TensorBoard ``SummaryWriter`` (from
    ``torch.utils.tensorboard``, which needs the ``tensorboard`` package: ``pip install
    wdsrefresh[tensorboard]``) at ``step`` (default: the epoch). Tags are ``PREFIX/FIELD``, or
    ``PREFIX/rankR/FIELD`` for a list of every rank's stats (``ds.stats(epoch, all_ranks=True)``).
    Fields that are None (not measured) are left out; a mix's sources write theirs under
    ``.../source/NAME/FIELD``. Returns the number of scalars written."""
    many = not isinstance(stats, EpochStats)
    written = 0
    for one in (stats if many else [stats]):
        base = f"{prefix}/rank{one.rank}" if many else prefix
        for name in SCALARS:
            value = getattr(one, name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            writer.add_scalar(f"{base}/{name}", value, one.epoch if step is None else step)
            written += 1
        for source, fields in one.sources.items():  # a mix: each source's numbers under its name
            for name, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                    writer.add_scalar(f"{base}/source/{source}/{name}", value, one.epoch if step is None else step)
                    written += 1
    return written

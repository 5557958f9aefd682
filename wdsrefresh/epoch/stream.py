"""Stream mode: a never-ending iterator over the shards of a directory, as they land.

Every consumer (one per rank x DataLoader worker) watches the directory itself (inotify
started in the consumer's own process, or a poll every ``poll`` seconds) and reads each
shard that rendezvous hashing of the shard's name over all consumers gives it, once, as soon
as the shard is ready: a complete tar that did not change while it was indexed (the same
test the epoch resolver applies). Every shard is thus read exactly once across consumers,
with no coordination beyond knowing how many consumers there are. Consumers sleep in
``select`` (or between polls) when nothing is new.

The latency from a shard's arrival (its inode change time: the rename into the directory,
or the last write of a shard written in place) to its first sample being yielded is
recorded per consumer; ``StreamSource.stats()`` gathers it. ``close()`` ends the stream:
each consumer finishes the shard it is reading and stops.

Use ``DataLoader(..., in_order=False)``: consumers get unequal shares of a stream, and an
in-order loader waits on a worker with nothing new while another worker's samples queue up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import threading
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import resume as resuming
from ..storage.backend import make_source
from ..format.atomic import write_atomic
from ..core.candidate import Pending, Rejected
from ..storage.local import Change, DirectorySource, Watcher, WriterSignals, poll_interval, watch_or_poll
from ..core.options import ReadOptions
from .reading import ReadStats, read_shard
from ..storage.resolver import Resolver
from .feed import Consumer
from .slot import Slot, current_slot, dist_info, loader_exit_event
from ..core.snapshot import FileId, ShardInfo, Snapshot
from ..storage.source import NoShardsError
from .statedir import StateDirectory

log = logging.getLogger("wdsrefresh")

DEFAULT_STREAM_POLL = 0.2
DEFAULT_STREAM_RESCAN = 30.0
_KEEP_LATENCIES = 10000
_CONTROL = "stream"
_STOP = "stop"
_LOADER_EXIT_CHECK = 0.2  # seconds a sleeping worker takes to see its loader shut down


def owner(name: str, consumers: int) -> int:
    """The consumer (0 <= c < consumers) that reads shard ``name``: rendezvous hashing."""
    best, winner = b"", 0
    for c in range(consumers):
        h = hashlib.blake2b(f"{c}\0{name}".encode(), digest_size=8).digest()
        if h > best:
            best, winner = h, c
    return winner


@dataclass(frozen=True)
class StreamStats:
    """What the stream's consumers on this node have read so far."""

    consumers: int
    shards: int
    samples: int
    pending: int
    rejected: int
    replaced: int
    deleted: int
    corrupt: int
    latencies: tuple[float, ...]  # seconds from a shard's arrival to its first sample, per shard

    @property
    def median_latency(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None

    def latency(self, percent: float) -> float | None:
        """The ``percent``-th percentile (0 to 100, nearest rank) of the seconds from a shard's
        arrival to its first sample; None before any shard was read."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        rank = max(1, -(-len(ordered) * percent // 100))  # ceil, at least the first
        return ordered[int(rank) - 1]

    def to_dict(self) -> dict:
        """The counts, and latency percentiles (p50, p90, p99, max) instead of every latency."""
        doc = {k: v for k, v in asdict(self).items() if k != "latencies"}
        for name, percent in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
            value = self.latency(percent)
            doc[f"latency_{name}"] = None if value is None else round(value, 6)
        return doc


class StreamSource:
    """The first pipeline stage of ``mode="stream"``: yields samples forever, shard by shard."""

    def __init__(self, source: Any, *, options: ReadOptions, state_dir: str | None = None,
                 poll: bool | float = False, seed: int = 0, rescan_interval: float = DEFAULT_STREAM_RESCAN,
                 equal_ranks: bool = True):
        self.source = make_source(source)
        if self.source.directory is None:
            raise ValueError(f'mode="stream" reads a local directory (it follows file events), not '
                             f'{self.source.describe()}: other sources are read with mode="epoch", which '
                             f'lists them again at every epoch')
        self.options = replace(options, equalize=False)
        self.seed = seed
        self.poll = poll
        self.poll_interval = poll_interval(poll, DEFAULT_STREAM_POLL)
        self.rescan_interval = rescan_interval
        self.statedir = StateDirectory(state_dir)
        os.makedirs(self.statedir.path(_CONTROL), exist_ok=True)
        rank, world_size = dist_info()
        if world_size > 1 and equal_ranks:
            self.statedir.cleanup()
            raise ValueError(
                f'mode="stream" under torch.distributed ({world_size} ranks): each rank reads the shards that land '
                f"for it, so ranks get unequal numbers of samples and a DDP step would hang at the end. "
                f"Wrap the training loop in torch.distributed.algorithms.Join and pass equalize=False to say so, "
                f'or use mode="epoch" (equal per rank)')
        self.statedir.set_control(0, rank, world_size, bump=False)
        self.current: Consumer | None = None
        self._loop: _StreamLoop | None = None
        self._resume: resuming.StreamResume | None = None
        self.lock = threading.Lock()  # the consumer's position, asked while a stage pulls in a thread
        self.tracks_transit = False  # set by a stage that takes each sample's position (batching.py)
        weakref.finalize(self, self.statedir.cleanup)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    # main process
    def set_epoch(self, epoch: int) -> Snapshot:
        raise RuntimeError('mode="stream" has no epochs: consumers read shards as they land')

    def snapshot(self, epoch: int | None = None) -> Snapshot | None:
        return None  # a stream has no snapshots

    watching = None  # each consumer watches the directory itself

    def close(self) -> None:
        """Ends the stream: every consumer stops after the shard it is reading."""
        path = os.path.join(self.statedir.path(_CONTROL), _STOP)
        if os.path.isdir(os.path.dirname(path)):
            write_atomic(path, b"stop\n")

    def stats(self, epoch: int | None = None) -> StreamStats:
        """Totals over this rank's consumers, from what each wrote after its latest shard."""
        names = sorted(n for n in os.listdir(self.statedir.directory)
                       if n.startswith("stream-stats-") and n.endswith(".json"))
        records = [r for r in (self.statedir.read_json(n, {}) for n in names) if r]
        if self._loop is not None:  # read in this process (no workers): its counts as of now
            mine = self._loop.record()
            records = [r for r in records if (r["rank"], r["worker"]) != (mine["rank"], mine["worker"])] + [mine]
        total = lambda key: sum(r.get(key, 0) for r in records)  # noqa: E731
        return StreamStats(
            consumers=len(records), shards=total("shards"), samples=total("samples"), pending=total("pending"),
            rejected=total("rejected"), replaced=total("replaced"), deleted=total("deleted"),
            corrupt=total("corrupt"), latencies=tuple(x for r in records for x in r.get("latencies", ())),
        )

    def last_position(self) -> None:
        return None  # stream positions are not checkpointed yet

    def shuffle_resume(self) -> tuple[None, None]:
        return None, None

    def take_in_transit(self) -> tuple[str, int] | None:
        """(shard name, sample index) of the sample yielded last, no longer in transit once taken:
        a .batched() stage holding it then names it. Call under ``lock``."""
        return self._loop.take_in_transit() if self._loop is not None else None

    def state_dict(self, shuffle: dict | None = None, held: list | None = None) -> dict:
        """This consumer's place in the stream: the shards it finished and how far it is into the
        one it reads (names below the directory). A resume on any layout skips the finished
        shards, continues the started ones where they stopped, and reads the rest. ``held`` are
        the positions of samples a later stage took in and did not yield: they are read again."""
        if shuffle is not None:
            raise RuntimeError('state_dict(): mode="stream" cannot checkpoint a .shuffle() buffer yet')
        loop = self._loop
        with self.lock:
            consumer = {"done": [], "reading": {}} if loop is None else loop.position(held or [])
        if loop is not None:
            consumer |= {"rank": loop.slot.rank, "worker": loop.slot.worker}
        return resuming.stream_state(self.source.describe(), [consumer])

    def load_state_dict(self, state: Any) -> None:
        """Makes the next iteration skip what ``state`` (one consumer's or several) read."""
        self._resume = resuming.parse_stream(state, self.source.describe())

    # each consumer
    def prepare(self) -> None:
        pass

    def __call__(self) -> Iterator[dict]:
        control = self.statedir.control()
        slot = current_slot(control["rank"], control["world_size"])
        self.current = Consumer(slot, 0, "stream")
        self._loop = _StreamLoop(self, slot, self._resume)
        return self._loop.samples()


class _StreamLoop:
    """One consumer's loop: look at new or changed names, read its ready shards, sleep."""

    def __init__(self, stream: StreamSource, slot: Slot, resume: resuming.StreamResume | None = None):
        self.stream = stream
        self.slot = slot
        self.source: DirectorySource = stream.source
        # names below the directory: read whole, and how far into each started one
        self.finished: set[str] = set(resume.done) if resume else set()
        self.started: dict[str, int] = dict(resume.reading) if resume else {}
        self.control = stream.statedir.path(_CONTROL)
        self.resolver = Resolver(stream.source, stream.options.readiness)
        self.taken: set[str] = set()  # urls handed to _read in this run
        # mine, not ready (or rejected): url -> (version looked at, when to look again if unchanged)
        self.waiting: dict[str, tuple[FileId, float]] = {}
        self.signals = WriterSignals()  # this consumer's files renamed into place or closed, not written since
        self.rejected: set[str] = set()
        self.totals: dict[str, int | set] = {}  # ReadStats summed over shards (counts, or sets of urls)
        self.shards = 0
        self.latencies: list[float] = []
        self.lock = stream.lock  # position() may be asked from another thread (see batching.py)
        self.in_transit: tuple[str, int] | None = None  # the sample yielded last, until a stage takes it
        self.reading: tuple[ShardInfo, int, ReadStats] | None = None  # the shard being read: where it started
        self.loader_exit = loader_exit_event()

    def stopped(self) -> bool:
        if self.loader_exit is not None and self.loader_exit.is_set():
            return True
        return not os.path.isdir(self.control) or os.path.exists(os.path.join(self.control, _STOP))

    def samples(self) -> Iterator[dict]:
        watcher, _reason = watch_or_poll(self.source.path, poll=self.stream.poll,
                                         what=f"stream consumer {self.slot.index}")
        if watcher is not None:
            watcher.add(self.control)
        next_listing = 0.0
        try:
            while not self.stopped():
                now = time.monotonic()
                if watcher is None or now >= next_listing:
                    if watcher is not None:
                        watcher.read()  # the listing below covers them
                    look = self._listing()
                    next_listing = now + self.stream.rescan_interval
                else:
                    changes = watcher.read()
                    if any(c.path is None for c in changes):
                        next_listing = 0.0
                        continue
                    look = self._settled_shards(changes)
                    look.update(self.waiting)
                for url in sorted(look):
                    if self.stopped():
                        return
                    shard = self._ready(url)
                    if shard is not None:
                        yield from self._read(*shard)
                        self._write_stats()
                self._sleep(watcher, next_listing)
        finally:
            if watcher is not None:
                watcher.close()
            self._write_stats()

    def _settled_shards(self, changes: list[Change]) -> set[str]:
        inside = [c for c in changes if c.path.startswith(self.source.path)]
        for c in inside:
            if self._mine(c.path):
                self.signals.record(c.path, c.kind)
        return {c.path for c in inside if c.settled}

    def _listing(self) -> set[str]:
        try:
            return {c.url for c in self.source.candidates()}
        except NoShardsError:
            return set()

    def _sleep(self, watcher: Watcher | None, next_listing: float) -> None:
        if self.stopped():  # its event may have been read with the others: look before sleeping
            return
        if watcher is None:
            if self.loader_exit is None:
                time.sleep(self.stream.poll_interval)
            else:
                self.loader_exit.wait(self.stream.poll_interval)
            return
        timeout = max(0.0, next_listing - time.monotonic())
        if self.waiting:  # shards being written in place send no event once done: look again soon
            timeout = min(timeout, 1.0)
        select.select([watcher.fileno()], [], [], self._awake(timeout))

    def _awake(self, timeout: float) -> float:
        """``timeout``, shortened in a DataLoader worker so that its loader's shutdown is seen."""
        return timeout if self.loader_exit is None else min(timeout, _LOADER_EXIT_CHECK)

    def _mine(self, url: str) -> bool:
        if url in self.taken or not self.source.would_list(url):
            return False
        name = os.path.relpath(url, self.source.path)
        return name not in self.finished and owner(name, self.slot.count) == self.slot.index

    def position(self, held: list) -> dict:
        """What this consumer read, less the samples still ``held`` by later stages or in transit
        to them (positions (shard name, index)). Call under the stream's lock."""
        done, reading = set(self.finished), dict(self.started)
        for name, index in [p for p in held + [self.in_transit] if p is not None]:
            done.discard(name)
            reading[name] = min(reading.get(name, index), index)
        return {"done": sorted(done), "reading": reading}

    def take_in_transit(self) -> tuple[str, int] | None:
        position, self.in_transit = self.in_transit, None
        return position

    def _ready(self, url: str) -> tuple[ShardInfo, float] | None:
        """The shard at ``url`` and its arrival time, if it is this consumer's, unread, and ready."""
        if not self._mine(url):
            return None
        try:
            st = os.stat(url)
        except FileNotFoundError:
            self.waiting.pop(url, None)
            return None
        looked = self.waiting.get(url)
        seen = self.signals.get(url)
        if looked is not None and looked[0] == FileId.of(st) and time.time() < looked[1] and seen is None:
            return None  # looked at in this version already, and only time can make it ready
        outcome = self.resolver.probe(self.source.candidate(url), st=st, seen=seen)
        if outcome is None:
            self.waiting.pop(url, None)
            return None
        if isinstance(outcome, Rejected):
            self.waiting[url] = (FileId.of(st), float("inf"))
            self._reject(url, outcome.error)
            return None
        if isinstance(outcome, Pending):
            again = st.st_mtime_ns / 1e9 + self.stream.options.settle if outcome.timed else 0.0
            self.waiting[url] = (FileId.of(st), again)
            return None
        self.waiting.pop(url, None)
        self.rejected.discard(url)
        self.signals.forget(url)
        self.taken.add(url)
        self.resolver.known.clear()  # read once; nothing to reuse
        return outcome.info, st.st_ctime

    def _reject(self, url: str, error: BaseException) -> None:
        self.rejected.add(url)
        handler = self.stream.options.handler
        if handler is None or not handler(error):
            raise error
        log.warning("stream: shard left out: %s", error)

    def _read(self, info: ShardInfo, arrival: float) -> Iterator[dict]:
        stats = ReadStats()
        name = os.path.relpath(info.url, self.source.path)
        start = self.started.get(name, 0)
        self.reading = (info, start, stats)
        first = True
        for sample in read_shard(info, self.stream.options, stats, start=start):
            if first:
                first = False
                self.latencies.append(max(0.0, time.time() - arrival))
                del self.latencies[:-_KEEP_LATENCIES]
            with self.lock:
                self.started[name] = start + stats.yielded
                if self.stream.tracks_transit:
                    self.in_transit = (name, start + stats.yielded - 1)
            yield sample
        with self.lock:
            self.started.pop(name, None)
            self.finished.add(name)
        self.reading = None
        self.shards += 1
        self.totals = _summed(self.totals, stats)

    def record(self) -> dict:
        """This consumer's counts so far, the shard it is reading included."""
        totals, shards = self.totals, self.shards
        if self.reading is not None:  # a loader without workers may stop right after a shard's last sample
            info, start, stats = self.reading
            totals = _summed(totals, stats)
            shards += start + stats.yielded >= info.nsamples
        count = lambda key: len(v) if isinstance(v := totals.get(key, 0), set) else v  # noqa: E731
        return {
            "rank": self.slot.rank, "worker": self.slot.worker, "shards": shards,
            "samples": count("yielded"), "pending": len(self.waiting) - len(self.rejected),
            "rejected": len(self.rejected), "replaced": count("replaced"), "deleted": count("deleted"),
            "corrupt": count("corrupt"), "latencies": [round(x, 6) for x in self.latencies],
        }

    def _write_stats(self) -> None:
        try:
            self.stream.statedir.write_json(f"stream-stats-{self.slot.rank}-{self.slot.worker}.json", self.record())
        except OSError:  # the state directory is gone: the dataset was closed
            pass


def _summed(totals: dict, stats: ReadStats) -> dict:
    """``totals`` with one shard's ReadStats added: counts summed, url lists as sets."""
    out = dict(totals)
    for key, value in stats.as_dict().items():
        if isinstance(value, list):
            out[key] = out.get(key, set()) | set(value)
        elif isinstance(value, dict):  # per shard (``grown``): a shard read again counts once
            out[key] = out.get(key, {}) | value
        else:
            out[key] = out.get(key, 0) + value
    return out

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
import json
import logging
import os
import select
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from .epochs import EpochState, write_atomic, consumer_slot, dist_info, rank_and_world
from .reading import ReadOptions, ReadStats, read_assignment
from .snapshot import Resolver, ShardInfo, Snapshot, snapshot_id
from .sources import DirectorySource, NoShardsError, make_source
from .split import Assignment, Piece
from .format.tario import ShardChangedError, TarError
from .watch import Inotify, is_candidate_path, poll_reason

log = logging.getLogger("wdsrefresh")

DEFAULT_STREAM_POLL = 0.2
DEFAULT_STREAM_RESCAN = 30.0
_KEEP_LATENCIES = 10000
_CONTROL = "stream"
_STOP = "stop"


def owner(name: str, consumers: int) -> int:
    """The consumer (0 <= c < consumers) that reads shard ``name``: rendezvous hashing."""
    best, winner = b"", 0
    for c in range(consumers):
        h = hashlib.blake2b(f"{c}\0{name}".encode(), digest_size=8).digest()
        if h > best:
            best, winner = h, c
    return winner


@dataclass(frozen=True)
class StreamConsumer:
    """Who is reading in stream mode (duck-types dataset.Consumer for the shuffle stage)."""

    rank: int
    world_size: int
    worker: int
    num_workers: int
    epoch: int = 0
    snapshot_id: str = "stream"

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


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


class StreamSource:
    """The first pipeline stage of ``mode="stream"``: yields samples forever, shard by shard."""

    def __init__(self, source: Any, *, options: ReadOptions, state_dir: str | None = None,
                 poll: bool | float = False, seed: int = 0, rescan_interval: float = DEFAULT_STREAM_RESCAN):
        self.source = make_source(source)
        if not isinstance(self.source, DirectorySource):
            raise ValueError(f'mode="stream" reads a directory, not {self.source.describe()}')
        self.options = replace(options, equalize=False)
        self.seed = seed
        self.polling = bool(poll)
        self.poll_interval = (DEFAULT_STREAM_POLL if poll is True else float(poll)) if poll else DEFAULT_STREAM_POLL
        self.rescan_interval = rescan_interval
        self.state = EpochState(state_dir)
        os.makedirs(os.path.join(self.state.directory, _CONTROL), exist_ok=True)
        rank, world_size = dist_info()
        self.state.set_control(0, rank, world_size, bump=False)
        self.current: StreamConsumer | None = None
        weakref.finalize(self, self.state.cleanup)

    # main process
    def set_epoch(self, epoch: int) -> Snapshot:
        raise RuntimeError('mode="stream" has no epochs: consumers read shards as they land')

    def close(self) -> None:
        """Ends the stream: every consumer stops after the shard it is reading."""
        path = os.path.join(self.state.directory, _CONTROL, _STOP)
        if os.path.isdir(os.path.dirname(path)):
            write_atomic(path, b"stop\n")

    def stats(self) -> StreamStats:
        """Totals over this node's consumers, from what each wrote after its latest shard."""
        records = []
        for name in sorted(os.listdir(self.state.directory)):
            if name.startswith("stream-stats-") and name.endswith(".json"):
                try:
                    with open(os.path.join(self.state.directory, name), encoding="utf-8") as f:
                        records.append(json.load(f))
                except (FileNotFoundError, ValueError):
                    continue
        total = lambda key: sum(r.get(key, 0) for r in records)  # noqa: E731
        return StreamStats(
            consumers=len(records), shards=total("shards"), samples=total("samples"), pending=total("pending"),
            rejected=total("rejected"), replaced=total("replaced"), deleted=total("deleted"),
            corrupt=total("corrupt"), latencies=tuple(x for r in records for x in r.get("latencies", ())),
        )

    # each consumer
    def __call__(self) -> Iterator[dict]:
        worker, num_workers = consumer_slot()
        rank, world_size = rank_and_world(self.state.control())
        self.current = StreamConsumer(rank, world_size, worker, num_workers)
        return _Consumer(self, self.current).samples()


class _Consumer:
    """One consumer's loop: look at new or changed names, read its ready shards, sleep."""

    def __init__(self, stream: StreamSource, who: StreamConsumer):
        self.stream = stream
        self.who = who
        self.root = stream.source.path
        self.recursive = stream.source.recursive
        self.control = os.path.join(stream.state.directory, _CONTROL)
        self.resolver = Resolver(stream.source, with_digest=stream.options.verify != "off")
        self.done: set[str] = set()
        self.waiting: dict[str, tuple] = {}  # mine, not ready (or rejected): url -> identity when looked at
        self.rejected: set[str] = set()
        self.totals: dict[str, int | set] = {}  # ReadStats summed over shards (counts, or sets of urls)
        self.shards = 0
        self.latencies: list[float] = []

    def stopped(self) -> bool:
        return not os.path.isdir(self.control) or os.path.exists(os.path.join(self.control, _STOP))

    def samples(self) -> Iterator[dict]:
        inotify = None
        polling = self.stream.polling
        if not polling:
            reason = poll_reason(self.root)
            if reason is None:
                try:
                    inotify = Inotify()
                    inotify.add(self.root)
                    inotify.add(self.control)
                except OSError as exn:
                    reason = f"inotify is unavailable ({exn})"
                    if inotify is not None:
                        inotify.close()
                        inotify = None
            if reason is not None:
                log.warning("stream consumer %d: polling every %.1f s: %s", self.who.index,
                            self.stream.poll_interval, reason)
                polling = True
        next_listing = 0.0
        try:
            while not self.stopped():
                now = time.monotonic()
                if polling or inotify is None or now >= next_listing:
                    if inotify is not None:
                        inotify.read()  # the listing below covers them
                    look = self._listing()
                    next_listing = now + self.stream.rescan_interval
                else:
                    changes = inotify.read()
                    if any(c.path is None for c in changes):
                        next_listing = 0.0
                        continue
                    look = {c.path for c in changes if c.settled and c.path.startswith(self.root)}
                    look.update(self.waiting)
                for url in sorted(look):
                    if self.stopped():
                        return
                    shard = self._ready(url)
                    if shard is not None:
                        yield from self._read(*shard)
                        self._write_stats()
                self._sleep(inotify, polling, next_listing)
        finally:
            if inotify is not None:
                inotify.close()
            self._write_stats()

    def _listing(self) -> set[str]:
        try:
            return {c.url for c in self.stream.source.candidates()}
        except NoShardsError:
            return set()

    def _sleep(self, inotify: Inotify | None, polling: bool, next_listing: float) -> None:
        if polling or inotify is None:
            time.sleep(self.stream.poll_interval)
            return
        timeout = max(0.0, next_listing - time.monotonic())
        if self.waiting:  # shards being written in place send no event once done: look again soon
            timeout = min(timeout, 1.0)
        select.select([inotify.fd], [], [], timeout)

    def _mine(self, url: str) -> bool:
        if url in self.done or not is_candidate_path(self.root, url, self.recursive):
            return False
        return owner(os.path.relpath(url, self.root), self.who.count) == self.who.index

    def _ready(self, url: str) -> tuple[ShardInfo, float] | None:
        """The shard at ``url`` and its arrival time, if it is this consumer's, unread, and ready."""
        if not self._mine(url):
            return None
        try:
            st = os.stat(url)
        except FileNotFoundError:
            self.waiting.pop(url, None)
            return None
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self.waiting.get(url) == identity:
            return None  # looked at in this state already
        if st.st_size == 0:  # just created by a producer writing in place: not a (corrupt) shard yet
            self.waiting[url] = identity
            return None
        try:
            info = self.resolver.info(self.stream.source.candidate(url))
        except FileNotFoundError:
            self.waiting.pop(url, None)
            return None
        except (TarError, ShardChangedError, OSError) as exn:
            self.waiting[url] = identity
            self.rejected.add(url)
            handler = self.stream.options.handler
            if handler is None or not handler(exn):
                raise
            log.warning("stream: shard left out: %s", exn)
            return None
        if info is None:
            self.waiting[url] = identity
            return None
        self.waiting.pop(url, None)
        self.rejected.discard(url)
        self.done.add(url)
        self.resolver.known.clear()  # read once; nothing to reuse
        return info, st.st_ctime

    def _read(self, info: ShardInfo, arrival: float) -> Iterator[dict]:
        snapshot = Snapshot(0, (info,), snapshot_id((info,)), (), (), time.time())
        assignment = Assignment(self.who.rank, self.who.worker, (Piece(0, 0, info.nsamples or 0),), 0)
        stats = ReadStats()
        first = True
        for sample in read_assignment(snapshot, assignment, self.stream.options, stats):
            if first:
                first = False
                self.latencies.append(max(0.0, time.time() - arrival))
                del self.latencies[:-_KEEP_LATENCIES]
            yield sample
        self.shards += 1
        for key, value in stats.as_dict().items():
            if isinstance(value, list):
                self.totals[key] = self.totals.get(key, set()) | set(value)
            else:
                self.totals[key] = self.totals.get(key, 0) + value

    def _write_stats(self) -> None:
        count = lambda key: len(v) if isinstance(v := self.totals.get(key, 0), set) else v  # noqa: E731
        record = {
            "rank": self.who.rank, "worker": self.who.worker, "shards": self.shards,
            "samples": count("yielded"), "pending": len(self.waiting) - len(self.rejected),
            "rejected": len(self.rejected), "replaced": count("replaced"), "deleted": count("deleted"),
            "corrupt": count("corrupt"), "latencies": [round(x, 6) for x in self.latencies],
        }
        name = f"stream-stats-{self.who.rank}-{self.who.worker}.json"
        try:
            write_atomic(os.path.join(self.stream.state.directory, name), json.dumps(record).encode())
        except OSError:  # the state directory is gone: the dataset was closed
            pass

"""Reading one object version block by block: pinned, checked, read ahead.

Guarantees:

- Bytes come in blocks aligned to the digest blocks (4 MiB), streamed by ranged GETs pinned to
  the snapshot's version (``store.read_blocks``: up to ``request_blocks`` blocks a request,
  each block whole or not at all). A block is checked against its digest before the tar
  reader sees any byte of it, so every sample is cut from verified bytes and nothing is held
  back (``verified`` is infinite, as for gzip).
- Blocks are fetched ahead of the reader through the consumer's ``window.Window``: several
  ranged GETs in flight, the objects being read first, then those prefetched (the next of the
  consumer's assignment), all within the consumer's memory budget, so network latency overlaps
  parsing. When the reader jumps over blocks (payloads it skips, a consumer that starts
  mid-shard) no GET starts for the blocks it skipped, unless the object is being indexed (every
  block is then digested, in order, one stream at a time).
- A checked block is handed to the tar reader as it is (no copy) whenever the reader goes on
  from its start; only payloads are copied out, to ``bytes``.
- A block that failed (after the store's retries) raises when, and only if, the reader needs
  it; a block fetched ahead that no sample needs never fails a read.
- A digest mismatch on a pinned version is corruption (the object is the snapshot's version
  by its ETag or VersionId), raised as ``ObjectCorruptError`` (a TarError) naming the URL and
  the block; a replaced object is a 412 (``ObjectChangedError``), a deleted one a 404
  (``ObjectVanishedError``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import perf_counter

from ...format import tario
from ...format.digest import BLOCK_SIZE, DEFAULT_ALGO, FileDigester, block_at, block_digest, split_digest
from ...format.tario import MAX_SAMPLE_BYTES, Expected, IOCounters, ShardReader, TarError
from .s3 import NULL_VERSION, ObjectChangedError, ObjectStat, ObjectVanishedError, Store
from .window import window_of

log = logging.getLogger("wdsrefresh")

_JOIN_SECONDS = 10.0  # how long closing a reader waits for a block in flight
_INF = float("inf")
_GZIP_MAGIC = b"\x1f\x8b"


class ObjectCorruptError(TarError):
    """An object's bytes differ from their digest while its version is the snapshot's."""


@dataclass(frozen=True)
class ObjectExpected(Expected):
    """What a reader should find in an object: ``Expected`` plus the version it is pinned to."""

    etag: str | None = None
    version_id: str | None = None


class BlockFetcher:
    """The blocks of one object version, fetched through its store's ``window.Window`` (the
    consumer's GETs in this process) ahead of the reader.

    ``get(i)`` waits for block ``i``; ``release_below(i)`` says blocks before ``i`` are no
    longer wanted. With ``digests`` every block is checked as it arrives; with ``record`` (a
    FileDigester) every block is fetched in order, by one stream at a time, and digested
    (indexing). A fetcher made for an object a reader will open later (``prefetch``) waits
    behind the objects being read.

    ``counters`` (a tario ``IOCounters``; None: not counted), set by the reader that opens it,
    gets when the fetcher is closed: the bytes of the blocks it fetched, the seconds ``get``
    waited for blocks (the reader blocked on the store; fetches that read-ahead overlapped with
    parsing cost none) and the seconds spent checking blocks against their digests.
    """

    def __init__(self, store: Store, url: str, size: int, *, etag: str | None, version_id: str | None,
                 digests: bytes | None = None, block_size: int = BLOCK_SIZE, record: FileDigester | None = None):
        self.store, self.url, self.size, self.block_size = store, url, size, block_size
        self.etag, self.version_id = etag, version_id
        self.digests, self.record = digests, record
        self.counters: IOCounters | None = None
        self.tally = IOCounters()  # added to ``counters`` at close (the threads write it under ``cond``)
        # checked blocks are cached under the snapshot's pin (never one learned on the way; the
        # ``null`` version is replaced in place while versioning is suspended: its ETag tells)
        self.cache = store.cache if digests is not None and record is None else None
        self.version = (version_id if version_id != NULL_VERSION else None) or etag or ""
        self.nblocks = -(-size // block_size)
        self.window = window_of(store)
        self.cond = self.window.cond  # one lock for the window and its fetchers: the budget spans them
        self.ready: dict[int, bytes] = {}
        self.failed: tuple[int, BaseException] | None = None
        self.floor = 0  # blocks below are not wanted any more
        self.wanted = 0  # the highest block asked for
        self.next = 0  # the next block no run has claimed
        self.missing: set[int] = set()  # claimed, lost by a failed run the reader had passed, wanted again
        self.waiting: int | None = None  # the block the reader waits for
        self.runs = 0  # GETs in flight for this object
        self.fetched = 0  # blocks fetched so far (in order when recording)
        self.opened = False  # a reader reads it (else it is prefetched, behind those being read)
        self.started = False
        self.closed = False

    def start(self) -> None:
        """Makes its blocks wanted, from block 0, before anything asks."""
        with self.cond:
            if self.started or self.closed:
                return
            self.started = True
        self.window.add(self)

    def open(self) -> None:
        """A reader reads it now: its blocks come before those of objects prefetched."""
        with self.cond:
            self.opened = True
        self.start()

    # ------------------------------------------------------------------ the window asks (under cond)
    def length(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    def urgent(self) -> int | None:
        """The block to request now because the reader waits for it (None: it does not)."""
        i = self.waiting
        if i is None or self.closed or i in self.ready or (self.failed is not None and self.failed[0] <= i):
            return None
        if self.record is not None:
            return self.next if not self.runs and self.next < self.nblocks else None
        return i if i >= self.next or i in self.missing else None

    def wants_next(self) -> int | None:
        """The first block to request ahead of the reader (None: nothing now)."""
        if self.closed or self.failed is not None or (self.record is not None and self.runs):
            return None
        again = [i for i in self.missing if i >= self.floor]
        if again:
            return min(again)
        i = max(self.next, self.floor)
        return i if i < self.nblocks else None

    def ahead(self) -> int:
        """Blocks claimed beyond the one the reader reads (for ``readahead``)."""
        return max(0, self.next - max(self.wanted, self.floor) - (1 if self.opened else 0))

    def run_limit(self, i: int) -> int:
        """The most blocks a run from block ``i`` may claim (a block lost and wanted again: itself)."""
        return 1 if i in self.missing else self.nblocks - i

    def claim(self, first: int, stop: int) -> None:
        if first in self.missing:
            self.missing.discard(first)
        else:
            self.next = max(self.next, stop)
        self.runs += 1

    # ------------------------------------------------------------------ the window's thread runs these
    def fetch_run(self, first: int, stop: int, opened: Callable[[], None]) -> int:
        """Fetches blocks ``first <= i < stop`` (one ranged GET, pinned; cached blocks from the
        cache) and hands each over checked; returns the first block it did not process."""
        blocks: Iterator | None = None
        i = first
        try:
            while i < stop:
                with self.cond:
                    if self.closed or (self.record is None and stop <= self.floor):
                        return i  # nobody needs the rest
                cached = self.cache.get(self.url, self.version, i, block_at(self.digests, i)) if self.cache else None
                if cached is not None:
                    if blocks is not None:
                        blocks.close()
                        blocks = None
                    self._arrived(i, cached, 0.0)
                    i += 1
                    continue
                try:
                    if blocks is None:
                        blocks = self.store.read_blocks(self.url, i, stop, self.block_size, self.size,
                                                        etag=self.etag, version_id=self.version_id, opened=opened)
                    data, etag, version_id = next(blocks)
                    checking = perf_counter()
                    self._check(i, data, etag, version_id)
                    checked = perf_counter() - checking
                except Exception as exn:  # noqa: BLE001 - handed to the reader if it needs block i
                    self._failed(i, stop, exn)
                    return i
                if self.cache is not None:
                    self.cache.put(self.url, self.version, i, data)
                self._arrived(i, data, checked)
                i += 1
            return i
        finally:
            if blocks is not None:
                blocks.close()
            with self.cond:
                self.runs -= 1
                self.cond.notify_all()

    def _arrived(self, i: int, data: bytes, checked: float) -> None:
        with self.cond:
            self.fetched += 1
            self.tally.bytes_read += len(data)
            self.tally.verify_seconds += checked
            kept = i >= self.floor and not self.closed and i not in self.ready
            if kept:
                self.ready[i] = data
            self.window.arrived(self.length(i), kept)
            self.cond.notify_all()

    def _failed(self, i: int, stop: int, exn: BaseException) -> None:
        with self.cond:
            if i >= self.floor and not self.closed:
                if self.failed is None or i < self.failed[0]:
                    self.failed = (i, exn)  # the reader raises it when it needs block i
            elif self.record is None:  # the reader moved past block i: the rest of the run is wanted again
                self.missing.update(range(max(i + 1, self.floor), stop))
            self.cond.notify_all()

    # ------------------------------------------------------------------ the reader's side
    def get(self, i: int) -> bytes:
        """Block ``i`` (checked); raises the error that fetching it met."""
        self.start()
        with self.cond:
            if i > self.wanted:
                self.wanted = i
                if self.record is None and self.next < i and i not in self.ready:
                    self.next = i  # jump over blocks nothing reads
                    self.missing = {k for k in self.missing if k >= i}
            if i not in self.ready:
                started = perf_counter()
                try:
                    while i not in self.ready:
                        if self.failed is not None and self.failed[0] <= i:
                            raise self.failed[1]
                        if self.closed:
                            raise RuntimeError(f"{self.url}: read after close")
                        self.waiting = i
                        self.window.waited = True
                        self.window.changed()
                        self.cond.wait()
                finally:
                    self.waiting = None
                    self.tally.read_seconds += perf_counter() - started
            return self.ready[i]

    def release_below(self, i: int) -> None:
        with self.cond:
            if i <= self.floor:
                return
            self.floor = i
            for k in [k for k in self.ready if k < i]:
                self.window.released(len(self.ready.pop(k)))
            if i > self.wanted:
                self.wanted = i
            if self.record is None and self.next < i:
                self.next = i
            self.missing = {k for k in self.missing if k >= i}
            self.window.changed()

    def drain(self) -> None:
        """Waits until every block was fetched (and digested): the end of an index."""
        self.release_below(self.nblocks)
        with self.cond:
            while self.fetched < self.nblocks:
                if self.failed is not None:
                    raise self.failed[1]
                self.waiting = self.next  # every block is wanted, in order
                self.window.changed()
                self.cond.wait()
            self.waiting = None

    def close(self) -> None:
        """Stops fetching; when it was the last object its window read, joins the window's
        threads: they end at once unless a block is in flight, which they finish reading first
        (at most ``_JOIN_SECONDS``: past that, a stalled read is left to end in the background)."""
        with self.cond:
            self.closed = True
            for k in list(self.ready):
                self.window.released(len(self.ready.pop(k)))
            self.cond.notify_all()
        for thread in self.window.remove(self):
            thread.join(_JOIN_SECONDS)
            if thread.is_alive():
                log.debug("%s: a read-ahead request still in flight after %.0f s; left to end", self.url,
                          _JOIN_SECONDS)
        with self.cond:
            tally, self.tally = self.tally, IOCounters()
        if self.counters is not None:
            self.counters.bytes_read += tally.bytes_read
            self.counters.read_seconds += tally.read_seconds
            self.counters.verify_seconds += tally.verify_seconds

    def _check(self, i: int, data: bytes, etag: str | None, version_id: str | None) -> None:
        if self.version_id is None and version_id is not None:
            self.version_id = version_id  # a versioned bucket: from now on the exact version
        if self.etag is None:
            self.etag = etag
        if self.record is not None:
            self.record.update_block(data)
        elif self.digests is not None and block_digest(data) != block_at(self.digests, i):
            pin = f"VersionId {self.version_id}" if self.version_id else f"ETag {self.etag}"
            raise ObjectCorruptError(self.url, i * self.block_size, f"block {i} differs from its digest while the "
                                     f"object is the snapshot's version ({pin}): corrupt in the store, or its "
                                     "manifest entry describes other bytes", stop=i * self.block_size + len(data))


class ObjectByteSource:
    """A ``tario.ByteSource`` over a BlockFetcher: an uncompressed tar object.

    Every byte is checked before it is handed out, so ``verified`` is infinite and the reader
    holds nothing back; ``settle`` and ``finish`` have nothing left to do.
    """

    verified = _INF
    position = "byte"  # offsets in errors are byte offsets in the object

    def __init__(self, fetcher: BlockFetcher):
        self.fetcher = fetcher
        self.url = fetcher.url
        self.size = fetcher.size
        self.block_size = fetcher.block_size

    def _bytes(self, start: int, stop: int) -> bytes:
        stop = min(stop, self.size)
        if start >= stop:
            return b""
        bs = self.block_size
        first, last = start // bs, (stop - 1) // bs
        self.fetcher.release_below(first)
        if first == last:
            block = self.fetcher.get(first)
            offset = start - first * bs
            return block if offset == 0 and stop - start == len(block) else block[offset : offset + stop - start]
        parts = []
        for i in range(first, last + 1):
            block = self.fetcher.get(i)
            lo = max(start - i * bs, 0)
            hi = min(stop - i * bs, len(block))
            parts.append(memoryview(block)[lo:hi])
        return b"".join(parts)

    def refill(self, buf: bytes, base: int, p: int, need: int, hoff: int) -> tuple[bytes, int]:
        pos = base + p
        if pos >= self.size:
            return b"", pos
        i = pos // self.block_size
        offset = pos - i * self.block_size
        self.fetcher.release_below(i)
        block = self.fetcher.get(i)
        if offset + need > len(block):  # across a block's end (never a header: blocks and headers are 512-aligned)
            return self._bytes(pos, pos + need), pos
        return (block if offset == 0 else block[offset:]), pos  # a block from its start: handed over, no copy

    def take(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, bytes, int, int]:
        start = base + q
        if start + size > self.size:
            raise TarError(self.url, hoff, f"truncated member: header declares {size} bytes, only "
                           f"{max(self.size - start, 0)} present", truncated=True)
        payload = self._bytes(start, start + size)
        after = start + size + (-size & 511)
        if after >= self.size:
            return payload, b"", start + size, -size & 511
        i = after // self.block_size  # the reader goes on in the block holding what follows: whole, no copy
        return payload, self.fetcher.get(i), i * self.block_size, after - i * self.block_size

    def skip(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, int, int]:
        end = base + q + size
        if end > self.size:
            raise TarError(self.url, hoff, f"truncated member: header declares {size} bytes past the end",
                           truncated=True)
        self.fetcher.release_below(end // self.block_size)
        return b"", end, -size & 511

    def settle(self, buf: bytes, base: int, p: int) -> bytes:
        return buf

    def finish(self, buf: bytes, base: int) -> None:
        return None


class _ObjectGzipSource(tario._GzipSource):
    """A gzip-compressed tar object: tario's gzip stream fed with checked blocks instead of preads."""

    def __init__(self, fetcher: BlockFetcher):
        super().__init__(-1, fetcher.url, tario._Checker(fetcher.url))  # nothing left to check: blocks are
        self.fetcher = fetcher

    def _raw(self) -> bytes:
        if self.raw_offset >= self.fetcher.size:
            return b""
        i = self.raw_offset // self.fetcher.block_size
        self.fetcher.release_below(i)
        data = self.fetcher.get(i)
        self.raw_offset += len(data)
        return data


def _byte_source(fetcher: BlockFetcher):
    if fetcher.size >= 2 and fetcher.get(0)[:2] == _GZIP_MAGIC:
        return _ObjectGzipSource(fetcher)
    return ObjectByteSource(fetcher)


def open_object(store: Store, url: str, expected: Expected, etag: str | None, version_id: str | None, *,
                max_sample_bytes: int = MAX_SAMPLE_BYTES, counters: IOCounters | None = None,
                ) -> tuple[ShardReader, Callable[[], None]]:
    """A reader of the object version pinned by ``version_id`` (else ``etag``) in ``store`` (its
    source's) as ``expected`` says it is, and the function that closes it. ``ObjectExpected`` pins
    override the arguments (a shard reloaded after a replacement). Raises ObjectChangedError,
    ObjectVanishedError, ObjectReadError as the first block's read does; a member larger than
    ``max_sample_bytes`` is refused unread (TarError). ``counters`` gets what reading it cost
    (``BlockFetcher``) when it is closed."""
    if isinstance(expected, ObjectExpected):
        etag, version_id = expected.etag, expected.version_id
    if not etag and not version_id:
        raise ValueError(f"{url}: its snapshot entry has neither ETag nor VersionId; an object is never read "
                         "unpinned (a plain GET after a replacement would mix versions)")
    if expected.size is None:
        raise ValueError(f"{url}: an object is read at the size its snapshot recorded; none given")
    if expected.digest and expected.blocks is None:
        raise ValueError(f"{url}: an object is checked block by block; its snapshot entry has only a whole digest")
    fetcher = _take_prefetched(store, url, expected, etag, version_id)
    if fetcher is None:
        fetcher = BlockFetcher(store, url, expected.size, etag=etag, version_id=version_id,
                               digests=expected.blocks, block_size=expected.block_size)
    fetcher.counters = counters
    try:
        fetcher.open()
        source = _byte_source(fetcher)
    except BaseException:
        fetcher.close()
        raise
    return ShardReader(source, url, local_path=url, max_sample_bytes=max_sample_bytes), fetcher.close


_PREFETCHED_AT_MOST = 32  # per process (a DataLoader worker is one consumer); the window's budget bounds their bytes
_prefetched: dict[tuple, BlockFetcher] = {}


def _forget_in_child() -> None:  # a forked child (a DataLoader worker) inherits fetchers, not their threads
    _prefetched.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def prefetch(store: Store, url: str, expected: Expected, etag: str | None, version_id: str | None) -> tuple | None:
    """Reads ahead the object a consumer will open after those it reads now: its blocks are
    requested behind theirs, within the consumer's memory budget (``window.Window``), while they
    are parsed. ``open_object`` with the same arguments takes it over; ``discard`` with the key
    returned drops it."""
    key = (store, url, expected, etag, version_id)  # one URL in two sources' stores: two objects
    if key in _prefetched or not (etag or version_id) or expected.size is None or (
            expected.digest and expected.blocks is None):
        return None
    while len(_prefetched) >= _PREFETCHED_AT_MOST:
        discard(next(iter(_prefetched)))
    fetcher = BlockFetcher(store, url, expected.size, etag=etag, version_id=version_id,
                           digests=expected.blocks, block_size=expected.block_size)
    _prefetched[key] = fetcher
    fetcher.start()
    return key


def discard(key: tuple | None) -> None:
    """Stops a prefetch that no reader took over (a consumer that ended or abandoned its epoch)."""
    fetcher = _prefetched.pop(key, None) if key is not None else None
    if fetcher is not None:
        fetcher.close()


def _take_prefetched(store: Store, url: str, expected: Expected, etag: str | None,
                     version_id: str | None) -> BlockFetcher | None:
    fetcher = _prefetched.pop((store, url, expected, etag, version_id), None)
    if fetcher is not None and fetcher.failed is not None:  # failed early (retries spent ahead of time): anew
        fetcher.close()
        return None
    return fetcher


@dataclass(frozen=True)
class ObjectIndex:
    """What one streamed read of an object version tells (as tario's ShardIndex), and the version."""

    nsamples: int
    digest: str | None
    blocks: bytes | None
    complete: bool
    end: int
    etag: str
    version_id: str | None


def index_object(store: Store, stat: ObjectStat, algo: str = DEFAULT_ALGO, *,
                 max_sample_bytes: int = MAX_SAMPLE_BYTES) -> ObjectIndex:
    """Counts the samples of the object version ``stat`` names and digests every block, in one
    streamed pass, pinned to that version (the first response names its VersionId, if any).

    ``complete`` is False for an object that ends before its end-of-archive marker (objects are
    published whole: such an object is broken, not in progress). Raises TarError for an object
    that is not a tar; ObjectChangedError / ObjectVanishedError when it was replaced / deleted
    since ``stat``; TarError for a member larger than ``max_sample_bytes``, as reading it would.
    """
    digester = FileDigester(algo)
    fetcher = BlockFetcher(store, stat.url, stat.size, etag=stat.etag, version_id=stat.version_id, record=digester)
    fetcher.open()
    try:
        reader = ShardReader(_byte_source(fetcher), stat.url, max_sample_bytes=max_sample_bytes)
        try:
            nsamples = reader.count()
        except TarError as exn:
            if exn.truncated:
                return ObjectIndex(reader.next_index, None, None, False, exn.offset, stat.etag, fetcher.version_id)
            raise
        if not reader.end_of_archive:
            return ObjectIndex(nsamples, None, None, False, reader.base + reader.p, stat.etag, fetcher.version_id)
        fetcher.drain()
        return ObjectIndex(nsamples, digester.digest, digester.blocks, True, stat.size, stat.etag, fetcher.version_id)
    finally:
        fetcher.close()


def reload(store: Store, url: str, name: str,
           max_sample_bytes: int = MAX_SAMPLE_BYTES) -> tuple[ObjectExpected, int] | None:
    """What the object at ``url`` in ``store`` is now, indexed (``on_change="reload"``), and how
    many samples it holds; None when it is gone, changes again while it is indexed, or is not a
    complete tar."""
    try:
        stat = store.head(url)
        if stat is None:
            return None
        index = index_object(store, stat, max_sample_bytes=max_sample_bytes)
    except (ObjectChangedError, ObjectVanishedError, TarError) as exn:
        log.warning("%s: cannot reload: %s", name or url, exn)
        return None
    if not index.complete:
        log.warning("%s: cannot reload: its current version ends before its end-of-archive marker", url)
        return None
    return ObjectExpected(size=stat.size, mtime_ns=stat.mtime_ns, digest=index.digest, blocks=index.blocks,
                          etag=index.etag, version_id=index.version_id), index.nsamples


def check_digest(url: str, index: ObjectIndex, expected_digest: str) -> None:
    """Raises ObjectCorruptError when a manifest's whole-file digest differs from the index's."""
    algo, hexpart = split_digest(expected_digest)
    if index.digest != f"{algo}:{hexpart}":
        raise ObjectCorruptError(url, 0, f"content differs from the manifest's {algo} digest")

"""Reading one consumer's assignment: open, verify, apply the change policy, count.

Every outcome that is not "read as the snapshot said" is counted in ReadStats: shards
replaced or rewritten after the snapshot (``on_change``), deleted, corrupt (``handler``).
Under torch.distributed a consumer that lost samples fills its quota by repeating samples it
already yielded this epoch (counted as ``padded``), so every rank still yields the same
number of samples and DDP does not hang.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from ..core.options import ReadOptions
from ..core.snapshot import ShardInfo, Snapshot
from ..errors import WdsRefreshError
from ..format.tario import Expected, ShardChangedError, ShardReader, TarError
from ..storage.backend import backend_for
from .split import Assignment, Piece

log = logging.getLogger("wdsrefresh")

_RECENT = 16  # samples kept for padding; only under equalize (torch.distributed)


@dataclass
class ReadStats:
    """What one consumer did in one epoch; shards are counted by url, so consumers' sets add up.

    ``bytes_read``, ``read_seconds`` and ``verify_seconds`` are the reader's IOCounters (per read
    call and per hashed chunk of a file; per block of an object, see ``storage/objects/blocks.BlockFetcher``);
    ``started`` and ``ended`` are the wall-clock times at which the consumer began its share and
    finished it (0.0 until then). ``grown`` maps a shard reloaded with more samples than its
    snapshot counted to how many more (read from the next epoch on).
    """

    yielded: int = 0
    quota: int = 0
    skipped: int = 0
    padded: int = 0
    replaced: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    grown: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    read_seconds: float = 0.0
    verify_seconds: float = 0.0
    started: float = 0.0
    ended: float = 0.0

    def as_dict(self) -> dict:
        return {k: sorted(v) if isinstance(v, set) else v for k, v in asdict(self).items()}


class ShardVanishedError(WdsRefreshError, FileNotFoundError):
    """A shard of the snapshot was deleted before it was read (``on_change="raise"``)."""


class StopConsumer(Exception):
    """The handler asked to stop reading (webdataset's handler returned False)."""


@dataclass
class Cursor:
    """Where a consumer is in its assignment: piece ``piece``, ``position(stats)`` samples into it.

    Updated once per piece; within a piece the position follows ``stats.yielded``, so tracking
    it costs nothing per sample. ``piece == len(pieces)`` once every piece was read.
    """

    piece: int = 0
    offset: int = 0
    base: int = 0

    def position(self, stats: ReadStats) -> tuple[int, int]:
        return self.piece, self.offset + stats.yielded - self.base


def read_assignment(
    snapshot: Snapshot, assignment: Assignment, options: ReadOptions, stats: ReadStats,
    cursor: Cursor | None = None,
) -> Iterator[dict]:
    """Yields the samples of ``assignment``: exactly ``assignment.quota`` under equalize.

    With a ``cursor``, starts at its position (a resumed epoch: ``stats`` holds what was read
    before) and keeps it current.
    """
    cursor = cursor if cursor is not None else Cursor()
    stats.quota = assignment.quota
    stats.started = stats.started or time.time()
    # keeping samples alive costs the allocator fresh pages per payload: only when padding may need them
    recent: deque[dict] = deque(maxlen=_RECENT if options.equalize else 0)
    prefetched: list = []
    try:
        pieces = assignment.pieces
        for index in range(cursor.piece, len(pieces)):
            piece = pieces[index]
            if index != cursor.piece:
                cursor.piece, cursor.offset = index, 0
            cursor.base = stats.yielded
            if cursor.offset:
                piece = Piece(piece.shard, min(piece.start + cursor.offset, piece.stop), piece.stop)
            shard = snapshot.shards[piece.shard]
            prefetched += _prefetch_ahead(snapshot, pieces, index, options)
            for sample in _read_piece(shard, piece, options, stats):
                recent.append(sample)
                stats.yielded += 1
                yield sample
        cursor.piece, cursor.offset, cursor.base = len(pieces), 0, stats.yielded
    except StopConsumer:
        # the handler asked to stop: the rest is skipped, but ranks must still agree on counts
        stats.skipped += sum(p.count for p in assignment.pieces[cursor.piece + 1:])
        if not options.equalize:
            stats.ended = time.time()
            return
    finally:  # an epoch ended or abandoned (generator closed) leaves no read-ahead running
        for backend, key in prefetched:
            backend.discard(key)
    shortfall = assignment.quota - stats.yielded - stats.padded
    if shortfall > 0 and options.equalize:
        if not recent:
            recent.extend(_any_samples(snapshot, options))
        yield from _pad(recent, shortfall, assignment, stats)
    stats.ended = time.time()


def read_shard(shard: ShardInfo, options: ReadOptions, stats: ReadStats, start: int = 0) -> Iterator[dict]:
    """Yields the samples of one shard from ``start`` on, under the policies, counting in ``stats``
    (stream mode)."""
    count = shard.nsamples or 0
    stats.quota += max(0, count - start)
    try:
        for sample in _read_piece(shard, Piece(0, min(start, count), count), options, stats):
            stats.yielded += 1
            yield sample
    except StopConsumer:
        return


def read_positions(snapshot: Snapshot, positions: list[tuple[int, int]], options: ReadOptions) -> Iterator[dict]:
    """The samples at ``positions`` (shard index, sample index), in that order: a checkpointed
    shuffle buffer read back, each shard once. Raises, naming the shard, when one of them
    cannot be read as the snapshot saw it (replaced or deleted since the checkpoint)."""
    wanted: dict[int, set[int]] = {}
    for shard_index, index in positions:
        wanted.setdefault(shard_index, set()).add(index)
    found: dict[tuple[int, int], dict] = {}
    for shard_index, indexes in sorted(wanted.items()):
        shard = snapshot.shards[shard_index]
        reader, close = _open(shard, shard.expected(with_digest=options.verify != "off"), options)
        try:
            for i in sorted(indexes):
                for sample in reader.samples(i, i + 1):
                    found[shard_index, i] = sample
        finally:
            close()
        missing = sorted(i for i in indexes if (shard_index, i) not in found)
        if missing:
            raise CountMismatch(shard.url, 0, f"has no sample {missing[0]}, which the checkpoint's shuffle buffer held")
    for position in positions:
        yield found[position]


def _any_samples(snapshot: Snapshot, options: ReadOptions) -> Iterator[dict]:
    """Up to _RECENT samples from whichever shards of the snapshot can still be read."""
    found = 0
    for shard in snapshot.shards:
        try:
            for sample in _read_verified(shard, shard.expected(options.verify != "off"), 0, _RECENT - found,
                                         options):
                found += 1
                yield sample
        except (OSError, TarError, ShardChangedError):
            continue
        if found >= _RECENT:
            return


def _pad(recent: deque, shortfall: int, assignment: Assignment, stats: ReadStats) -> Iterator[dict]:
    if not recent:
        raise RuntimeError(
            f"rank {assignment.slot.rank} worker {assignment.slot.worker}: every shard of the snapshot vanished or "
            f"changed before it was read; it cannot yield its {shortfall} samples to keep ranks equal"
        )
    log.warning(
        "rank %d worker %d: repeating %d samples to keep ranks equal after shards changed",
        assignment.slot.rank, assignment.slot.worker, shortfall,
    )
    for i in range(shortfall):
        sample = dict(recent[i % len(recent)])
        sample["__padded__"] = True
        stats.padded += 1
        yield sample


def _read_piece(shard: ShardInfo, piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[dict]:
    expected = shard.expected(with_digest=options.verify != "off")
    backend = backend_for(shard.url)
    failures = backend.read_failures
    count: int | None = shard.nsamples  # what the snapshot's version of the shard holds
    # the caller counts every sample it takes in stats.yielded: positions derive from it, so
    # this generator adds no work per sample
    base = stats.yielded - piece.start
    position = piece.start
    while position < piece.stop:
        try:
            yield from _read_verified(shard, expected, position, piece.stop, options, count, stats)
            position = stats.yielded - base
            if position < piece.stop:  # a reloaded shard holds fewer samples than the snapshot counted
                log.warning("%s: its current content ends after %d samples, the snapshot counted %d; %d skipped",
                            shard.url, position, piece.stop, piece.stop - position)
                stats.skipped += piece.stop - position
            return
        except FileNotFoundError as exn:
            position = stats.yielded - base
            stats.deleted.add(shard.url)
            if options.on_change == "raise":
                raise ShardVanishedError(f"{shard.url}: deleted after the snapshot") from exn
            log.warning("%s: deleted after the snapshot; %d samples skipped", shard.url, piece.stop - position)
        except ShardChangedError as exn:
            position = stats.yielded - base
            if backend.unchanged(shard, expected):  # the content changed, the version did not: corruption
                _corrupt(_digest_mismatch(shard, exn), shard, piece.stop - position, options, stats)
                return
            stats.replaced.add(shard.url)
            if options.on_change == "raise":
                raise
            fresh = _reindex(shard, options) if options.on_change == "reload" and count is not None else None
            if fresh is not None:
                log.warning("%s; reading its current content", exn)
                expected, now = fresh
                _note_growth(shard, now, stats)
                count = None
                continue
            log.warning("%s; %d samples skipped", exn, piece.stop - position)
        except failures as exn:  # corrupt, or a store still failing after its retries
            position = stats.yielded - base
            _corrupt(exn, shard, piece.stop - position, options, stats)
            return
        stats.skipped += piece.stop - position
        return


def _note_growth(shard: ShardInfo, now: int, stats: ReadStats) -> None:
    """A shard reloaded with more samples than its snapshot counted: this epoch's split has no
    place for the extra ones, so they are said and counted (``grown``), and read from the next
    epoch on (a file or an object alike)."""
    grown = now - (shard.nsamples or 0)
    if grown <= 0 or stats.grown.get(shard.url, 0) >= grown:
        return
    stats.grown[shard.url] = grown
    log.warning("%s: its current content holds %d samples, the snapshot counted %d; the %d beyond are not read "
                "this epoch (grown_samples), the next epoch reads them", shard.url, now, shard.nsamples or 0, grown)


class DigestMismatch(TarError):
    """A shard's bytes differ from its digests while its size, mtime and inode did not change:
    corruption (bit rot, or a rewrite that restored the mtime), never read as a replacement."""


class CountMismatch(TarError):
    """A shard holds another number of samples than its snapshot entry (manifest or index) counts."""


def _digest_mismatch(shard: ShardInfo, exn: ShardChangedError) -> DigestMismatch:
    block = exn.offset // shard.block_size
    return DigestMismatch(shard.url, exn.offset, f"block {block} differs from its digest while the file's size, "
                                                 f"mtime and inode are unchanged: the shard is corrupt",
                          stop=exn.stop)


def _corrupt(exn: BaseException, shard: ShardInfo, unread: int, options: ReadOptions,
             stats: ReadStats) -> None:
    """Counts a shard that cannot be read and asks the handler: re-raise, go on (the rest is
    skipped), or stop."""
    stats.corrupt.add(shard.url)
    if options.handler is None:
        raise exn
    stats.skipped += unread
    if not options.handler(exn):
        raise StopConsumer() from exn


def _reindex(shard: ShardInfo, options: ReadOptions) -> tuple[Expected, int] | None:
    """What the shard's current content is, and how many samples it holds, if it is ready by
    its backend's readiness rule."""
    return backend_for(shard.url).reread(shard, options)


def _read_verified(shard: ShardInfo, expected: Expected, start: int, stop: int, options: ReadOptions,
                   count: int | None = None, counters: ReadStats | None = None) -> Iterator[dict]:
    """Samples ``start <= i < stop`` of the shard as ``expected``; with ``count`` (the samples the
    snapshot's version holds), a shard that holds fewer or more raises CountMismatch. ``counters``
    adds up bytes read and seconds spent (see ReadStats)."""
    reader, close = _open(shard, expected, options, counters)
    try:
        hold_back = options.verify == "strict" and expected.blocks is None and expected.digest is not None
        samples = reader.samples(start, stop)
        if hold_back:
            held = list(samples)
            reader.finish()
            yield from held
        else:
            yield from samples
            reader.finish()
        if count is not None and (reader.next_index < stop or (stop == count and not reader.done)):
            found = "more" if reader.next_index >= stop else str(reader.next_index)
            raise CountMismatch(shard.url, reader.base + reader.p,
                                f"holds {found} samples, its snapshot entry counts {count}")
    finally:
        close()


_PREFETCH_AT_MOST = 32  # shards read ahead of the one being read, per consumer


def _prefetch_ahead(snapshot: Snapshot, pieces: Sequence, index: int, options: ReadOptions) -> list:
    """The shards of the pieces after ``index``, read ahead while it is parsed: as many as their
    backend's read-ahead bytes hold, at least the next one (local files: none); ``(backend, key)``
    pairs, each key the one ``backend.discard`` takes."""
    started: list = []
    room = None
    for piece in pieces[index + 1 : index + 1 + _PREFETCH_AT_MOST]:
        upcoming = snapshot.shards[piece.shard]
        backend = backend_for(upcoming.url)
        if room is None:
            room = backend.read_ahead(upcoming, options)
        started.append((backend, backend.prefetch(upcoming, options)))
        room -= upcoming.size or 0
        if room <= 0:
            break
    return started


def _open(shard: ShardInfo, expected: Expected, options: ReadOptions,
          counters: ReadStats | None = None) -> tuple[ShardReader, Callable[[], None]]:
    """A reader of ``shard`` as ``expected``, and what closes it, from the shard's backend (a
    local file, or an object read pinned to its snapshot version); ``counters`` adds up what
    either costs."""
    return backend_for(shard.url).open(shard, expected, options, counters)

"""Mid-epoch checkpoint and resume: the versioned state format and where a consumer restarts.

A consumer (rank, worker) reads an *assignment*: pieces (shard, start, stop) of the epoch's
snapshot. The split is a pure function of (snapshot, seed, epoch, world size, workers), so a
consumer's position is small: the piece it is in and how many of that piece's samples it has
passed. ``RefreshingWebDataset.state_dict()`` returns it as a plain dict of plain values::

    {"format": "wdsrefresh.resume", "version": 3,
     "source": "directory '/data/shards'", "seed": 0, "shardshuffle": True, "partial": False,
     "epoch": 3,
     "snapshot": {"id": ..., "epoch": 3, ...columns},   # see snapshot_columns.py
     "world_size": 1, "num_workers": 2,
     "consumers": [{"rank": 0, "worker": 1, "piece": 4, "offset": 17,
                    "stats": {"yielded": ..., "padded": ..., ...},
                    "pieces": b"...",    # only when not the split's own: int64 (shard, start, stop)s
                    "shuffle": {"rng": [...], "buffer": b"..."},   # a .shuffle() buffer's positions
                   }]}

The snapshot is carried once per rank: by worker 0's state (the only consumer's without
DataLoader workers). The other workers' states name it by id only (``{"id", "epoch"}``) and
find it, when loaded, in the whole state (a StatefulDataLoader's holds every worker's) or in
the dataset's state directory where worker 0's load published it. A consumer's own part is a
few hundred bytes, plus 24 bytes per piece after a resume on another layout and 16 bytes per
sample in a shuffle buffer; torchdata's StatefulDataLoader sends a worker's state as a delta
against the previous step, so the unchanged snapshot crosses the worker's pipe once.

Each DataLoader worker's state holds its own consumer; ``merge()`` combines the states of
several consumers (of a StatefulDataLoader state, or of several ranks) into one, as
``load_state_dict`` does by itself. A StatefulDataLoader hands worker i only worker i's state
(a new worker gets none, a surplus state is dropped), so a loader with another num_workers
cannot resume a state: a worker that finds consumers missing raises, naming the call that
works (``ds.load_state_dict(state)`` before the loader is built), and never reads a partial share.

What is guaranteed when a state is loaded:

- The interrupted epoch reads the *saved* snapshot (rebuilt from the state, not resolved
  again). Its shards are verified against the saved digests; those that changed or vanished
  since are handled by ``on_change`` and counted, as in any epoch. The epoch after it resolves
  a fresh snapshot, so shards added meanwhile appear there.
- Same layout (world size and num_workers as saved): each consumer yields exactly the samples
  of its assignment after its saved position, in the same order as the uninterrupted run.
- Different num_workers, same world size: the unread samples of each rank's old consumers
  (all of them must be in the state) are concatenated in (worker, piece) order and split into
  contiguous, equal (to within one sample) ranges among the rank's new workers. Every unread
  sample is yielded exactly once; the order differs from the uninterrupted run.
- Different world size: the unread samples of all old consumers (every rank's, merged) are
  split the same way across the new ranks x workers; unless ``partial``, the last
  ``unread % world_size`` samples are left out (logged) so ranks stay equal.
- ``set_epoch(e)`` called for the saved epoch after loading republishes the saved snapshot
  instead of resolving one (under torch.distributed every rank loads its state, so no rank
  broadcasts). The epoch counter continues: the iteration after the resumed one is ``e + 1``.
- A state saved before any iteration loads as a no-op; a state saved after the loader finished
  an epoch resumes with the next one (StatefulDataLoader starts a fresh iteration).
- Exactly once counts from the checkpoint: samples yielded after the last saved state are
  yielded again after the restart. Positions count samples that left the dataset's source
  stage; a ``.shuffle()`` buffer holds samples that were read but not delivered, so a
  pipeline with one refuses ``state_dict()``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..core import columns as snapshot_columns
from ..errors import WdsRefreshError
from .slot import Slot
from ..core.snapshot import ShardInfo, Snapshot, snapshot_id
from ..core.columns import pack_int64, unpack_int64
from .split import ORDER, ORDERS, Assignment, Piece, left_out, slot_range

log = logging.getLogger("wdsrefresh")

FORMAT = "wdsrefresh.resume"
VERSION = 3  # 3: columnar snapshot carried by worker 0 only; packed pieces and shuffle buffers
READABLE = (2, 3)  # 2: shards carry their name below the source root; snapshot ids hash names, not paths
_STATS_COUNTS = ("yielded", "quota", "skipped", "padded")
_STATS_URLS = ("replaced", "deleted", "corrupt")


class ResumeError(WdsRefreshError, ValueError):
    """A state that does not fit this dataset, or is not a valid wdsrefresh state."""


@dataclass(frozen=True)
class SavedPosition:
    """Where one consumer (rank, worker) was in its assignment of the saved epoch."""

    rank: int
    worker: int
    piece: int
    offset: int
    stats: dict = field(default_factory=dict, compare=False)
    pieces: tuple[Piece, ...] | None = None
    shuffle: dict | None = None  # a .shuffle() buffer: {"rng": [...], "buffer": [[shard, index], ...]}

    def as_dict(self) -> dict:
        doc = {"rank": self.rank, "worker": self.worker, "piece": self.piece, "offset": self.offset,
               "stats": dict(self.stats)}
        if self.pieces is not None:
            doc["pieces"] = pack_int64(v for p in self.pieces for v in (p.shard, p.start, p.stop))
        if self.shuffle is not None:
            buffer = pack_int64(v for position in self.shuffle["buffer"] for v in position)
            doc["shuffle"] = {"rng": self.shuffle["rng"], "buffer": buffer}
        return doc

    def buffered(self) -> list[Piece]:
        """The samples its shuffle buffer held: read, not yet delivered."""
        return [Piece(s, i, i + 1) for s, i in (self.shuffle or {}).get("buffer", [])]


@dataclass(frozen=True)
class ResumeState:
    """A validated state: the saved epoch, its snapshot, and the consumers' positions."""

    epoch: int
    snapshot: Snapshot
    world_size: int
    num_workers: int
    consumers: tuple[SavedPosition, ...]
    token: str
    order: int = ORDER  # how the saved epoch ordered its shards (split.ORDER when it was saved)


# ---------------------------------------------------------------------------- encoding

def snapshot_doc(snapshot: Snapshot, carry: bool = True) -> dict:
    """The snapshot as a state holds it: its columns (``carry``), or only its id and epoch."""
    if not carry:
        return {"id": snapshot.id, "epoch": snapshot.epoch}
    return snapshot_columns.encode(snapshot)


def snapshot_rows(snapshot: Snapshot) -> dict:
    """A snapshot as version 2 states held it, one row per shard (for tests of old states)."""
    return {
        "id": snapshot.id,
        "epoch": snapshot.epoch,
        "shards": [
            [s.url, s.path, s.size, s.mtime_ns, s.inode, s.device, s.nsamples, s.digest,
             s.blocks.hex() if s.blocks is not None else None, s.block_size, s.name]
            for s in snapshot.shards
        ],
    }


def snapshot_from_rows(doc: object) -> Snapshot:
    """Rebuilds a version 2 snapshot; ResumeError when it is malformed or its id does not match."""
    doc = _expect(doc, dict, "snapshot")
    sid = _expect(doc.get("id"), str, "snapshot.id")
    epoch = _expect(doc.get("epoch"), int, "snapshot.epoch")
    rows = _expect(doc.get("shards"), list, "snapshot.shards")
    shards = []
    for i, row in enumerate(rows):
        where = f"snapshot.shards[{i}]"
        if not isinstance(row, (list, tuple)) or len(row) != 11:
            raise ResumeError(f"{where}: expected a list of 11 values, got {row!r:.80}")
        url, path, size, mtime_ns, inode, device, nsamples, digest, blocks, block_size, name = row
        try:
            shards.append(ShardInfo(
                url=_expect(url, str, f"{where} url"), path=_expect(path, str, f"{where} path"),
                size=_expect(size, int, f"{where} size"), mtime_ns=_expect(mtime_ns, int, f"{where} mtime_ns"),
                inode=_expect(inode, int, f"{where} inode"), device=_expect(device, int, f"{where} device"),
                nsamples=_expect(nsamples, int, f"{where} nsamples"),
                digest=None if digest is None else _expect(digest, str, f"{where} digest"),
                blocks=None if blocks is None else bytes.fromhex(_expect(blocks, str, f"{where} blocks")),
                block_size=_expect(block_size, int, f"{where} block_size"),
                name=_expect(name, str, f"{where} name"),
            ))
        except ValueError as exn:
            if isinstance(exn, ResumeError):
                raise
            raise ResumeError(f"{where}: {exn}") from exn
    shards = tuple(shards)
    if snapshot_id(shards) != sid:
        raise ResumeError(f"snapshot.id {sid!r} does not match its shards (corrupted state?)")
    return Snapshot(epoch, shards, sid)


def _expect(value: object, kind: type, what: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ResumeError(f"{what}: expected {kind.__name__}, got {type(value).__name__} {value!r:.60}")
    return value


def fingerprint(source: str, seed: int, shardshuffle: bool, partial: bool) -> dict:
    """What a state must agree with to be loaded into a dataset."""
    return {"source": source, "seed": seed, "shardshuffle": bool(shardshuffle), "partial": bool(partial)}


def make_state(fingerprint: dict, epoch: int | None, snapshot: dict | None, world_size: int, num_workers: int,
               consumers: list[dict]) -> dict:
    return {"format": FORMAT, "version": VERSION, **fingerprint, "epoch": epoch, "snapshot": snapshot,
            "order": ORDER, "world_size": world_size, "num_workers": num_workers, "consumers": consumers}


def parse(state: object, fingerprint: dict, find_snapshot=None) -> ResumeState | None:
    """Validates ``state`` against a dataset's fingerprint; None for a state saved before any epoch.

    ``find_snapshot(id)`` is asked for the snapshot of a state that names it without carrying it
    (the state of a DataLoader worker other than 0); None from it is an error saying what to load.
    """
    if not isinstance(state, dict):
        raise ResumeError(f"expected a dict from RefreshingWebDataset.state_dict(), got {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise ResumeError(f"not a wdsrefresh state: 'format' is {state.get('format')!r}, expected {FORMAT!r}")
    if state.get("mode") == "stream":
        raise ResumeError("a stream-mode state cannot resume an epoch (mode='epoch')")
    if state.get("mode") == "mix":
        raise ResumeError(f"a mix's state (sources {sorted(state.get('sources') or ())}) cannot resume a dataset of "
                          f"one source: give the dataset the same named sources")
    _check_version(state)
    for key, want in fingerprint.items():
        if state.get(key) != want:
            raise ResumeError(
                f"state was saved by another dataset: its {key} is {state.get(key)!r}, this dataset's is {want!r}"
            )
    if state.get("epoch") is None:
        return None
    epoch = _expect(state.get("epoch"), int, "epoch")
    snapshot = _snapshot_of(state, find_snapshot)
    world_size = _expect(state.get("world_size"), int, "world_size")
    num_workers = _expect(state.get("num_workers"), int, "num_workers")
    if world_size < 1 or num_workers < 1:
        raise ResumeError(f"world_size {world_size} and num_workers {num_workers} must be >= 1")
    consumers = []
    for i, doc in enumerate(_expect(state.get("consumers"), list, "consumers")):
        consumers.append(_consumer(doc, f"consumers[{i}]", snapshot, world_size, num_workers))
    seen: dict[tuple[int, int], SavedPosition] = {}
    for c in consumers:
        if seen.setdefault((c.rank, c.worker), c) != c:
            raise ResumeError(f"consumers: two different positions for rank {c.rank} worker {c.worker}")
    order = 1 if state["version"] == 2 else _expect(state.get("order"), int, "order")
    if order not in ORDERS:
        raise ResumeError(f"order {order}: this wdsrefresh orders shards in ways {ORDERS}")
    token = f"{epoch}:{snapshot.id}:{world_size}:{num_workers}"
    return ResumeState(epoch, snapshot, world_size, num_workers, tuple(seen.values()), token, order)


def _check_version(state: dict) -> None:
    if state.get("version") not in READABLE:
        raise ResumeError(
            f"state version {state.get('version')!r} is not supported: this wdsrefresh reads versions "
            f"{', '.join(map(str, READABLE))} (version 1 states, of wdsrefresh 0.1, name snapshots by path; "
            f"start that epoch afresh)")


def _snapshot_of(state: dict, find_snapshot) -> Snapshot:
    """The snapshot a state carries or names (see ``parse``)."""
    doc = state.get("snapshot")
    if state["version"] == 2:
        return snapshot_from_rows(doc)
    doc = _expect(doc, dict, "snapshot")
    if "count" in doc:
        try:
            return snapshot_columns.decode(doc)
        except snapshot_columns.ColumnsError as exn:
            raise ResumeError(str(exn)) from None
    sid = _expect(doc.get("id"), str, "snapshot.id")
    found = find_snapshot(sid) if find_snapshot is not None else None
    if found is None:
        raise ResumeError(
            f"this state names snapshot {sid} without carrying it (only DataLoader worker 0's state carries "
            f"the snapshot): {WHOLE_STATE}")
    return found


def _consumer(doc: object, where: str, snapshot: Snapshot, world_size: int, num_workers: int) -> SavedPosition:
    doc = _expect(doc, dict, where)
    rank = _expect(doc.get("rank"), int, f"{where}.rank")
    worker = _expect(doc.get("worker"), int, f"{where}.worker")
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ResumeError(f"{where}: rank {rank} worker {worker} outside {world_size} ranks x {num_workers} workers")
    stats = _expect(doc.get("stats", {}), dict, f"{where}.stats")
    counts = {k: _expect(stats.get(k, 0), int, f"{where}.stats.{k}") for k in _STATS_COUNTS}
    urls = {k: _expect(stats.get(k, []), list, f"{where}.stats.{k}") for k in _STATS_URLS}
    stats = counts | {k: [_expect(u, str, f"{where}.stats.{k}[]") for u in v] for k, v in urls.items()}
    pieces = None
    if doc.get("pieces") is not None:
        pieces = []
        for j, p in enumerate(_triples(doc["pieces"], 3, f"{where}.pieces")):
            if not (isinstance(p, (list, tuple)) and len(p) == 3 and all(isinstance(v, int) for v in p)):
                raise ResumeError(f"{where}.pieces[{j}]: expected [shard, start, stop], got {p!r:.60}")
            shard, start, stop = p
            if not (0 <= shard < len(snapshot.shards) and 0 <= start <= stop <= (snapshot.shards[shard].nsamples or 0)):
                raise ResumeError(f"{where}.pieces[{j}]: {p} does not fit the snapshot")
            pieces.append(Piece(shard, start, stop))
        pieces = tuple(pieces)
    piece = _expect(doc.get("piece"), int, f"{where}.piece")
    offset = _expect(doc.get("offset"), int, f"{where}.offset")
    if piece < 0 or offset < 0:
        raise ResumeError(f"{where}: negative position piece {piece} offset {offset}")
    shuffle = _shuffle_doc(doc.get("shuffle"), f"{where}.shuffle", snapshot)
    return SavedPosition(rank, worker, piece, offset, stats, pieces, shuffle)


def _shuffle_doc(doc: object, where: str, snapshot: Snapshot) -> dict | None:
    """A checked shuffle buffer state: an rng state random.Random takes, positions in the snapshot."""
    if doc is None:
        return None
    doc = _expect(doc, dict, where)
    rng = _expect(doc.get("rng"), list, f"{where}.rng")
    if len(rng) != 3 or not isinstance(rng[1], list) or not all(isinstance(v, int) for v in rng[1]):
        raise ResumeError(f"{where}.rng: expected [version, [int, ...], gauss], got {rng!r:.60}")
    try:
        random.Random().setstate((rng[0], tuple(rng[1]), rng[2]))
    except (TypeError, ValueError) as exn:
        raise ResumeError(f"{where}.rng: not a random.Random state ({exn})") from None
    buffer = _triples(doc.get("buffer"), 2, f"{where}.buffer")
    for j, p in enumerate(buffer):
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p)
                and 0 <= p[0] < len(snapshot.shards) and 0 <= p[1] < (snapshot.shards[p[0]].nsamples or 0)):
            raise ResumeError(f"{where}.buffer[{j}]: {p!r:.40} is not a sample of the snapshot")
    return {"rng": rng, "buffer": buffer}


def _triples(value: object, width: int, where: str) -> list[list]:
    """Rows of ``width`` ints: packed int64s (version 3) or lists (version 2)."""
    if not isinstance(value, bytes):
        return _expect(value, list, where)
    try:
        flat = unpack_int64(value, len(value) // 8, where) if len(value) % (8 * width) == 0 else None
    except snapshot_columns.ColumnsError:
        flat = None
    if flat is None:
        raise ResumeError(f"{where}: {len(value)} bytes is not a whole number of {width}-value rows")
    return [list(flat[i:i + width]) for i in range(0, len(flat), width)]


def merge(states: object, *, carrier: str = "snapshot", carried: str = "count") -> dict:
    """One state holding every consumer found in ``states``.

    ``states`` may be a dataset state, a StatefulDataLoader state (its per-worker dataset states
    are found inside it), or a list of either (for instance one per rank). All must come from
    the same epoch and snapshot. Load the result with ``ds.load_state_dict()`` before building a
    new DataLoader, to resume with a different num_workers or world size. ``carrier``: the key of
    what worker 0 carries whole (with ``carried`` in it) and the others name by id (a mix: "mix").
    """
    found = list(find_states(states))
    if not found:
        raise ResumeError("no wdsrefresh state found in the given object")
    started = [s for s in found if s.get("epoch") is not None]
    if not started:
        return found[0]
    first = started[0]
    key = lambda s: (s.get("epoch"), (s.get(carrier) or {}).get("id"), s.get("world_size"),  # noqa: E731
                     s.get("num_workers"), s.get("source"), s.get("seed"), s.get("mode"))
    consumers = []
    for s in started:
        if key(s) != key(first):
            raise ResumeError(
                f"states from different epochs or layouts cannot be merged: "
                f"epoch/{carrier}/world/workers {key(first)[:4]} vs {key(s)[:4]}"
            )
        consumers.extend(s.get("consumers") or [])
    carriers = [s[carrier] for s in started if isinstance(s.get(carrier), dict) and carried in s[carrier]]
    return {**first, carrier: carriers[0] if carriers else first.get(carrier), "consumers": consumers}


def find_states(obj: object) -> Iterator[dict]:
    """Every wdsrefresh state in ``obj`` (a state, a loader's state holding some, lists of them)."""
    if isinstance(obj, dict):
        if obj.get("format") == FORMAT:
            yield obj
            return
        for value in obj.values():
            yield from find_states(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from find_states(value)


# ---------------------------------------------------------------------------- where to restart

@dataclass(frozen=True)
class Restart:
    """What one new consumer reads of the interrupted epoch."""

    assignment: Assignment
    piece: int
    offset: int
    stats: dict
    explicit: bool
    shuffle: dict | None = None

    @property
    def samples(self) -> int:
        """How many samples the consumer yields from here: its shuffle buffer's, then the
        rest of its assignment."""
        buffered = len((self.shuffle or {}).get("buffer", ()))
        return buffered + sum(p.count for p in remaining(self.assignment.pieces, self.piece, self.offset))


# what a DataLoader worker can and cannot load: torch hands worker i only worker i's saved state
WHOLE_STATE = ("a DataLoader worker is handed only its own worker's saved state, so a loader with another "
               "num_workers cannot resume it: load the whole state into the dataset before building the loader, "
               "ds.load_state_dict(state) (state: the StatefulDataLoader's state_dict(), or under "
               "torch.distributed the list of every rank's), then StatefulDataLoader(ds, ...) without "
               "load_state_dict")


def remaining(pieces: tuple[Piece, ...], piece: int, offset: int) -> list[Piece]:
    """The unread pieces after position (piece, offset)."""
    out = []
    if piece < len(pieces):
        p = pieces[piece]
        start = min(p.start + offset, p.stop)
        if start < p.stop:
            out.append(Piece(p.shard, start, p.stop))
        out.extend(pieces[piece + 1:])
    return out


def _slice(pieces: Iterable[Piece], lo: int, hi: int) -> tuple[Piece, ...]:
    """Positions [lo, hi) of the sequence formed by ``pieces``."""
    out, pos = [], 0
    for p in pieces:
        a, b = max(lo, pos), min(hi, pos + p.count)
        if b > a:
            out.append(Piece(p.shard, p.start + a - pos, p.start + b - pos))
        pos += p.count
        if pos >= hi:
            break
    return tuple(out)


def restart(state: ResumeState, assignment_of, slot: Slot, partial: bool, warn: bool = True) -> Restart:
    """Where ``slot`` of the new layout restarts the saved epoch.

    ``assignment_of(saved_slot)`` is the saved layout's split for that slot. ``warn``: log the
    samples a resume on another world size leaves out (the consumer that reads does, once).
    """
    def pieces_of(c: SavedPosition) -> tuple[Piece, ...]:
        if c.pieces is not None:
            return c.pieces
        return assignment_of(Slot(c.rank, state.world_size, c.worker, state.num_workers)).pieces

    if (slot.world_size, slot.num_workers) == (state.world_size, state.num_workers):
        return _restart_in_place(state, slot, pieces_of, assignment_of)
    ranks = range(state.world_size) if slot.world_size != state.world_size else [slot.rank]
    need = {(r, w) for r in ranks for w in range(state.num_workers)}
    have = {(c.rank, c.worker): c for c in state.consumers}
    missing = sorted(need - have.keys())
    if missing:
        raise ResumeError(
            f"cannot redistribute from {state.world_size} ranks x {state.num_workers} workers to "
            f"{slot.world_size} x {slot.num_workers}: the state lacks the positions of (rank, worker) {missing}; "
            f"{WHOLE_STATE}"
        )
    unread: list[Piece] = []
    for key in sorted(need):
        c = have[key]
        unread.extend(c.buffered() + remaining(pieces_of(c), c.piece, c.offset))
    total = sum(p.count for p in unread)
    if slot.world_size != state.world_size:
        dropped = left_out(total, slot.world_size, partial)
        if dropped and warn:
            log.warning("resume on %d ranks: %d of %d unread samples left out so ranks stay equal",
                        slot.world_size, dropped, total)
        lo, hi = slot_range(total - dropped, slot)
    else:  # the rank's own unread samples, among its new workers
        dropped = 0
        lo, hi = slot_range(total, Slot(0, 1, slot.worker, slot.num_workers))
    return Restart(Assignment(slot, _slice(unread, lo, hi), dropped), 0, 0, {}, True)


def _restart_in_place(state: ResumeState, slot: Slot, pieces_of, assignment_of) -> Restart:
    """Same layout: the slot continues its own assignment where it was saved."""
    mine = [c for c in state.consumers if (c.rank, c.worker) == (slot.rank, slot.worker)]
    if not mine:
        raise ResumeError(
            f"state holds no position for rank {slot.rank} worker {slot.worker} "
            f"(it has {sorted((c.rank, c.worker) for c in state.consumers)}); {WHOLE_STATE}"
        )
    c = mine[0]
    pieces = pieces_of(c)
    if c.piece > len(pieces) or (c.piece < len(pieces) and c.offset > pieces[c.piece].count):
        raise ResumeError(f"rank {slot.rank} worker {slot.worker}: position {c.piece}/{c.offset} beyond its assignment")
    left_out = assignment_of(slot).left_out if c.pieces is None else 0
    return Restart(Assignment(slot, pieces, left_out), c.piece, c.offset, c.stats, c.pieces is not None, c.shuffle)


def read_stats(doc: dict, cls: type):
    """A ReadStats (``cls``) holding the counters saved in a consumer's state."""
    kinds = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: set(v) if isinstance(v, list) else v for k, v in doc.items() if k in kinds})


# ---------------------------------------------------------------------------- stream mode

@dataclass(frozen=True)
class StreamResume:
    """What the consumers of a stream had read: shards finished, and how far into started ones."""

    done: frozenset[str]
    reading: dict[str, int]


def stream_state(source: str, consumers: list[dict]) -> dict:
    return {"format": FORMAT, "version": VERSION, "mode": "stream", "source": source, "consumers": consumers}


def parse_stream(states: object, source: str) -> StreamResume:
    """Every stream consumer's position found in ``states`` (one state, a loader's, a list), checked
    against the stream's source; the union is what a resumed stream skips, on any layout."""
    found = [s for s in find_states(states)]
    if not found:
        raise ResumeError("no wdsrefresh state found in the given object")
    done: set[str] = set()
    reading: dict[str, int] = {}
    for state in found:
        if state.get("mode") != "stream":
            raise ResumeError("an epoch-mode state cannot resume a stream (mode='stream')")
        _check_version(state)
        if state.get("source") != source:
            raise ResumeError(f"state was saved by another stream: its source is {state.get('source')!r}, "
                              f"this one's is {source!r}")
        for i, c in enumerate(_expect(state.get("consumers"), list, "consumers")):
            c = _expect(c, dict, f"consumers[{i}]")
            done.update(_expect(n, str, f"consumers[{i}].done[]") for n in _expect(c.get("done"), list, "done"))
            for name, n in _expect(c.get("reading"), dict, f"consumers[{i}].reading").items():
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise ResumeError(f"consumers[{i}].reading[{name!r}]: expected a sample count, got {n!r:.30}")
                reading[name] = max(reading.get(name, 0), n)
    return StreamResume(frozenset(done), {k: v for k, v in reading.items() if k not in done})

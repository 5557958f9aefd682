"""MixSnapshot: what one epoch of a mix reads, the same on every rank and worker.

Each source's own ``Snapshot`` (resolved the same epoch), its count for the epoch, the samples
that count selects (pieces of its shards, in reading order: ``rotation.select``), and each
source's rotation state after the epoch (what the next epoch's selection starts from). One
document of plain values holds it all (``encode``/``decode``), for the state directory that
every consumer reads and for the checkpoints that carry it across a restart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy

from ..core import columns as snapshot_columns
from ..core.snapshot import ShardInfo, Snapshot
from ..core.columns import pack_int64, unpack_int64
from ..epoch.split import Piece, Pieces
from ..epoch.statedir import StateDirectory
from .rotation import Rotation

EMPTY_REDISTRIBUTED = "redistributed"  # no sample: its share went to the other sources
EMPTY_WAITED = "waited"  # min_shards made set_epoch wait for shards


@dataclass(frozen=True)
class SourcePlan:
    """One source in one epoch: its snapshot, its count, the pieces selected, its rotation after."""

    snapshot: Snapshot
    count: int
    selection: numpy.ndarray = field(repr=False, compare=False)  # int64 rows (shard, start, stop)
    rotation: Rotation = field(default_factory=Rotation, repr=False)
    weight: float | None = None  # the share asked for (weights normalized), None without weights
    empty: str | None = None  # EMPTY_REDISTRIBUTED or EMPTY_WAITED, else None
    spec: str = ""  # the source's describe()

    @property
    def repeats(self) -> int:
        """Samples read more than once this epoch (the count beyond the snapshot's size)."""
        return max(0, self.count - self.snapshot.nsamples) if self.snapshot.nsamples else 0

    def pieces(self, start: int, stop: int) -> Pieces:
        """Positions [start, stop) of the selection, as pieces."""
        return slice_pieces(self.selection, start, stop)


@dataclass(frozen=True)
class MixSnapshot:
    """The epoch of a mix (see the module docstring). ``len(mix)``: the epoch's samples, summed
    over ranks and workers; ``sources`` and ``counts`` by source name, in the mix's order."""

    epoch: int
    id: str
    plans: dict[str, SourcePlan]
    left_out: int = 0  # samples of the epoch's total no rank reads, so ranks stay equal

    @property
    def sources(self) -> dict[str, Snapshot]:
        return {name: p.snapshot for name, p in self.plans.items()}

    @property
    def counts(self) -> dict[str, int]:
        return {name: p.count for name, p in self.plans.items()}

    @property
    def nsamples(self) -> int:
        return sum(p.count for p in self.plans.values())

    def __len__(self) -> int:
        return self.nsamples

    # what a single-source Snapshot offers that callers of either ask for
    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return tuple(s for p in self.plans.values() for s in p.snapshot.shards)

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(u for p in self.plans.values() for u in p.snapshot.pending)

    @property
    def rejected(self) -> tuple[tuple[str, str], ...]:
        return tuple(r for p in self.plans.values() for r in p.snapshot.rejected)

    def describe(self, previous: MixSnapshot | None = None) -> str:
        parts = [f"{name} {p.count}/{p.snapshot.nsamples}" for name, p in self.plans.items()]
        return f"epoch {self.epoch}: mix {self.id}, {len(self)} samples ({', '.join(parts)})"


def mix_id(plans: dict[str, SourcePlan]) -> str:
    """Names a mix's content: each source's name, snapshot id, count and selection."""
    h = hashlib.sha256()
    for name, p in plans.items():
        h.update(repr((name, p.snapshot.id, p.count)).encode())
        h.update(numpy.ascontiguousarray(p.selection, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def selection_array(pieces: list[Piece]) -> numpy.ndarray:
    return numpy.array([tuple(p) for p in pieces], dtype=numpy.int64).reshape(-1, 3)


def slice_pieces(rows: numpy.ndarray, start: int, stop: int) -> Pieces:
    """The pieces covering positions [start, stop) of the sample sequence ``rows`` (shard,
    start, stop) spell out."""
    shards, firsts, lasts = rows[:, 0], rows[:, 1], rows[:, 2]
    ends = numpy.cumsum(lasts - firsts)
    begins = ends - (lasts - firsts)
    keep = (ends > start) & (begins < stop)
    cut_first = numpy.maximum(start - begins[keep], 0)
    cut_last = numpy.maximum(ends[keep] - stop, 0)
    return Pieces(shards[keep], firsts[keep] + cut_first, lasts[keep] - cut_last)


# --------------------------------------------------------------------------- the document

def encode(mix: MixSnapshot, *, offsets: bool = False, columns: dict | None = None) -> dict:
    """``mix`` as plain values. ``offsets``: text columns with their ends (the state directory's
    form); ``columns``: already encoded snapshots by source name, reused."""
    sources = {}
    for name, p in mix.plans.items():
        s = p.snapshot
        doc = (columns or {}).get(name) or snapshot_columns.encode(s)
        if offsets and "ends" not in doc:
            doc = snapshot_columns.with_offsets(doc)
        sources[name] = {
            "snapshot": doc, "count": p.count, "selection": pack_int64(p.selection.reshape(-1).tolist()),
            "rotation": p.rotation.to_doc(), "weight": p.weight, "empty": p.empty, "spec": p.spec,
            "pending": list(s.pending), "rejected": [list(r) for r in s.rejected],
            "pending_reasons": dict(s.pending_reasons), "resolved_at": s.resolved_at,
            "resolve_seconds": s.resolve_seconds,
        }
    return {"id": mix.id, "epoch": mix.epoch, "left_out": mix.left_out, "order": list(mix.plans),
            "sources": sources}


def decode(doc: object, *, trusted: bool = False) -> MixSnapshot:
    """The MixSnapshot ``encode`` made. ``trusted`` (this process's own state directory): shards
    built on access; otherwise (a checkpoint) every column and piece is checked and ValueError
    names what is wrong."""
    where = "mix"
    doc = _get(doc, dict, where)
    epoch = _get(doc.get("epoch"), int, f"{where}.epoch")
    order = _get(doc.get("order"), list, f"{where}.order")
    sources = _get(doc.get("sources"), dict, f"{where}.sources")
    if sorted(order) != sorted(sources):
        raise ValueError(f"{where}.order {order!r} does not name its sources {sorted(sources)!r}")
    plans = {}
    for name in order:
        plans[name] = _plan(_get(sources[name], dict, f"{where}.sources[{name!r}]"), epoch,
                            f"{where}.sources[{name!r}]", trusted)
    mix = MixSnapshot(epoch, _get(doc.get("id"), str, f"{where}.id"), plans,
                      _get(doc.get("left_out", 0), int, f"{where}.left_out"))
    if not trusted and mix_id(plans) != mix.id:
        raise ValueError(f"{where}.id {mix.id!r} does not match its sources (corrupted state?)")
    return mix


def _plan(doc: dict, epoch: int, where: str, trusted: bool) -> SourcePlan:
    columns = doc.get("snapshot")
    snap = snapshot_columns.decode_lazy(columns) if trusted else snapshot_columns.decode(columns)
    rejected = tuple(tuple(r) for r in _get(doc.get("rejected", []), list, f"{where}.rejected"))
    snap = Snapshot(epoch, snap.shards, snap.id, rejected, tuple(_get(doc.get("pending", []), list, f"{where}.pending")),
                    float(doc.get("resolved_at") or 0.0), float(doc.get("resolve_seconds") or 0.0),
                    dict(_get(doc.get("pending_reasons", {}), dict, f"{where}.pending_reasons")))
    data = _get(doc.get("selection"), bytes, f"{where}.selection")
    if len(data) % 24:
        raise ValueError(f"{where}.selection: {len(data)} bytes is not a whole number of (shard, start, stop) rows")
    rows = numpy.array(unpack_int64(data, len(data) // 8, f"{where}.selection"), dtype=numpy.int64).reshape(-1, 3)
    if not trusted:
        _check_rows(rows, snap, f"{where}.selection")
    count = _get(doc.get("count"), int, f"{where}.count")
    if int((rows[:, 2] - rows[:, 1]).sum()) != count:
        raise ValueError(f"{where}: its selection holds {int((rows[:, 2] - rows[:, 1]).sum())} samples, "
                         f"its count is {count}")
    weight = doc.get("weight")
    return SourcePlan(snap, count, rows, Rotation.from_doc(doc.get("rotation"), f"{where}.rotation"),
                      None if weight is None else float(weight), doc.get("empty"), str(doc.get("spec", "")))


def _check_rows(rows: numpy.ndarray, snap: Snapshot, where: str) -> None:
    sizes = numpy.array(snap.sample_counts() or [0], dtype=numpy.int64)
    shard, start, stop = rows[:, 0], rows[:, 1], rows[:, 2]
    bad = (shard < 0) | (shard >= len(snap.shards)) | (start < 0) | (stop <= start)
    if not bad.any() and len(rows):
        bad = stop > sizes[shard]
    if bad.any():
        j = int(numpy.nonzero(bad)[0][0])
        raise ValueError(f"{where}[{j}]: {rows[j].tolist()} is not a piece of a shard of the snapshot")


def _get(value: object, kind: type, what: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{what}: expected {kind.__name__}, got {type(value).__name__} {value!r:.60}")
    return value


# --------------------------------------------------------------------------- the state directory

class MixStateDirectory(StateDirectory):
    """The state directory of a mix: ``snapshot-<epoch>.pkl`` holds the epoch's MixSnapshot. A
    source whose shards did not change since the last epoch published here reuses its columns."""

    def __init__(self, parent: str | None = None):
        super().__init__(parent)
        self._encoded: dict[str, tuple[object, dict]] = {}  # source -> (its shards, their columns)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_encoded": {}}

    def _published(self, mix: MixSnapshot) -> dict:
        columns = {}
        for name, p in mix.plans.items():
            known = self._encoded.get(name)
            shards = p.snapshot.shards
            if known is not None and (known[0] is shards or (len(known[0]) == len(shards) and known[0] == shards)):
                columns[name] = {**known[1], "id": p.snapshot.id, "epoch": mix.epoch}
            else:
                doc = getattr(shards, "doc", None) or snapshot_columns.encode(p.snapshot)
                columns[name] = snapshot_columns.with_offsets(doc) if "ends" not in doc else doc
                self._encoded[name] = (shards, columns[name])
        return {"columns": None, "epoch": mix.epoch, "id": mix.id,
                "mix": encode(mix, offsets=True, columns=columns)}

    def _from_published(self, doc: dict) -> MixSnapshot:
        return decode(doc["mix"], trusted=True)

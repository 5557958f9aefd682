"""Checkpoints of a mix: the versioned state, and where each consumer restarts.

A consumer of a mix reads positions [lo, hi) of the epoch's schedule (``plan.turns``); each of
its sources is read as in a single-source epoch, with its own cursor. Its state::

    {"format": "wdsrefresh.resume", "version": 3, "mode": "mix", "seed": 0, "shardshuffle": True,
     "partial": False, "sources": {"fresh": "objects prefix 's3://b/new/'", "base": "directory ..."},
     "epoch": 3, "mix": {...},          # the MixSnapshot (mix/snapshot.py): carried by worker 0;
                                        # the others name it ({"id", "epoch"})
     "world_size": 2, "num_workers": 2,
     "consumers": [{"rank": 0, "worker": 1, "dry": 0,
                    "sources": {"fresh": {"piece": 4, "offset": 17, "stats": {...}}, ...},
                    "share": None,      # after a resume on another layout: counts, lo, hi, pieces
                    "shuffle": {"rng": [...], "buffer": b"..."}}]}   # (source, shard, sample)s

The MixSnapshot holds every source's snapshot, selection and rotation state after the epoch, so
the epoch after a resume continues the rotation. Same layout: each consumer continues its
schedule and each source's cursor where they were (through ``.shuffle()``, whose buffer is
re-read first). Another layout: the unread samples of each source (the buffers' included) are
gathered in (rank, worker) order and a new schedule over their counts is split across the new
consumers, each sample exactly once (less ``unread % world_size`` on another world size, cut
from the sources by largest remainder and logged). Sources are known by name: a source whose
name is in the state but no longer in the dataset (or the other way) is accepted, with a
WARNING, the interrupted epoch finishing on its saved schedule; a name whose source spec changed
raises ResumeError naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy

from ..epoch.resume import FORMAT, VERSION, WHOLE_STATE, ResumeError, remaining
from ..epoch.resume import merge as merge_states
from ..epoch.slot import Slot
from ..core.columns import pack_int64, unpack_int64
from ..epoch.split import Piece, slot_range
from .plan import largest_remainder, taken, turns
from .snapshot import MixSnapshot, decode, encode, selection_array, slice_pieces

log = logging.getLogger("wdsrefresh")

MODE = "mix"
_STATS_COUNTS = ("yielded", "quota", "skipped", "padded")
_STATS_URLS = ("replaced", "deleted", "corrupt")


@dataclass(frozen=True)
class Share:
    """What one consumer reads of an epoch: positions [lo, hi) of the schedule over ``counts``,
    and for each source (in the mix's order) the pieces those positions take."""

    counts: tuple[int, ...]
    lo: int
    hi: int
    pieces: tuple[Sequence[Piece], ...]

    @property
    def samples(self) -> int:
        return self.hi - self.lo

    def order(self) -> numpy.ndarray:
        return turns(self.counts, self.lo, self.hi)[0]

    def as_dict(self) -> dict:
        return {"counts": list(self.counts), "lo": self.lo, "hi": self.hi,
                "pieces": [pack_int64(v for p in ps for v in p) for ps in self.pieces]}


def share_of(mix: MixSnapshot, slot: Slot) -> Share:
    """The consumer ``slot``'s share of a fresh epoch: equal per rank, then per worker."""
    counts = tuple(mix.counts.values())
    lo, hi = slot_range(len(mix), slot)
    pieces = tuple(p.pieces(taken(counts, i, lo), taken(counts, i, hi)) for i, p in enumerate(mix.plans.values()))
    return Share(counts, lo, hi, pieces)


@dataclass(frozen=True)
class SavedConsumer:
    rank: int
    worker: int
    dry: int
    cursors: dict[str, tuple[int, int]]  # source -> (piece, offset)
    stats: dict[str, dict] = field(compare=False)
    share: Share | None = None  # explicit (after a resume on another layout)
    shuffle: dict | None = None

    def as_dict(self) -> dict:
        doc = {"rank": self.rank, "worker": self.worker, "dry": self.dry,
               "sources": {n: {"piece": c[0], "offset": c[1], "stats": dict(self.stats.get(n, {}))}
                           for n, c in self.cursors.items()},
               "share": self.share.as_dict() if self.share is not None else None}
        if self.shuffle is not None:
            doc["shuffle"] = {"rng": self.shuffle["rng"],
                              "buffer": pack_int64(v for p in self.shuffle["buffer"] for v in p)}
        return doc


@dataclass(frozen=True)
class MixResume:
    epoch: int
    mix: MixSnapshot
    world_size: int
    num_workers: int
    consumers: tuple[SavedConsumer, ...]
    token: str


def fingerprint(seed: int, shardshuffle: bool, partial: bool, specs: dict[str, str]) -> dict:
    return {"mode": MODE, "seed": seed, "shardshuffle": bool(shardshuffle), "partial": bool(partial),
            "sources": dict(specs)}


def make_state(fp: dict, epoch: int | None, mix: dict | None, world_size: int, num_workers: int,
               consumers: list[dict]) -> dict:
    return {"format": FORMAT, "version": VERSION, **fp, "epoch": epoch, "mix": mix, "world_size": world_size,
            "num_workers": num_workers, "consumers": consumers}


def mix_doc(mix: MixSnapshot, carry: bool) -> dict:
    return encode(mix) if carry else {"id": mix.id, "epoch": mix.epoch}


# ---------------------------------------------------------------------------- reading a state

def changed_names(state: dict, specs: dict[str, str]) -> tuple[list[str], list[str]]:
    """(names in the state no longer in the dataset, names of the dataset the state lacks); raises
    ResumeError for a name whose source is another one now."""
    saved = state.get("sources")
    if not isinstance(saved, dict):
        raise ResumeError(f"a mix state names its sources in 'sources', got {saved!r:.60}")
    for name, spec in saved.items():
        if name in specs and specs[name] != spec:
            raise ResumeError(f"source {name!r} was {spec} when the state was saved and is {specs[name]} now: "
                              f"a name stands for one source across a restart (give the new one another name)")
    return sorted(set(saved) - set(specs)), sorted(set(specs) - set(saved))


def parse(state: object, fp: dict, find_mix: Callable[[str], MixSnapshot | None] | None = None) -> MixResume | None:
    """Validates a mix state against the dataset's fingerprint; None for a state saved before any epoch."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"not a wdsrefresh state: expected a dict with format {FORMAT!r}")
    if state.get("mode") != MODE:
        raise ResumeError(f"a {state.get('mode') or 'single-source'} state cannot resume a mix of sources "
                          f"(the dataset's sources are {sorted(fp['sources'])})")
    if state.get("version") != VERSION:
        raise ResumeError(f"mix state version {state.get('version')!r}: this wdsrefresh reads version {VERSION}")
    for key in ("seed", "shardshuffle", "partial"):
        if state.get(key) != fp[key]:
            raise ResumeError(f"state was saved by another dataset: its {key} is {state.get(key)!r}, this "
                              f"dataset's is {fp[key]!r}")
    changed_names(state, fp["sources"])
    if state.get("epoch") is None:
        return None
    epoch = _int(state.get("epoch"), "epoch")
    mix = _mix_of(state, find_mix)
    world_size, num_workers = _int(state.get("world_size"), "world_size"), _int(state.get("num_workers"), "num_workers")
    if world_size < 1 or num_workers < 1:
        raise ResumeError(f"world_size {world_size} and num_workers {num_workers} must be >= 1")
    consumers: dict[tuple[int, int], SavedConsumer] = {}
    docs = state.get("consumers")
    if not isinstance(docs, list):
        raise ResumeError("consumers: expected a list")
    for i, doc in enumerate(docs):
        c = _consumer(doc, f"consumers[{i}]", mix, world_size, num_workers)
        if consumers.setdefault((c.rank, c.worker), c) != c:
            raise ResumeError(f"consumers: two different positions for rank {c.rank} worker {c.worker}")
    token = f"{MODE}:{epoch}:{mix.id}:{world_size}:{num_workers}"
    return MixResume(epoch, mix, world_size, num_workers, tuple(consumers.values()), token)


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResumeError(f"{what}: expected int, got {type(value).__name__} {value!r:.60}")
    return value


def _mix_of(state: dict, find_mix) -> MixSnapshot:
    doc = state.get("mix")
    if not isinstance(doc, dict):
        raise ResumeError(f"mix: expected a dict, got {type(doc).__name__}")
    if "sources" in doc:
        try:
            return decode(doc)
        except ValueError as exn:
            raise ResumeError(str(exn)) from None
    found = find_mix(doc.get("id")) if find_mix is not None else None
    if found is None:
        raise ResumeError(f"this state names mix {doc.get('id')} without carrying it (only DataLoader worker 0's "
                          f"state carries it): {WHOLE_STATE}")
    return found


def _consumer(doc: object, where: str, mix: MixSnapshot, world_size: int, num_workers: int) -> SavedConsumer:
    if not isinstance(doc, dict):
        raise ResumeError(f"{where}: expected a dict")
    rank, worker, dry = (_int(doc.get(k, 0), f"{where}.{k}") for k in ("rank", "worker", "dry"))
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ResumeError(f"{where}: rank {rank} worker {worker} outside {world_size} ranks x {num_workers} workers")
    sources = doc.get("sources")
    if not isinstance(sources, dict) or set(sources) != set(mix.plans):
        raise ResumeError(f"{where}.sources: expected the positions of {list(mix.plans)}")
    cursors, stats = {}, {}
    for name in mix.plans:
        at = sources[name]
        if not isinstance(at, dict):
            raise ResumeError(f"{where}.sources[{name!r}]: expected a dict")
        piece, offset = _int(at.get("piece"), f"{where}.sources[{name!r}].piece"), _int(
            at.get("offset"), f"{where}.sources[{name!r}].offset")
        if piece < 0 or offset < 0:
            raise ResumeError(f"{where}.sources[{name!r}]: negative position {piece}/{offset}")
        cursors[name] = (piece, offset)
        stats[name] = _stats(at.get("stats", {}), f"{where}.sources[{name!r}].stats")
    share = _share(doc.get("share"), f"{where}.share", mix)
    return SavedConsumer(rank, worker, dry, cursors, stats, share, _shuffle(doc.get("shuffle"), f"{where}.shuffle", mix))


def _stats(doc: object, where: str) -> dict:
    if not isinstance(doc, dict):
        raise ResumeError(f"{where}: expected a dict")
    out = {k: _int(doc.get(k, 0), f"{where}.{k}") for k in _STATS_COUNTS}
    for k in _STATS_URLS:
        urls = doc.get(k, [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ResumeError(f"{where}.{k}: expected a list of urls")
        out[k] = list(urls)
    return out


def _rows(data: object, width: int, where: str) -> list[tuple[int, ...]]:
    if not isinstance(data, bytes) or len(data) % (8 * width):
        raise ResumeError(f"{where}: expected packed rows of {width} int64s")
    flat = unpack_int64(data, len(data) // 8, where)
    return [tuple(flat[i:i + width]) for i in range(0, len(flat), width)]


def _share(doc: object, where: str, mix: MixSnapshot) -> Share | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("counts"), list) or not isinstance(doc.get("pieces"), list):
        raise ResumeError(f"{where}: expected counts, lo, hi and pieces")
    counts = tuple(_int(c, f"{where}.counts[]") for c in doc["counts"])
    lo, hi = _int(doc.get("lo"), f"{where}.lo"), _int(doc.get("hi"), f"{where}.hi")
    if len(counts) != len(mix.plans) or len(doc["pieces"]) != len(mix.plans) or not 0 <= lo <= hi <= sum(counts):
        raise ResumeError(f"{where}: does not fit the mix's {len(mix.plans)} sources")
    pieces = []
    for (name, plan), data in zip(mix.plans.items(), doc["pieces"]):
        rows = [Piece(*r) for r in _rows(data, 3, f"{where}.pieces[{name!r}]")]
        for p in rows:
            if not (0 <= p.shard < len(plan.snapshot.shards)
                    and 0 <= p.start < p.stop <= (plan.snapshot.shards[p.shard].nsamples or 0)):
                raise ResumeError(f"{where}.pieces[{name!r}]: {tuple(p)} is not a piece of its snapshot")
        pieces.append(tuple(rows))
    return Share(counts, lo, hi, tuple(pieces))


def _shuffle(doc: object, where: str, mix: MixSnapshot) -> dict | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("rng"), list):
        raise ResumeError(f"{where}: expected rng and buffer")
    buffer = _rows(doc.get("buffer"), 3, f"{where}.buffer")
    plans = list(mix.plans.values())
    for j, (source, shard, index) in enumerate(buffer):
        if not (0 <= source < len(plans) and 0 <= shard < len(plans[source].snapshot.shards)
                and 0 <= index < (plans[source].snapshot.shards[shard].nsamples or 0)):
            raise ResumeError(f"{where}.buffer[{j}]: {(source, shard, index)} is not a sample of the mix")
    return {"rng": doc["rng"], "buffer": [list(p) for p in buffer]}


def merge(states: object) -> dict:
    """One mix state holding every consumer found in ``states`` (a loader's state, a list of
    every rank's), the mix carried by whichever worker 0 state is among them."""
    return merge_states(states, carrier="mix", carried="sources")


# ---------------------------------------------------------------------------- where to restart

@dataclass(frozen=True)
class Restart:
    """What one new consumer reads of the interrupted epoch, and from where."""

    share: Share
    cursors: dict[str, tuple[int, int]]
    stats: dict[str, dict]
    dry: int = 0
    explicit: bool = False
    shuffle: dict | None = None

    @property
    def samples(self) -> int:
        """The samples it yields from here: its shuffle buffer's, then the rest of its schedule."""
        done = sum(s.get("yielded", 0) + s.get("padded", 0) for s in self.stats.values()) + self.dry
        return len((self.shuffle or {}).get("buffer", ())) + self.share.samples - done


def restart(state: MixResume, slot: Slot, partial: bool, warn: bool = True) -> Restart:
    """Where ``slot`` of the new layout restarts the saved epoch (see the module docstring)."""
    def saved_share(c: SavedConsumer) -> Share:
        return c.share or share_of(state.mix, Slot(c.rank, state.world_size, c.worker, state.num_workers))

    have = {(c.rank, c.worker): c for c in state.consumers}
    if (slot.world_size, slot.num_workers) == (state.world_size, state.num_workers):
        c = have.get((slot.rank, slot.worker))
        if c is None:
            raise ResumeError(f"state holds no position for rank {slot.rank} worker {slot.worker} "
                              f"(it has {sorted(have)}); {WHOLE_STATE}")
        return Restart(saved_share(c), c.cursors, c.stats, c.dry, c.share is not None, c.shuffle)
    ranks = range(state.world_size) if slot.world_size != state.world_size else [slot.rank]
    need = sorted((r, w) for r in ranks for w in range(state.num_workers))
    missing = [k for k in need if k not in have]
    if missing:
        raise ResumeError(f"cannot redistribute from {state.world_size} ranks x {state.num_workers} workers to "
                          f"{slot.world_size} x {slot.num_workers}: the state lacks the positions of (rank, worker) "
                          f"{missing}; {WHOLE_STATE}")
    names = list(state.mix.plans)
    unread: list[list[Piece]] = [[] for _ in names]
    for key in need:
        c = have[key]
        share = saved_share(c)
        for source, shard, index in (c.shuffle or {}).get("buffer", ()):
            unread[source].append(Piece(shard, index, index + 1))
        for i, name in enumerate(names):
            piece, offset = c.cursors[name]
            unread[i].extend(remaining(tuple(share.pieces[i]), piece, offset))
    counts = [sum(p.count for p in ps) for ps in unread]
    total = sum(counts)
    if slot.world_size != state.world_size:
        left_out = 0 if partial else total % slot.world_size
        if left_out and warn:
            log.warning("resume on %d ranks: %d of %d unread samples of the mix left out so ranks stay equal",
                        slot.world_size, left_out, total)
        counts = largest_remainder(total - left_out, [Fraction(c) for c in counts])
        lo, hi = slot_range(total - left_out, slot)
    else:
        lo, hi = slot_range(total, Slot(0, 1, slot.worker, slot.num_workers))
    counts = tuple(counts)
    pieces = tuple(tuple(slice_pieces(selection_array(ps), taken(counts, i, lo), taken(counts, i, hi)))
                   for i, ps in enumerate(unread))
    return Restart(Share(counts, lo, hi, pieces), {n: (0, 0) for n in names}, {}, 0, True)

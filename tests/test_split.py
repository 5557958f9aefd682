"""Exactly once, equal per rank, deterministic: the split and resume redistribution as pure arithmetic.

Snapshots here are values (no files): every shard is a range of sample indexes, and the
tests check the pieces the split hands out, for many random layouts.
"""

from __future__ import annotations

import collections
import random

import pytest

from wdsrefresh.epoch.resume import ResumeState, SavedPosition, restart
from wdsrefresh.epoch.slot import Slot
from wdsrefresh.core.snapshot import ShardInfo, Snapshot, snapshot_id
from wdsrefresh.epoch.split import even_ranges, shard_order, split


def snapshot_of(counts: list[int], epoch: int = 0) -> Snapshot:
    shards = tuple(ShardInfo(f"s{i}.tar", f"/d/s{i}.tar", 10_240, 0, i + 1, 1, n) for i, n in enumerate(counts))
    return Snapshot(epoch, shards, snapshot_id(shards))


def slots(world_size: int, num_workers: int) -> list[Slot]:
    return [Slot(r, world_size, w, num_workers) for r in range(world_size) for w in range(num_workers)]


def samples_of(assignment) -> list[tuple[int, int]]:
    return [(p.shard, i) for p in assignment.pieces for i in range(p.start, p.stop)]


def layouts(seed: int, cases: int):
    rng = random.Random(seed)
    for _ in range(cases):
        counts = [rng.choice([0, 1, 2, 7, 50, rng.randint(1, 300)]) for _ in range(rng.randint(1, 12))]
        yield counts, rng.randint(1, 5), rng.randint(1, 4), rng.randint(0, 9)


@pytest.mark.parametrize("partial", [False, True])
def test_every_sample_in_exactly_one_slot_and_ranks_equal(partial):
    for counts, world, workers, epoch in layouts(seed=7, cases=300):
        snap = snapshot_of(counts)
        per_slot = {s: split(snap, seed=3, epoch=epoch, slot=s, partial=partial) for s in slots(world, workers)}
        seen = collections.Counter(x for a in per_slot.values() for x in samples_of(a))
        total = sum(counts)
        assert max(seen.values(), default=1) == 1
        left_out = next(iter(per_slot.values())).left_out
        assert left_out == (0 if partial else total % world) and len(seen) == total - left_out
        per_rank = [sum(per_slot[s].quota for s in per_slot if s.rank == r) for r in range(world)]
        if not partial:
            assert len(set(per_rank)) == 1
        per_worker = [per_slot[Slot(0, world, w, workers)].quota for w in range(workers)]
        assert max(per_worker) - min(per_worker) <= 1
        quotas_by_worker = [[per_slot[Slot(r, world, w, workers)].quota for w in range(workers)] for r in range(world)]
        if not partial:
            assert all(q == quotas_by_worker[0] for q in quotas_by_worker)  # batch counts agree across ranks


def test_order_is_a_pure_function_of_snapshot_seed_and_epoch():
    snap = snapshot_of([5] * 20)
    assert shard_order(snap, 1, 4) == shard_order(snapshot_of([5] * 20), 1, 4)
    orders = {tuple(shard_order(snap, 1, e)) for e in range(10)}
    assert len(orders) == 10
    assert shard_order(snap, 1, 4) != shard_order(snap, 2, 4)
    assert shard_order(snap, 1, 4, shuffle=False) == list(range(20))


def test_even_ranges_cover_without_gaps_and_differ_by_at_most_one():
    for total in range(0, 40):
        for parts in range(1, 9):
            ranges = even_ranges(total, parts)
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def saved_state(snap: Snapshot, world: int, workers: int, rng: random.Random, epoch: int = 0):
    """Every old slot stopped at a random position; returns the state and the samples already read."""
    read, positions = set(), []
    for s in slots(world, workers):
        a = split(snap, seed=0, epoch=epoch, slot=s)
        piece = rng.randint(0, len(a.pieces))
        offset = rng.randint(0, a.pieces[piece].count) if piece < len(a.pieces) else 0
        positions.append(SavedPosition(s.rank, s.worker, piece, offset))
        read.update(samples_of(a)[: sum(p.count for p in a.pieces[:piece]) + offset])
    state = ResumeState(epoch, snap, world, workers, tuple(positions), "t")
    return state, read


@pytest.mark.parametrize("old,new", [((1, 2), (1, 3)), ((1, 3), (1, 2)), ((2, 2), (1, 2)), ((1, 2), (2, 2)),
                                     ((2, 3), (3, 2)), ((3, 1), (2, 4))])
def test_redistribution_reads_each_unread_sample_once_and_keeps_ranks_equal(old, new):
    rng = random.Random(11)
    for counts, _w, _n, _e in layouts(seed=sum(old + new), cases=60):
        snap = snapshot_of(counts)
        state, read = saved_state(snap, *old, rng)

        def assignment_of(slot):
            return split(snap, seed=0, epoch=0, slot=slot)

        assignments = {s: restart(state, assignment_of, s, partial=False).assignment for s in slots(*new)}
        resumed = collections.Counter(x for a in assignments.values() for x in samples_of(a))
        assert max(resumed.values(), default=1) == 1 and not (set(resumed) & read)
        assigned = {x for s in slots(*old) for x in samples_of(assignment_of(s))}
        unread = assigned - read
        assert set(resumed) <= unread
        per_rank = [sum(a.quota for s, a in assignments.items() if s.rank == r) for r in range(new[0])]
        assert len(set(per_rank)) == 1
        assert len(unread) - len(resumed) == (len(unread) % new[0] if new[0] != old[0] else 0)


def test_same_layout_resumes_each_slot_exactly_where_it_stopped():
    rng = random.Random(5)
    for counts, world, workers, _e in layouts(seed=21, cases=60):
        snap = snapshot_of(counts)
        state, read = saved_state(snap, world, workers, rng)
        for s in slots(world, workers):
            a = split(snap, seed=0, epoch=0, slot=s)
            r = restart(state, lambda slot: split(snap, seed=0, epoch=0, slot=slot), s, partial=False)
            done = sum(p.count for p in a.pieces[: r.piece]) + r.offset
            assert samples_of(r.assignment) == samples_of(a) and not (set(samples_of(a)[done:]) & read)


def test_redistribution_reads_each_sample_a_shuffle_buffer_held_exactly_once():
    rng = random.Random(2)
    for counts, _w, _n, _e in layouts(seed=99, cases=40):
        snap = snapshot_of(counts)
        positions, read, held = [], set(), set()
        for s in slots(1, 2):
            a = split(snap, seed=0, epoch=0, slot=s)
            taken = samples_of(a)[: rng.randint(0, a.quota)]  # left the first stage: delivered or buffered
            buffered = rng.sample(taken, k=min(len(taken), rng.randint(0, 5)))
            done = sum(1 for _ in taken)
            piece, offset = 0, done
            while piece < len(a.pieces) and offset >= a.pieces[piece].count and offset:
                offset -= a.pieces[piece].count
                piece += 1
            rng_state = list(random.Random(0).getstate())
            rng_state[1] = list(rng_state[1])
            positions.append(SavedPosition(s.rank, s.worker, piece, offset, {}, None,
                                           {"rng": rng_state, "buffer": [list(p) for p in buffered]}))
            read |= set(taken) - set(buffered)
            held |= set(buffered)
        state = ResumeState(0, snap, 1, 2, tuple(positions), "t")
        new = [restart(state, lambda slot: split(snap, seed=0, epoch=0, slot=slot), s, partial=False).assignment
               for s in slots(1, 3)]
        resumed = collections.Counter(x for a in new for x in samples_of(a))
        assert max(resumed.values(), default=1) == 1 and held <= set(resumed) and not (set(resumed) & read)

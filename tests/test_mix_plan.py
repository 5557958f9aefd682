"""The mix's arithmetic: counts by largest remainder, the interleaving schedule, the rotation."""

from __future__ import annotations

import collections
import random
from fractions import Fraction

import numpy
import pytest

from wdsrefresh.mix.plan import epoch_counts, largest_remainder, position, taken, turns
from wdsrefresh.mix.rotation import Rotation, select
from wdsrefresh.core.snapshot import ShardInfo, Snapshot, snapshot_id


def test_largest_remainder_is_exact_and_gives_the_rest_to_the_largest_remainders():
    assert largest_remainder(10, [Fraction(1), Fraction(1), Fraction(1)]) == [4, 3, 3]
    assert largest_remainder(100, [Fraction(3, 10), Fraction(7, 10)]) == [30, 70]
    assert largest_remainder(7, [Fraction(0), Fraction(2)]) == [0, 7]


def test_counts_round_the_total_down_to_the_world_size_and_give_an_empty_sources_share_away():
    weights = {"fresh": Fraction(3, 10), "base": Fraction(7, 10)}
    assert epoch_counts({"fresh": 50, "base": 500}, weights=weights, epoch_size=1001, world_size=4) == (
        {"fresh": 300, "base": 700}, 1)
    assert epoch_counts({"fresh": 0, "base": 500}, weights=weights, epoch_size=1000) == ({"fresh": 0, "base": 1000}, 0)
    assert epoch_counts({"fresh": 20, "base": 500}, weights=weights) == ({"fresh": 156, "base": 364}, 0)
    assert epoch_counts({"a": 10, "b": 4}, repeat={"a": Fraction(1), "b": Fraction(5, 2)}) == ({"a": 10, "b": 10}, 0)
    assert epoch_counts({"a": 10, "b": 3}, world_size=2) == ({"a": 9, "b": 3}, 1)  # a concatenation
    assert epoch_counts({"fresh": 0, "base": 0}, weights=weights, epoch_size=10) == ({"fresh": 0, "base": 0}, 0)


def test_the_schedule_built_for_any_range_is_that_range_of_the_whole_one():
    rng = random.Random(1)
    for _ in range(100):
        counts = [rng.randint(0, 200) for _ in range(rng.randint(1, 4))]
        total = sum(counts)
        whole, _ = turns(counts, 0, total)
        for i, n in enumerate(counts):
            assert (whole == i).sum() == n
            spots = numpy.nonzero(whole == i)[0]
            for k in range(0, n, 5):
                assert position(counts, i, k) == spots[k]
        lo = rng.randint(0, total)
        hi = rng.randint(lo, total)
        part, ranges = turns(counts, lo, hi)
        assert (part == whole[lo:hi]).all()
        assert ranges == [(int((whole[:lo] == i).sum()), int((whole[:hi] == i).sum())) for i in range(len(counts))]
        assert all(taken(counts, i, hi) == ranges[i][1] for i in range(len(counts)))


@pytest.mark.parametrize("counts", [[300, 700, 0], [333, 333, 334], [1, 998, 1], [123, 456, 789], [50, 5000, 950]])
def test_every_window_of_100_holds_each_source_within_two_samples_of_its_share(counts):
    total = sum(counts)
    whole, _ = turns(counts, 0, total)
    for i, n in enumerate(counts):
        seen = numpy.concatenate(([0], numpy.cumsum(whole == i)))
        windows = seen[100:] - seen[:-100]
        assert numpy.abs(windows - 100 * n / total).max() < 2


def _snapshot(shards, epoch=0) -> Snapshot:
    infos = tuple(ShardInfo(url=f"/d/{name}", path=f"/d/{name}", size=100 * n, mtime_ns=mtime, nsamples=n, name=name,
                            digest=f"{name}:{version}") for name, n, mtime, version in shards)
    return Snapshot(epoch, infos, snapshot_id(infos))


def _read(snapshot, pieces) -> collections.Counter:
    return collections.Counter((snapshot.shards[p.shard].name, i) for p in pieces for i in range(p.start, p.stop))


def test_a_fixed_source_is_read_whole_once_before_any_sample_twice():
    rng = random.Random(0)
    for _ in range(200):
        shards = [(f"s{i}", rng.randint(0, 9), rng.randint(0, 100), 0) for i in range(rng.randint(1, 6))]
        everything = [(name, i) for name, n, _, _ in shards for i in range(n)]
        rotation, reads = Rotation(), collections.Counter()
        for epoch in range(8):
            snapshot = _snapshot(shards, epoch)
            count = rng.randint(0, 2 * len(everything) + 3)
            pieces, rotation = select(snapshot, rotation, count, seed=0, epoch=epoch, name="s")
            got = _read(snapshot, pieces)
            assert sum(got.values()) == (count if everything else 0)
            if everything:
                assert max(got.values(), default=0) <= -(-count // len(everything))  # at most ceil(n / len)
                reads.update(got)
                assert max(reads[k] for k in everything) - min(reads[k] for k in everything) <= 1


def test_new_and_replaced_shards_are_read_first_newest_first_then_the_least_recently_read():
    shards = [("old0", 10, 1, 0), ("old1", 10, 2, 0)]
    pieces, rotation = select(_snapshot(shards), Rotation(), 15, seed=0, epoch=0, name="s", shuffle=False)
    assert sorted(_read(_snapshot(shards), pieces)) == sorted([("old1", i) for i in range(10)] +
                                                            [("old0", i) for i in range(5)])
    grown = [("old0", 10, 1, 0), ("old1", 10, 2, 1), ("new", 4, 50, 0)]  # old1 replaced, new added
    snapshot = _snapshot(grown, 1)
    pieces, rotation = select(snapshot, rotation, 16, seed=0, epoch=1, name="s", shuffle=False)
    got = _read(snapshot, pieces)
    assert {k for k in got if k[0] == "new"} == {("new", i) for i in range(4)}
    assert {k for k in got if k[0] == "old1"} == {("old1", i) for i in range(10)}  # new content: unread again
    assert {k for k in got if k[0] == "old0"} == {("old0", 5), ("old0", 6)}
    assert rotation.marks["old0"].done == 7 and rotation.cycle == 0


def test_the_rotation_state_round_trips_as_plain_values_and_holds_only_current_shards():
    pieces, rotation = select(_snapshot([("a", 5, 1, 0), ("b", 3, 2, 0)]), Rotation(), 4, seed=0, epoch=0, name="s")
    assert Rotation.from_doc(rotation.to_doc()) == rotation
    _, later = select(_snapshot([("b", 3, 2, 0)], 1), rotation, 2, seed=0, epoch=1, name="s")
    assert list(later.marks) == ["b"]
    with pytest.raises(ValueError, match="rotation.done"):
        Rotation.from_doc({**rotation.to_doc(), "done": b"\0" * 3})

"""Invariant: the shard list is re-resolved every epoch (growth and removal seen next epoch)."""

import os

import pytest
import torch

import wdsrefresh as wr
from shardutil import write_shard

LOADERS = [(0, False, None), (2, False, None), (2, True, None), (2, True, "spawn")]


def keys_of(loader) -> list[str]:
    return [s["__key__"] for s in loader]


def loader_for(ds, num_workers, persistent, context=None):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=persistent,
                                       multiprocessing_context=context if num_workers else None)


@pytest.mark.parametrize("num_workers,persistent,context", LOADERS)
@pytest.mark.parametrize("call_set_epoch", [True, False])
def test_added_shard_is_read_next_epoch_and_removed_one_is_not(
    shard_dir, num_workers, persistent, context, call_set_epoch
):
    write_shard(shard_dir, "a.tar", 10)
    write_shard(shard_dir, "b.tar", 7)
    ds = wr.RefreshingWebDataset(shard_dir)
    loader = loader_for(ds, num_workers, persistent, context)

    def epoch(e):
        if call_set_epoch:
            ds.set_epoch(e)
        return keys_of(loader)

    first = epoch(0)
    assert sorted(first) == sorted([f"a/{i:06d}" for i in range(10)] + [f"b/{i:06d}" for i in range(7)])

    write_shard(shard_dir, "c.tar", 5)
    second = epoch(1)
    assert sorted(second) == sorted(first + [f"c/{i:06d}" for i in range(5)])

    os.unlink(os.path.join(shard_dir, "a.tar"))
    third = epoch(2)
    assert sorted(third) == sorted(k for k in second if not k.startswith("a/"))
    assert ds.stats().epoch == 2


def test_set_epoch_returns_the_snapshot_every_worker_reads(shard_dir):
    write_shard(shard_dir, "a.tar", 4)
    ds = wr.RefreshingWebDataset(shard_dir)
    snap = ds.set_epoch(5)
    assert snap.epoch == 5 and [os.path.basename(s.url) for s in snap.shards] == ["a.tar"]
    assert snap.shards[0].nsamples == 4 and snap.shards[0].digest.startswith("xxh3_128:")
    write_shard(shard_dir, "b.tar", 4)  # lands after the snapshot: not part of epoch 5
    keys = keys_of(loader_for(ds, 2, False))
    assert sorted(keys) == [f"a/{i:06d}" for i in range(4)]
    stats = ds.stats(5)
    assert (stats.samples, stats.yielded, stats.added) == (4, 4, 1)


def test_shard_order_differs_between_epochs_and_repeats_for_same_seed(shard_dir):
    for i in range(12):
        write_shard(shard_dir, f"s{i:02d}.tar", 2)

    def order(seed, epoch):
        ds = wr.RefreshingWebDataset(shard_dir, seed=seed)
        ds.set_epoch(epoch)
        seen = []
        for s in ds:
            shard = s["__key__"].split("/")[0]
            if shard not in seen:
                seen.append(shard)
        return seen

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 1) != order(1, 1)
    assert sorted(order(0, 3)) == [f"s{i:02d}" for i in range(12)]


def test_state_dir_from_an_earlier_job_hands_out_nothing_stale(shard_dir, tmp_path):
    state = str(tmp_path / "state")
    write_shard(shard_dir, "a.tar", 3)
    first = wr.RefreshingWebDataset(shard_dir, state_dir=state)
    for _ in range(3):
        assert len(keys_of(first)) == 3
    write_shard(shard_dir, "b.tar", 3)
    second = wr.RefreshingWebDataset(shard_dir, state_dir=state)  # e.g. a restarted job
    assert len(keys_of(second)) == 6
    assert second.stats().epoch == 0


def test_long_runs_keep_a_bounded_state_directory(shard_dir):
    write_shard(shard_dir, "a.tar", 2)
    ds = wr.RefreshingWebDataset(shard_dir)
    loader = loader_for(ds, 2, True)
    for epoch in range(20):
        ds.set_epoch(epoch)
        assert len(keys_of(loader)) == 2
    files = os.listdir(ds.state_directory)
    assert len(files) < 20, sorted(files)
    assert ds.stats(19).yielded == 2

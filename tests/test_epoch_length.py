"""len(ds) and len(loader): known right after set_epoch, and after a resume, what remains."""

import copy

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import wdsrefresh as wr
from shardutil import write_shard

SIZES = (20, 13, 20, 7, 20, 11, 19)


def pipeline(shard_dir, shuffle=False):
    ds = wr.RefreshingWebDataset(shard_dir, watch=False, seed=3)
    if shuffle:
        ds = ds.shuffle(8)
    return ds.to_tuple("__key__", "cls").batched(3)


def interrupted(shard_dir, batches, shuffle):
    """The state of a 2-worker loader saved after ``batches`` batches of epoch 1."""
    ds = pipeline(shard_dir, shuffle)
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=2)
    ds.set_epoch(0)
    for _ in loader:
        pass
    ds.set_epoch(1)
    it = iter(loader)
    seen = [next(it) for _ in range(batches)]
    state = copy.deepcopy(loader.state_dict())
    del it, loader
    return seen, state


@pytest.mark.timeout(120)
@pytest.mark.parametrize("new_workers,shuffle", [(2, False), (2, True), (3, False), (0, False)])
def test_a_resumed_epochs_length_is_what_the_loader_still_yields(shard_dir, new_workers, shuffle):
    for i, n in enumerate(SIZES):
        write_shard(shard_dir, f"s{i}.tar", n)
    full = pipeline(shard_dir, shuffle)
    full.set_epoch(1, num_workers=2)
    whole = len(full)
    seen, state = interrupted(shard_dir, 9, shuffle)

    ds = pipeline(shard_dir, shuffle)
    ds.load_state_dict(state)
    ds.set_epoch(1, num_workers=new_workers)
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=new_workers)
    length = len(loader)
    rest = list(loader)
    assert length == len(ds) == ds.epoch_length(1) == len(rest)
    keys = [k for batch in seen + rest for k in batch[0]]
    assert sorted(keys) == sorted(f"s{i}/{j:06d}" for i, n in enumerate(SIZES) for j in range(n))
    if new_workers == 2:  # the same layout: each worker yields exactly the batches it had left
        assert length == whole - len(seen)
    assert ds.epoch_length(1, batch_size=None) == sum(SIZES) - sum(len(b[0]) for b in seen)
    ds.set_epoch(2)  # the next epoch (the same shards) is whole again
    assert len(ds) == full.epoch_length(1, num_workers=new_workers)


def test_len_is_known_right_after_set_epoch_given_the_loaders_num_workers(shard_dir):
    for i, n in enumerate(SIZES):
        write_shard(shard_dir, f"s{i}.tar", n)
    ds = (wr.RefreshingWebDataset(shard_dir).shuffle(50).decode()  # the README's pipeline
          .to_tuple("__key__", "cls").batched(4))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    ds.set_epoch(0, num_workers=2)
    assert len(ds) == len(loader) == sum(1 for _ in loader)
    write_shard(shard_dir, "late.tar", 9)
    fresh = (wr.RefreshingWebDataset(shard_dir).to_tuple("__key__").batched(4))
    fresh.set_epoch(0, num_workers=2)
    fresh.set_epoch(1)  # num_workers is kept for later epochs
    assert len(fresh) == sum(1 for _ in torch.utils.data.DataLoader(fresh, batch_size=None, num_workers=2))
    with pytest.raises(ValueError, match="num_workers=-1"):
        fresh.set_epoch(2, num_workers=-1)
    ds.close()
    fresh.close()

"""Resuming on another num_workers: through the loader it is refused, naming the call that works
(StatefulDataLoader hands worker i only worker i's state: a new worker gets none, a surplus
state is dropped); through ds.load_state_dict every unread sample is read once."""

import collections
import copy

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

import wdsrefresh as wr
from shardutil import write_shard
from wdsrefresh.epoch.resume import ResumeError

SIZES = (7, 9, 5, 11, 8, 6)
EVERYTHING = collections.Counter(f"s{i}/{j:06d}" for i, n in enumerate(SIZES) for j in range(n))


def pipeline(shard_dir):
    return wr.RefreshingWebDataset(shard_dir, watch=False).to_tuple("__key__").batched(2)


def make(shard_dir, num_workers):
    ds = pipeline(shard_dir)
    return ds, StatefulDataLoader(ds, batch_size=None, num_workers=num_workers)


def keys(batches) -> list[str]:
    return [k for batch in batches for k in batch[0]]


@pytest.fixture
def shards(shard_dir):
    for i, n in enumerate(SIZES):
        write_shard(shard_dir, f"s{i}.tar", n)
    return shard_dir


def interrupted(shard_dir, num_workers, batches=5):
    """The keys a loader of ``num_workers`` yielded before its state was saved, and the state."""
    _, loader = make(shard_dir, num_workers)
    it = iter(loader)
    seen = [next(it) for _ in range(batches)]
    state = copy.deepcopy(loader.state_dict())
    del it, loader
    return keys(seen), state


@pytest.mark.timeout(120)
@pytest.mark.parametrize("old,new", [(2, 3), (3, 2)])
def test_loading_another_worker_counts_state_into_the_loader_names_the_call_that_works(shards, old, new):
    _, state = interrupted(shards, old)
    _, loader = make(shards, new)
    loader.load_state_dict(state)
    got = []
    with pytest.raises(ResumeError, match=r"load the whole state into the dataset before building the loader, "
                                          r"ds\.load_state_dict\(state\)") as raised:
        for batch in loader:
            got.append(batch)
    assert "merge()" not in str(raised.value)
    assert got == []  # nothing read from a partial state


@pytest.mark.timeout(120)
@pytest.mark.parametrize("old,new", [(2, 3), (3, 2)])
def test_the_named_call_resumes_on_another_worker_count_reading_each_sample_once(shards, old, new):
    before, state = interrupted(shards, old)
    ds = pipeline(shards)
    ds.load_state_dict(state)  # before the loader is built
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=new)
    after = keys(loader)
    assert collections.Counter(before + after) == EVERYTHING
    assert collections.Counter(keys(loader)) == EVERYTHING  # and the next epoch whole


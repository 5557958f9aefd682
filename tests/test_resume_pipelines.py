"""Exactly once across a checkpoint, through the pipelines users write: batched, shuffled, decoded.

A run saves its loader's state after every batch and stops after k batches; a new dataset
and loader (a restarted job) load the state while a shard lands in the directory. What was
yielded before the checkpoint plus what the resumed run yields must be the uninterrupted
epoch, sample for sample, and the next epoch must include the new shard.
"""

from __future__ import annotations

import copy

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

import wdsrefresh as wr
from shardutil import write_shard

SIZES = (7, 9, 5, 11, 8, 13)
PIPELINES = {
    "to_tuple.batched(3)": lambda ds: ds.to_tuple("__key__", "cls").batched(3),
    "shuffle(50).batched(4)": lambda ds: ds.shuffle(50, initial=20).to_tuple("__key__", "cls").batched(4),
    "decode.to_tuple.batched(5)": lambda ds: ds.decode().to_tuple("__key__", "cls").batched(5),
}


def loader_for(directory: str, pipeline: str, num_workers: int, persistent: bool) -> StatefulDataLoader:
    ds = PIPELINES[pipeline](wr.RefreshingWebDataset(directory, watch=False, seed=3))
    return StatefulDataLoader(ds, batch_size=None, num_workers=num_workers,
                              persistent_workers=persistent and num_workers > 0)


def keys(batches) -> list[str]:
    return [k for keys_, _cls in batches for k in keys_]


LAYOUTS = [(0, False), (2, False), (2, True)]


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("num_workers,persistent", LAYOUTS)
def test_resume_through_the_pipeline_yields_the_uninterrupted_epoch(tmp_path, pipeline, num_workers, persistent):
    d = str(tmp_path)
    for i, n in enumerate(SIZES):
        write_shard(d, f"s{i:02d}.tar", n)
    uninterrupted = keys(loader_for(d, pipeline, num_workers, persistent))
    assert sorted(uninterrupted) == sorted(f"s{i:02d}/{j:06d}" for i, n in enumerate(SIZES) for j in range(n))

    loader = loader_for(d, pipeline, num_workers, persistent)
    before, it = [], iter(loader)
    for _ in range(7):
        before.append(next(it))
    state = copy.deepcopy(loader.state_dict())
    del it, loader

    write_shard(d, "s99.tar", 4)  # lands while the job is down
    loader = loader_for(d, pipeline, num_workers, persistent)
    loader.load_state_dict(state)
    resumed = keys(loader)
    assert keys(before) + resumed == uninterrupted
    assert "s99/000000" in keys(loader)  # the next epoch resolves a fresh snapshot


def test_batched_yields_a_full_batch_without_pulling_the_next_sample(tmp_path):
    write_shard(str(tmp_path), "a.tar", 7)
    ds = wr.RefreshingWebDataset(str(tmp_path), watch=False, shardshuffle=False).batched(3, collation_fn=None)
    it = iter(ds)
    assert [s["__key__"] for s in next(it)] == ["a/000000", "a/000001", "a/000002"]
    assert ds.state_dict()["consumers"][0]["offset"] == 3  # not 4: no sample taken that no batch carried
    assert [len(b) for b in it] == [3, 1]


def test_webdatasets_own_sample_holding_stages_refuse_a_checkpoint(tmp_path):
    import webdataset as wds

    write_shard(str(tmp_path), "a.tar", 7)
    ds = wr.RefreshingWebDataset(str(tmp_path), watch=False).batched(2).compose(wds.filters.unbatched())
    next(iter(ds))
    with pytest.raises(RuntimeError, match=r"\.unbatched\(\)"):
        ds.state_dict()
    ds = wr.RefreshingWebDataset(str(tmp_path), watch=False).shuffle(5, rng=__import__("random").Random(1))
    next(iter(ds))
    with pytest.raises(RuntimeError, match="seed="):
        ds.state_dict()

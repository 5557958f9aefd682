"""Checkpoints of a mix: exact through .shuffle().batched() on the same layout, each sample once
on another, the rotation continued, and sources known by name across a restart."""

from __future__ import annotations

import collections
import copy
import logging

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

import wdsrefresh as wr
from shardutil import write_shard, write_sources

WEIGHTS = {"fresh": 0.3, "base": 0.7}


@pytest.fixture
def dirs(tmp_path):
    return write_sources(tmp_path, fresh=(7, 5), base=(9, 11, 8, 13, 6))


def mixed(sources, weights=WEIGHTS):
    return wr.RefreshingWebDataset(sources, weights=weights, epoch_size=30, seed=5)


def pipeline(ds):
    return ds.shuffle(8, initial=4).to_tuple("__key__", "__source__").batched(3)


def keys(loader) -> list[str]:
    return [k for batch in loader for k in batch[0]]


def interrupted(sources, num_workers, batches):
    """The keys of the first ``batches`` batches, and the loader's state then."""
    loader = StatefulDataLoader(pipeline(mixed(sources)), batch_size=None, num_workers=num_workers)
    got, it = [], iter(loader)
    for _ in range(batches):
        got.extend(next(it)[0])
    return got, copy.deepcopy(loader.state_dict())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_through_shuffle_and_batched_yields_the_rest_and_continues_the_rotation(dirs, num_workers):
    loader = StatefulDataLoader(pipeline(mixed(dirs)), batch_size=None, num_workers=num_workers)
    uninterrupted = [keys(loader) for _ in range(3)]  # three epochs
    before, state = interrupted(dirs, num_workers, 4)
    loader = StatefulDataLoader(pipeline(mixed(dirs)), batch_size=None, num_workers=num_workers)
    loader.load_state_dict(state)
    assert before + keys(loader) == uninterrupted[0]
    assert [keys(loader), keys(loader)] == uninterrupted[1:]  # the rotation went on from the saved state


def test_resume_on_more_workers_reads_each_remaining_sample_once(dirs):
    whole = collections.Counter(s["__key__"] for s in mixed(dirs))
    before, state = interrupted(dirs, 2, 3)
    ds = mixed(dirs)
    ds.load_state_dict(state)
    ds.set_epoch(0)
    rest = keys(StatefulDataLoader(pipeline(ds), batch_size=None, num_workers=3))
    assert collections.Counter(before + rest) == whole
    assert ds.epoch_length(0, batch_size=None, num_workers=3) == len(rest)


def test_a_source_gone_or_new_at_restart_is_accepted_from_the_next_epoch(dirs, tmp_path, caplog):
    write_shard(str(tmp_path), "other0.tar", 10)
    before, state = interrupted(dirs, 0, 4)
    whole = collections.Counter(s["__source__"] for s in mixed(dirs))
    sources = {"fresh": dirs["fresh"], "other": str(tmp_path / "other0.tar")}  # base gone, other new
    ds = mixed(sources, {"fresh": 0.5, "other": 0.5})
    with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
        ds.load_state_dict(state)
    assert "['base'] of the saved state are no longer in the dataset" in caplog.text
    assert "['other'] are new" in caplog.text
    loader = StatefulDataLoader(pipeline(ds), batch_size=None, num_workers=0)
    rest = [s for batch in loader for s in batch[1]]
    assert collections.Counter([k.split("/")[0].rstrip("0123456789") for k in before] + rest) == whole
    assert collections.Counter(s for batch in loader for s in batch[1]) == {"fresh": 15, "other": 15}


def test_a_name_standing_for_another_source_at_restart_is_refused_naming_it(dirs, tmp_path):
    _, state = interrupted(dirs, 0, 2)
    write_shard(str(tmp_path), "x.tar", 5)
    ds = mixed({"fresh": dirs["fresh"], "base": str(tmp_path / "x.tar")})
    with pytest.raises(wr.ResumeError, match="source 'base' was directory .* and is .*x.tar.* now"):
        ds.load_state_dict(state)


def test_states_of_one_source_and_of_a_mix_do_not_cross(dirs):
    single = wr.RefreshingWebDataset(dirs["base"])
    next(iter(single))
    with pytest.raises(wr.ResumeError, match="single-source state cannot resume a mix"):
        mixed(dirs).load_state_dict(single.state_dict())
    _, state = interrupted(dirs, 0, 2)
    with pytest.raises(wr.ResumeError, match=r"a mix's state \(sources \['base', 'fresh'\]\) cannot resume"):
        wr.RefreshingWebDataset(dirs["base"]).load_state_dict(state)

"""A mix of named sources in one process: exact counts, the schedule's proportions in every
window, the rotation across epochs, empty sources, per-source options, what it reports."""

from __future__ import annotations

import collections
import json
import logging
import os

import pytest
import torch

import wdsrefresh as wr
from shardutil import write_shard, write_sources


def source_of(key: str) -> str:
    return key.split("/")[0].rstrip("0123456789")


def read_epoch(ds, epoch, num_workers=0):
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [(s["__key__"], s["__source__"]) for s in loader]


def test_every_window_of_100_samples_holds_each_source_within_two_of_its_weight(tmp_path):
    dirs = write_sources(tmp_path, fresh=[40] * 3, base=[50] * 10, replay=[30] * 4)
    weights = {"fresh": 0.2, "base": 0.5, "replay": 0.3}
    ds = wr.RefreshingWebDataset(dirs, weights=weights, epoch_size=1000, shardshuffle=False)
    mix = ds.set_epoch(0)
    assert mix.counts == {"fresh": 200, "base": 500, "replay": 300} and len(mix) == 1000
    got = [s["__source__"] for s in ds]
    assert collections.Counter(got) == mix.counts
    for name, weight in weights.items():
        inside = [int(s == name) for s in got]
        for start in range(len(got) - 100 + 1):
            assert abs(sum(inside[start:start + 100]) - 100 * weight) < 2, (name, start)
    ds.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_source_gives_exactly_its_count_rotating_through_its_samples_newest_first(tmp_path, num_workers):
    dirs = write_sources(tmp_path, fresh=[6, 6], base=[10] * 5)
    ds = wr.RefreshingWebDataset(dirs, weights={"fresh": 0.25, "base": 0.75}, epoch_size=40)
    everything = {f"base{i}/{j:06d}" for i in range(5) for j in range(10)}
    reads: collections.Counter = collections.Counter()
    for epoch in range(6):
        got = read_epoch(ds, epoch, num_workers)
        mix = ds.snapshot(epoch)
        assert collections.Counter(s for _, s in got) == mix.counts == {"fresh": 10, "base": 30}
        assert all(source_of(k) == s for k, s in got)
        base = [k for k, s in got if s == "base"]
        assert len(set(base)) == len(base)  # 30 of 50: never twice in one epoch
        reads.update(base)
        assert max(reads[k] for k in everything) - min(reads[k] for k in everything) <= 1  # once before twice
        fresh = collections.Counter(k for k, s in got if s == "fresh")
        if epoch:  # the shard written after the last epoch is read whole in this one
            assert {f"fresh{epoch + 1}/{j:06d}" for j in range(6)} <= set(fresh)
        assert max(fresh.values()) <= -(-10 // (12 + 6 * epoch))  # fewer than its count: repeats bounded
        write_shard(dirs["fresh"], f"fresh{epoch + 2}.tar", 6)
    assert ds.stats(5).sources["base"]["rotation_cycles"] == 3  # 180 reads of 50 samples: wrapped 3 times
    ds.close()


def test_a_small_source_repeats_each_sample_at_most_ceil_of_count_over_size(tmp_path):
    dirs = write_sources(tmp_path, small=[3], big=[20, 20])
    ds = wr.RefreshingWebDataset(dirs, weights={"small": 0.5, "big": 0.5}, epoch_size=20)
    got = read_epoch(ds, 0)
    small = collections.Counter(k for k, s in got if s == "small")
    assert sum(small.values()) == 10 and max(small.values()) == 4 and min(small.values()) == 3  # ceil(10 / 3)
    assert ds.stats(0).sources["small"]["repeats"] == 7
    ds.close()


def test_repeat_reads_each_source_that_many_times_and_no_weights_concatenate(tmp_path):
    dirs = write_sources(tmp_path, a=[10], b=[4])
    ds = wr.RefreshingWebDataset(dirs, repeat={"a": 1, "b": 2.5})
    assert ds.set_epoch(0).counts == {"a": 10, "b": 10}
    got = collections.Counter(k for k, _ in read_epoch(ds, 0))
    assert all(got[f"a0/{j:06d}"] == 1 for j in range(10)) and sum(v for k, v in got.items() if k[0] == "b") == 10
    ds.close()
    ds = wr.RefreshingWebDataset(dirs, weights={"a": 1, "b": 1})  # no epoch_size: the sources' own 14 samples
    assert ds.set_epoch(0).counts == {"a": 7, "b": 7}
    ds.close()
    ds = wr.RefreshingWebDataset(dirs)  # a dict alone: each sample of every source once, interleaved
    got = read_epoch(ds, 0)
    assert sorted(k for k, _ in got) == sorted([f"a0/{j:06d}" for j in range(10)] + [f"b0/{j:06d}" for j in range(4)])
    assert [s for _, s in got][:4] == ["a", "b", "a", "a"]
    ds.close()


def test_an_empty_source_gives_its_share_to_the_others_and_stats_say_so(tmp_path):
    dirs = write_sources(tmp_path, fresh=[], base=[10] * 3, replay=[10] * 3)
    ds = wr.RefreshingWebDataset(dirs, weights={"fresh": 0.5, "base": 0.25, "replay": 0.25}, epoch_size=40)
    assert ds.set_epoch(0).counts == {"fresh": 0, "base": 20, "replay": 20}
    read_epoch(ds, 0)
    stats = ds.stats(0)
    assert stats.sources["fresh"]["empty"] == "redistributed" and stats.sources["base"]["empty"] is None
    assert stats.sources["fresh"]["weight"] == 0.5 and stats.sources["base"]["share"] == 0.5
    write_shard(dirs["fresh"], "fresh0.tar", 30)
    assert ds.set_epoch(1).counts == {"fresh": 20, "base": 10, "replay": 10}
    ds.close()


@pytest.mark.timeout(60)
def test_a_source_with_min_shards_makes_the_epoch_wait_for_it_and_stats_say_so(tmp_path):
    dirs = write_sources(tmp_path, fresh=[], base=[10])
    ds = wr.RefreshingWebDataset({"fresh": {"source": dirs["fresh"], "min_shards": 1}, "base": dirs["base"]},
                                 weights={"fresh": 0.5, "base": 0.5}, epoch_size=10, timeout=30)

    class PublishWhenWaiting(logging.Handler):  # the producer lands a shard once set_epoch waits
        def emit(self, record):
            if "waiting for min_shards" in record.getMessage() and not os.listdir(dirs["fresh"]):
                write_shard(dirs["fresh"], "fresh0.tar", 5)

    handler = PublishWhenWaiting()
    logging.getLogger("wdsrefresh").addHandler(handler)
    try:
        mix = ds.set_epoch(0)
    finally:
        logging.getLogger("wdsrefresh").removeHandler(handler)
    assert mix.counts == {"fresh": 5, "base": 5}
    assert len(list(ds)) == 10
    assert ds.stats(0).sources["fresh"]["empty"] == "waited"
    ds.close()


def test_per_source_options_override_the_datasets(tmp_path):
    dirs = write_sources(tmp_path, strict=[5], lenient=[5])
    ds = wr.RefreshingWebDataset({"strict": {"source": dirs["strict"], "on_change": "raise"}, "lenient": dirs["lenient"]},
                                 weights={"strict": 0.5, "lenient": 0.5}, epoch_size=10)
    ds.set_epoch(0)
    write_shard(dirs["lenient"], "lenient0.tar", 5, size=80)  # replaced after the snapshot: reloaded
    assert len([s for s in ds]) == 10
    ds.set_epoch(1)
    write_shard(dirs["strict"], "strict0.tar", 5, size=80)  # replaced after the snapshot: this source raises
    with pytest.raises(wr.ShardChangedError, match="strict0.tar"):
        list(ds)
    ds.close()


@pytest.mark.parametrize("kwargs,error,match", [
    ({"weights": {"a": 1}}, ValueError, r"must name every source of the mix exactly: missing \['b'\]"),
    ({"weights": {"a": 1, "b": 1, "c": 1}}, ValueError, r"unknown \['c'\]"),
    ({"weights": {"a": 1, "b": 1}, "repeat": {"a": 1, "b": 1}}, ValueError, "give one"),
    ({"epoch_size": 10}, ValueError, "epoch_size= needs weights="),
    ({"weights": {"a": -1, "b": 1}}, ValueError, r"weights\['a'\]=-1: expected a finite number >= 0"),
    ({"weights": {"a": 0, "b": 0}}, ValueError, "at least one weight"),
    ({"mode": "stream"}, ValueError, 'use mode="epoch" for a mix'),
])
def test_a_mix_that_cannot_be_read_is_refused_saying_why(tmp_path, kwargs, error, match):
    dirs = write_sources(tmp_path, a=[1], b=[1])
    with pytest.raises(error, match=match):
        wr.RefreshingWebDataset(dirs, **kwargs)


def test_source_dicts_and_webdatasets_repeat_are_checked(tmp_path):
    dirs = write_sources(tmp_path, a=[1])
    with pytest.raises(ValueError, match=r"source 'a': unknown option\(s\) \['weight'\]"):
        wr.RefreshingWebDataset({"a": {"source": dirs["a"], "weight": 1}})
    with pytest.raises(ValueError, match="its dict has no 'source' key"):
        wr.RefreshingWebDataset({"a": {"verify": "off"}})
    with pytest.raises(ValueError, match=r"repeat=True: loop over epochs.*repeat=\{name: times\}"):
        wr.RefreshingWebDataset(dirs["a"], repeat=True)
    with pytest.raises(TypeError, match="give the source as a dict"):
        wr.RefreshingWebDataset(dirs["a"], weights={"a": 1})
    wr.RefreshingWebDataset(dirs["a"], repeat=False).close()  # webdataset's default asks for nothing


def test_stats_report_each_source_in_stats_jsonl_tensorboard_and_the_plot(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from wdsrefresh.observe.stats_log import read_jsonl
    from wdsrefresh.observe.plot import figure

    dirs = write_sources(tmp_path, fresh=[4], base=[10] * 4)
    out = tmp_path / "stats"
    ds = wr.RefreshingWebDataset(dirs, weights={"fresh": 0.3, "base": 0.7}, epoch_size=20, stats_dir=str(out))
    for epoch in range(3):
        read_epoch(ds, epoch, num_workers=2)
        write_shard(dirs["fresh"], f"fresh{epoch + 1}.tar", 4)
    stats = ds.stats(2)
    fresh = stats.sources["fresh"]
    assert (fresh["count"], fresh["delivered"], fresh["quota"], fresh["weight"]) == (6, 6, 6, 0.3)
    assert fresh["added"] == 1 and fresh["added_names"] == ["fresh2.tar"] and fresh["shards"] == 3
    assert stats.sources["base"]["rotation_progress"] == 0.05  # 42 reads of 40: wrapped, 2 read since
    assert (stats.yielded, stats.quota, stats.shards) == (20, 20, 7) and "fresh:fresh2.tar" in stats.added_names
    assert stats.samples_per_second > 0 and fresh["seconds"] is not None and stats.consumers == 2
    ds.close()
    rows = read_jsonl(str(out))
    assert [r.epoch for r in rows] == [0, 1, 2] and rows[2].sources["base"]["delivered"] == 14
    assert json.loads((out / "stats.jsonl").read_text().splitlines()[0])["sources"]["fresh"]["count"] == 6

    writer = SummaryWriter(str(tmp_path / "tb"))
    wr.log_stats(writer, rows[2])
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    [delivered] = events.Scalars("wdsrefresh/source/fresh/delivered")
    assert (delivered.step, delivered.value) == (2, 6)

    import matplotlib.pyplot as plt

    fig = figure(rows)
    try:
        [ax] = [a for a in fig.axes if a.get_title().startswith("samples per source")]
        heights = {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}
        assert heights == {"fresh": [6, 6, 6], "base": [14, 14, 14]}
    finally:
        plt.close(fig)

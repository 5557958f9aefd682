"""Seeing the dataset change: EpochStats, stats.jsonl, wr.timed, TensorBoard, epoch length."""

import json
import multiprocessing as mp
import os
import sys

import pytest
import torch

import wdsrefresh as wr
from wdsrefresh.epoch.stats import NAMES_CAP
from shardutil import held_open, make_samples, tar_bytes, write_junk, write_shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import ddp_check  # noqa: E402

# What the producer does before each epoch ("during5": after epoch 5's snapshot, before it is read).
PRODUCER_STEPS = {
    0: [("add", "a.tar", 10, "a"), ("add", "b.tar", 7, "b"), ("add", "c.tar", 5, "c")],
    1: [("add", "d.tar", 4, "d")],
    2: [("add", "b.tar", 9, "b2")],  # replaced by rename, with other samples
    3: [("delete", "a.tar"), ("add", "e.tar", 6, "e")],
    4: [("junk", "junk.tar"), ("held_open", "f.tar", 3)],  # f.tar: its writer never closes it
    "during5": [("delete", "d.tar"), ("add", "e.tar", 6, "e2")],
}


def _producer(directory, conn):
    """A separate process that changes the shard directory one scripted step at a time."""
    held = []  # files this writer keeps open for writing until it ends
    while True:
        step = conn.recv()
        if step is None:
            return
        for action, name, *args in PRODUCER_STEPS.get(step, ()):
            if action == "add":
                write_shard(directory, name, args[0], prefix=args[1])
            elif action == "delete":
                os.unlink(os.path.join(directory, name))
            elif action == "junk":
                write_junk(directory, name)
            elif action == "held_open":
                held.append(open(os.path.join(directory, name), "wb"))
                held[-1].write(tar_bytes(make_samples(name.split(".")[0], args[0])))
                held[-1].flush()
        conn.send(step)


def test_stats_jsonl_records_what_the_producer_did_epoch_by_epoch(tmp_path, procs):
    shard_dir, stats_dir = tmp_path / "shards", tmp_path / "stats"
    shard_dir.mkdir()
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    producer = ctx.Process(target=_producer, args=(str(shard_dir), child_conn))
    producer.start()
    procs.append(producer)

    def produce(step):
        conn.send(step)
        assert conn.poll(60), f"the producer did not finish step {step}"
        assert conn.recv() == step

    log = stats_dir / "stats.jsonl"
    keys, batches, lengths = {}, {}, {}
    with wr.RefreshingWebDataset(str(shard_dir), stats_dir=str(stats_dir)) as ds:
        pipeline = ds.to_tuple("__key__", "cls").batched(5)
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2, persistent_workers=True)
        for epoch in range(6):
            produce(epoch)
            ds.set_epoch(epoch)
            # the line of each epoch is written when the next one is set, not before
            assert (len(log.read_text().splitlines()) if log.exists() else 0) == epoch
            lengths[epoch] = pipeline.epoch_length(num_workers=2)
            if epoch == 5:
                produce("during5")
            got = list(wr.timed(loader))
            batches[epoch] = len(got)
            keys[epoch] = [k for b in got for k in b[0]]
        assert len(log.read_text().splitlines()) == 5  # epoch 5's counters are complete only at close
    conn.send(None)
    producer.join(timeout=30)

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(6))
    for epoch, line in enumerate(lines):
        assert (line["rank"], line["world_size"], line["consumers"]) == (0, 1, 2)
        assert line["batches"] == batches[epoch] and line["yielded"] == len(keys[epoch])
        assert 0 < line["wait_seconds"] <= line["loop_seconds"]
        assert line["seconds"] > 0 and line["samples_per_second"] == pytest.approx(
            line["yielded"] / line["seconds"], rel=1e-3)
        assert line["read_seconds"] > 0 and line["verify_seconds"] > 0 and line["resolve_seconds"] >= 0
        assert line["lag_seconds"] >= 1.0  # the producer dates each shard's last write a second back
        assert (line["padded"], line["left_out"], line["corrupt"]) == (0, 0, 0)
    # what each snapshot held and how it differed from the one before
    snapshot_fields = ["shards", "samples", "added", "added_samples", "added_names", "changed", "changed_samples",
                       "changed_names", "removed", "removed_samples", "removed_names", "pending", "pending_names",
                       "rejected"]
    expected = {
        0: [3, 22, 3, 22, ["a.tar", "b.tar", "c.tar"], 0, 0, [], 0, 0, [], 0, [], 0],
        1: [4, 26, 1, 4, ["d.tar"], 0, 0, [], 0, 0, [], 0, [], 0],
        2: [4, 28, 0, 0, [], 1, 9, ["b.tar"], 0, 0, [], 0, [], 0],
        3: [4, 24, 1, 6, ["e.tar"], 0, 0, [], 1, 10, ["a.tar"], 0, [], 0],
        4: [4, 24, 0, 0, [], 0, 0, [], 0, 0, [], 1, ["f.tar"], 1],
        5: [4, 24, 0, 0, [], 0, 0, [], 0, 0, [], 1, ["f.tar"], 1],
    }
    for epoch, line in enumerate(lines):
        assert [line[f] for f in snapshot_fields] == expected[epoch], f"epoch {epoch}"
    for line in lines[4:]:
        assert list(line["pending_reasons"]) == ["f.tar"]
        assert "still open for writing by another process" in line["pending_reasons"]["f.tar"]
        assert list(line["rejected_reasons"]) == ["junk.tar"]
        assert "not a tar archive" in line["rejected_reasons"]["junk.tar"]
    # what reading met: nothing until epoch 5, whose d.tar was deleted and e.tar replaced after its snapshot
    for line in lines[:5]:
        assert (line["replaced"], line["deleted"], line["skipped"]) == (0, 0, 0)
        assert line["quota"] == line["samples"] == line["yielded"]
        assert line["batches"] == lengths[line["epoch"]]
    last = lines[5]
    assert (last["deleted"], last["deleted_names"], last["skipped"]) == (1, ["d.tar"], 4)
    assert (last["replaced"], last["replaced_names"]) == (1, ["e.tar"])
    assert (last["quota"], last["yielded"]) == (24, 20)
    assert sorted(k for k in keys[5] if k.startswith("e")) == [f"e2/{i:06d}" for i in range(6)]
    # bytes: at least every shard read up to its last member (a tar ends in up to 10 KiB of zeros)
    sizes = {0: [10, 7, 5], 1: [10, 7, 5, 4], 2: [10, 9, 5, 4], 3: [9, 5, 4, 6], 4: [9, 5, 4, 6]}
    for epoch, counts in sizes.items():
        payload = sum(n * 2 * (512 + 512) for n in counts)  # two members per sample: a header and a block each
        assert lines[epoch]["bytes_read"] >= payload


def test_stats_count_what_each_field_says_and_read_back_from_to_dict(shard_dir):
    write_shard(shard_dir, "a.tar", 4)
    ds = wr.RefreshingWebDataset(shard_dir)
    ds.set_epoch(0)
    list(ds)
    stats = ds.stats(0)
    assert (stats.shards, stats.samples, stats.added, stats.added_samples, stats.yielded) == (1, 4, 1, 4, 4)
    assert stats.wait_seconds is None and stats.wait_share is None  # no wr.timed: not measured
    assert wr.EpochStats.from_dict(json.loads(json.dumps(stats.to_dict()))).added_names == ("a.tar",)
    for i in range(NAMES_CAP + 5):  # names beyond the cap are counted, not listed
        write_shard(shard_dir, f"n{i:03d}.tar", 1)
    ds.set_epoch(1)
    stats = ds.stats(1)
    assert stats.added == NAMES_CAP + 5 and len(stats.added_names) == NAMES_CAP
    assert len(ds.snapshot(1)) == stats.samples == 4 + NAMES_CAP + 5
    ds.close()


def test_timed_loader_attributes_the_loop_wait_to_the_epoch_it_read(shard_dir):
    write_shard(shard_dir, "a.tar", 6)
    ds = wr.RefreshingWebDataset(shard_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    timed = wr.timed(loader)
    for epoch in range(2):
        ds.set_epoch(epoch)
        assert sum(1 for _ in timed) == 6
        assert timed.batches == 6 and 0 < timed.wait_seconds <= timed.seconds
        stats = ds.stats(epoch)
        assert stats.batches == 6 and stats.wait_seconds == timed.wait_seconds
        assert stats.loop_seconds == timed.seconds and 0 < stats.wait_share <= 1
    assert len(timed) == 6  # the loader's length: the dataset's, set_epoch having been called
    ds.close()


def test_log_stats_writes_tensorboard_scalars(shard_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    write_shard(shard_dir, "a.tar", 5)
    ds = wr.RefreshingWebDataset(shard_dir)
    ds.set_epoch(3)
    list(ds)
    writer = SummaryWriter(str(tmp_path / "tb"))
    written = wr.log_stats(writer, ds.stats(3))
    written += wr.log_stats(writer, ds.stats(3, all_ranks=True), step=7)  # one rank without torch.distributed
    writer.close()
    ds.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert len(tags) == written and "wdsrefresh/wait_seconds" not in tags  # not measured: left out
    [yielded] = events.Scalars("wdsrefresh/yielded")
    assert (yielded.step, yielded.value) == (3, 5)
    [ranked] = events.Scalars("wdsrefresh/rank0/samples")
    assert (ranked.step, ranked.value) == (7, 5)


# --------------------------------------------------------------------------- all ranks


def _rank(rank, port, directory, stats_dir, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with wr.RefreshingWebDataset(directory, stats_dir=stats_dir) as ds:
        # a spawned rank makes spawn its default start method: fork the workers, as a launcher's rank would
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
        gathered = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            assert len(ds) == ds.epoch_length(epoch)
            n = sum(1 for _ in wr.timed(loader))
            gathered.append({"length": len(ds), "items": n,
                             "all": [s.to_dict() for s in ds.stats(epoch, all_ranks=True)]})
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(gathered, f)
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_stats_of_all_ranks_are_gathered_over_gloo_and_logged_by_each(tmp_path, procs):
    directory, stats_dir, out = tmp_path / "shards", tmp_path / "stats", tmp_path / "out"
    directory.mkdir()
    out.mkdir()
    for name, n in (("a.tar", 5), ("b.tar", 8), ("c.tar", 4)):
        write_shard(str(directory), name, n)
    ctx = mp.get_context("spawn")
    port = ddp_check.free_port()
    ranks = [ctx.Process(target=_rank, args=(r, port, str(directory), str(stats_dir), str(out))) for r in range(2)]
    for p in ranks:
        p.start()
        procs.append(p)
    for p in ranks:
        p.join(timeout=150)
    assert [p.exitcode for p in ranks] == [0, 0]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [e["all"] for e in seen[0]] == [e["all"] for e in seen[1]]  # every rank gathered the same
    lines = [json.loads(line) for line in (stats_dir / "stats.jsonl").read_text().splitlines()]
    assert sorted((line["epoch"], line["rank"]) for line in lines) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch in range(2):
        everyone = seen[0][epoch]["all"]
        assert [s["rank"] for s in everyone] == [0, 1] and {s["world_size"] for s in everyone} == {2}
        assert len({s["snapshot_id"] for s in everyone}) == 1
        assert [s["quota"] for s in everyone] == [8, 8] and {s["left_out"] for s in everyone} == {1}
        assert [s["yielded"] for s in everyone] == [8, 8] and sum(s["consumers"] for s in everyone) == 4
        for rank in range(2):
            assert seen[rank][epoch]["length"] == seen[rank][epoch]["items"] == 8
            assert everyone[rank]["batches"] == 8 and everyone[rank]["wait_seconds"] > 0
            [line] = [li for li in lines if (li["epoch"], li["rank"]) == (epoch, rank)]
            assert line == everyone[rank]  # each rank logged the very stats the others gathered


# --------------------------------------------------------------------------- epoch length


def test_len_before_set_epoch_says_to_call_it_and_after_counts_this_ranks_samples(shard_dir):
    write_shard(shard_dir, "a.tar", 10)
    write_shard(shard_dir, "b.tar", 7)
    ds = wr.RefreshingWebDataset(shard_dir)
    with pytest.raises(TypeError, match=r"call ds.set_epoch\(epoch\) first"):
        len(ds)
    ds.set_epoch(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert len(ds) == len(loader) == ds.epoch_length(0) == sum(1 for _ in loader) == 17
    write_shard(shard_dir, "c.tar", 3)
    ds.set_epoch(1)
    assert len(ds) == 20 and ds.epoch_length(0) == 17
    ds.close()


@pytest.mark.parametrize("partial", [True, False])
def test_epoch_length_of_a_batched_pipeline_counts_each_workers_batches(shard_dir, partial):
    write_shard(shard_dir, "a.tar", 10)
    write_shard(shard_dir, "b.tar", 7)
    ds = wr.RefreshingWebDataset(shard_dir)
    batched = ds.to_tuple("__key__").batched(5, partial=partial)
    ds.set_epoch(0)
    with pytest.raises(TypeError, match="num_workers"):  # worker shares 9 and 8: batches depend on the split
        len(batched)
    loader = torch.utils.data.DataLoader(batched, batch_size=None, num_workers=2)
    expected = 4 if partial else 2  # ceil(9/5) + ceil(8/5), or floor of each
    assert batched.epoch_length(num_workers=2) == expected == sum(1 for _ in loader)
    assert len(batched) == expected  # the loader's worker count is known now
    assert batched.epoch_length(num_workers=0) == (4 if partial else 3)  # one consumer: 17 samples
    assert batched.epoch_length(batch_size=None) == 17
    ds.close()


# --------------------------------------------------------------------------- coming from webdataset


def test_context_manager_closes_the_watcher(shard_dir):
    write_shard(shard_dir, "a.tar", 2)
    with wr.RefreshingWebDataset(shard_dir) as ds:
        ds.set_epoch(0)
        assert ds.watching is not None
    assert ds.watching is None


def test_url_is_the_path_as_given_and_local_path_the_file_read(tmp_path, monkeypatch):
    versions = tmp_path / "v1"
    versions.mkdir()
    write_shard(str(versions), "a.tar", 2)
    os.symlink("v1", tmp_path / "current")
    monkeypatch.chdir(tmp_path)
    with wr.RefreshingWebDataset("current") as ds:
        sample = next(iter(ds))
    assert sample["__url__"] == os.path.join("current", "a.tar")
    assert sample["__local_path__"] == os.path.realpath(versions / "a.tar")


def test_webdataset_splitters_are_accepted_and_others_refused_saying_why(shard_dir):
    import webdataset as wds

    write_shard(shard_dir, "a.tar", 2)
    ds = wr.RefreshingWebDataset(shard_dir, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                                 resampled=False, cache_dir=None)
    assert len(list(ds)) == 2
    for bad, says in [({"workersplitter": None}, "splits each epoch's samples exactly"),
                      ({"nodesplitter": lambda src: src}, "remove it"),
                      ({"resampled": True}, 'mode="stream"'),
                      ({"cache_dir": "/tmp/cache"}, 'storage_options={"cache_dir": ..., "cache_limit"'),
                      ({"select_files": lambda n: True}, ".map("),
                      ({"shardshuffle": -1}, "a number of shards"),
                      ({"mode": "resampled"}, "resampled=True")]:
        with pytest.raises(ValueError, match=None) as caught:
            wr.RefreshingWebDataset(shard_dir, **bad)
        assert says in str(caught.value), (bad, str(caught.value))
    with pytest.raises(TypeError, match="its arguments are: source, shardshuffle, seed"):
        wr.RefreshingWebDataset(shard_dir, shard_shuffle=True)


def test_shardshuffle_as_webdataset_users_write_it(shard_dir):
    for i in range(12):
        write_shard(shard_dir, f"s{i:02d}.tar", 1)

    def order(shardshuffle):
        ds = wr.RefreshingWebDataset(shard_dir, shardshuffle=shardshuffle)
        ds.set_epoch(1)
        return [s["__key__"].split("/")[0] for s in ds]

    in_order = [f"s{i:02d}" for i in range(12)]
    assert order(None) == order(0) == order(False) == in_order  # webdataset's default: no shuffle
    assert order(100) == order(True) != in_order


def test_shuffle_buffer_uses_the_rng_it_is_given(shard_dir):
    import random

    write_shard(shard_dir, "a.tar", 50)

    def keys(**kw):
        ds = wr.RefreshingWebDataset(shard_dir)
        ds.set_epoch(0)
        return [s["__key__"] for s in ds.shuffle(20, **kw)]

    assert keys(rng=random.Random(7)) == keys(rng=random.Random(7))
    assert keys(rng=random.Random(7)) != keys(rng=random.Random(8))
    assert sorted(keys(rng=random.Random(7))) == sorted(keys())


def test_empty_check_makes_an_epoch_without_samples_an_error(shard_dir, caplog):
    with held_open(shard_dir, "a.tar", 3):  # pending while its writer holds it open
        assert list(wr.RefreshingWebDataset(shard_dir)) == []  # the default: an empty epoch
        caplog.clear()
        with pytest.raises(wr.NoShardsError, match="1 pending") as raised:
            wr.RefreshingWebDataset(shard_dir, empty_check=True).set_epoch(0)
        assert shard_dir in str(raised.value)
        assert not [r for r in caplog.records if "is empty" in r.getMessage()]  # the error alone says it
        with pytest.raises(wr.NoShardsError, match="no sample to read"):
            list(wr.RefreshingWebDataset(shard_dir, empty_check=True))


def test_stats_dir_refused_in_stream_mode(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="no epochs"):
        wr.RefreshingWebDataset(shard_dir, mode="stream", stats_dir=str(tmp_path / "stats"))


def test_stream_stats_give_latency_percentiles():
    stats = wr.StreamStats(consumers=2, shards=5, samples=50, pending=0, rejected=0, replaced=0, deleted=0,
                           corrupt=0, latencies=(0.5, 0.1, 0.4, 0.2, 0.3))
    assert [stats.latency(p) for p in (0, 20, 50, 90, 100)] == [0.1, 0.1, 0.3, 0.5, 0.5]
    doc = stats.to_dict()
    assert (doc["latency_p50"], doc["latency_max"], doc["shards"]) == (0.3, 0.5, 5) and "latencies" not in doc
    assert wr.StreamStats(1, 0, 0, 0, 0, 0, 0, 0, ()).latency(50) is None

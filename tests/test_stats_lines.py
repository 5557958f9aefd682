"""Every epoch's stats line reaches stats.jsonl: at the next set_epoch, at close(), when the
dataset is dropped, or when the interpreter exits, whichever comes first."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import wdsrefresh as wr
from shardutil import write_shard

SIZES = (9, 6, 8)

# a training script that never closes its dataset, and sometimes drops the first pipeline object
TRAIN = textwrap.dedent("""
    import sys
    import torch
    import wdsrefresh as wr

    shards, stats_dir, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ds = wr.RefreshingWebDataset(shards, stats_dir=stats_dir).to_tuple("__key__").batched(4)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in wr.timed(loader):
            pass
    print("trained", flush=True)
""")


def read_lines(stats_dir) -> list[dict]:
    path = os.path.join(stats_dir, "stats.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.timeout(180)
def test_each_epochs_line_is_written_when_the_interpreter_exits_without_close(tmp_path, procs):
    shards, stats_dir = tmp_path / "shards", tmp_path / "stats"
    shards.mkdir()
    for i, n in enumerate(SIZES):
        write_shard(str(shards), f"s{i}.tar", n)
    p = subprocess.Popen([sys.executable, "-c", TRAIN, str(shards), str(stats_dir), "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    out, err = p.communicate(timeout=150)
    assert p.returncode == 0 and out == "trained\n", err

    lines = read_lines(stats_dir)
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    for line in lines:  # the last one as complete as the others: workers' counters and the loop's timing
        assert (line["consumers"], line["yielded"], line["samples"]) == (2, sum(SIZES), sum(SIZES))
        assert line["batches"] == lines[0]["batches"] > 0 and line["loop_seconds"] > 0
    assert "not written" not in err


def test_a_dropped_dataset_writes_its_last_line_and_is_not_kept_alive(shard_dir, tmp_path):
    for i, n in enumerate(SIZES):
        write_shard(shard_dir, f"s{i}.tar", n)
    stats_dir = str(tmp_path / "stats")
    ds = wr.RefreshingWebDataset(shard_dir, stats_dir=stats_dir)
    pipeline = ds.to_tuple("__key__")
    state_directory = ds.state_directory
    for epoch in range(2):
        pipeline.set_epoch(epoch)
        assert len(list(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2))) == sum(SIZES)
    assert [line["epoch"] for line in read_lines(stats_dir)] == [0]
    dropped = weakref.ref(ds)
    del ds, pipeline
    gc.collect()
    assert dropped() is None  # nothing waiting to write a line keeps the dataset alive
    assert [(line["epoch"], line["yielded"]) for line in read_lines(stats_dir)] == [(0, sum(SIZES)),
                                                                                  (1, sum(SIZES))]
    assert not os.path.exists(state_directory)  # and its state directory went with it, after the line


def test_close_writes_the_last_line_once(shard_dir, tmp_path):
    write_shard(shard_dir, "a.tar", 5)
    stats_dir = str(tmp_path / "stats")
    ds = wr.RefreshingWebDataset(shard_dir, stats_dir=stats_dir)
    ds.set_epoch(0)
    assert len(list(ds)) == 5
    ds.close()
    assert [line["epoch"] for line in read_lines(stats_dir)] == [0]
    del ds
    gc.collect()
    assert [line["epoch"] for line in read_lines(stats_dir)] == [0]  # not again when dropped

"""Stream mode: shards dropped while training runs are read once each, soon after they land."""

from __future__ import annotations

import collections
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch.utils.data

import wdsrefresh as wr
from wdsrefresh.epoch.stream import owner
from shardutil import write_shard
from conftest import wait_for

pytestmark = pytest.mark.timeout(60)

HERE = os.path.dirname(os.path.abspath(__file__))

# Drops `count` shards of `n` samples into `directory`, one every `interval` seconds: most by
# temporary name then rename, every fourth written in place in two halves with a pause between
# (a consumer must not read it before it is complete). Prints "<name> <time it landed>".
PRODUCER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from shardutil import tar_bytes, make_samples
directory, count, n, interval = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
for i in range(count):
    name = f"drop-{i:03d}.tar"
    data = tar_bytes(make_samples(f"drop-{i:03d}", n))
    path = os.path.join(directory, name)
    if i % 4 == 3:
        with open(path, "wb") as f:
            f.write(data[:700]); f.flush()
            time.sleep(0.2)
            f.write(data[700:])
    else:
        tmp = os.path.join(directory, "_tmp." + name)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    print(name, time.time(), flush=True)
    time.sleep(interval)
"""


def start_producer(procs, directory: str, count: int, n: int, interval: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, HERE, directory, str(count), str(n), str(interval)],
                            stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    return proc


def consume(ds, expected: int, timeout: float = 30.0):
    """Reads until ``expected`` samples arrived, then closes the stream and drains the loader."""
    # in_order=False: a stream gives workers unequal shares; in order, the loader would wait on
    # the worker with nothing new while the other's samples sit in its queue
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, in_order=False)
    counts: collections.Counter = collections.Counter()
    first_seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    it = iter(loader)
    for sample in it:
        counts[sample["__key__"]] += 1
        first_seen.setdefault(sample["__key__"].split("/")[0], time.time())
        if sum(counts.values()) >= expected:
            break
        assert time.monotonic() < deadline, f"only {sum(counts.values())} of {expected} samples after {timeout} s"
    ds.close()  # ends the stream in both workers: the loader finishes, and nothing is read twice
    for sample in it:
        counts[sample["__key__"]] += 1
    return counts, first_seen


def landed(proc: subprocess.Popen) -> dict[str, float]:
    out, _ = proc.communicate(timeout=30)
    return {name.split(".")[0]: float(t) for name, t in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("poll", [False, 0.1], ids=["inotify", "polling"])
def test_every_dropped_shard_is_read_exactly_once_by_two_workers(tmp_path, procs, poll):
    d = str(tmp_path / "shards")
    os.makedirs(d)
    count, n = (16, 5) if not poll else (8, 5)
    ds = wr.RefreshingWebDataset(d, mode="stream", poll=poll, settle=1.0)  # its writer pauses 0.2 s
    producer = start_producer(procs, d, count, n, interval=0.15)
    counts, first_seen = consume(ds, count * n)
    times = landed(producer)
    assert set(counts) == {f"drop-{i:03d}/{j:06d}" for i in range(count) for j in range(n)}
    assert set(counts.values()) == {1}, {k: c for k, c in counts.items() if c != 1}

    stats = ds.stats()
    assert stats.consumers == 2 and stats.shards == count and stats.samples == count * n
    assert len(stats.latencies) == count
    end_to_end = [first_seen[name] - t for name, t in times.items()]
    print(f"\n[{'poll %.1fs' % poll if poll else 'inotify'}] drop-to-first-sample latency over {count} shards: "
          f"median {stats.median_latency * 1000:.1f} ms in the workers (max {max(stats.latencies) * 1000:.1f} ms), "
          f"median {statistics.median(end_to_end) * 1000:.1f} ms to the training loop")


def test_stream_stops_on_close_while_consumers_wait_for_data(tmp_path):
    sys.path.insert(0, HERE)
    from shardutil import write_shard

    d = str(tmp_path)
    write_shard(d, "first.tar", 3)
    ds = wr.RefreshingWebDataset(d, mode="stream")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, in_order=False)
    it = iter(loader)
    assert sorted(next(it)["__key__"] for _ in range(3)) == [f"first/{i:06d}" for i in range(3)]
    ds.close()  # both workers are up, and nothing new will come: they wait until woken
    assert list(it) == []  # a consumer that slept through close() would hang: the module timeout fails it


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_breaking_out_of_a_stream_loader_lets_its_waiting_workers_exit(tmp_path, persistent, batched):
    """Workers asleep waiting for shards see their loader shut down and exit by themselves.
    Otherwise torch joins each for MP_STATUS_CHECK_INTERVAL (5 s) and then terminates it (its
    SIGTERM handler exits with 0, so only the time tells): 10 s for two workers, against the
    0.2 s a worker takes to notice; the bound is torch's own, for both workers together."""
    write_shard(str(tmp_path), "a.tar", 4)
    ds = wr.RefreshingWebDataset(str(tmp_path), mode="stream")
    if batched:
        ds = ds.batched(2, partial_after=0.1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, in_order=False,
                                         persistent_workers=persistent)
    it = iter(loader)
    for _ in range(2 if batched else 4):
        next(it)
    started = time.monotonic()
    it._shutdown_workers()  # what dropping the iterator does (and, for persistent workers, exit)
    assert time.monotonic() - started < torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL
    ds.close()


def test_stats_of_a_stream_read_without_workers_count_the_shard_just_finished(tmp_path):
    """A loop that stops right after a shard's last sample (a loader without workers fetches
    nothing ahead) sees that shard in ds.stats()."""
    for name in ("a.tar", "b.tar", "c.tar"):
        write_shard(str(tmp_path), name, 40)
    ds = wr.RefreshingWebDataset(str(tmp_path), mode="stream")
    it = iter(ds)
    keys = [next(it)["__key__"] for _ in range(120)]
    assert len(set(keys)) == 120
    stats = ds.stats()
    assert (stats.shards, stats.samples) == (3, 120)
    ds.close()


def test_rendezvous_gives_each_shard_to_exactly_one_consumer_and_moves_few():
    names = [f"shard-{i:05d}.tar" for i in range(2000)]
    four = [owner(n, 4) for n in names]
    assert collections.Counter(four).keys() == {0, 1, 2, 3}
    assert min(collections.Counter(four).values()) > 400
    five = [owner(n, 5) for n in names]
    moved = sum(a != b for a, b in zip(four, five))
    assert all(b == 4 for a, b in zip(four, five) if a != b)  # only shards the new consumer takes move
    assert moved < 600


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers_before,workers_after", [(0, 0), (2, 0), (0, 2), (2, 2)])
def test_stream_checkpoint_resumes_each_sample_once_on_any_layout(tmp_path, workers_before, workers_after):
    import collections
    import copy

    from torchdata.stateful_dataloader import StatefulDataLoader

    d = str(tmp_path)
    sizes = [5, 8, 3, 6, 7, 4]
    for i, n in enumerate(sizes):
        write_shard(d, f"s{i}.tar", n)
    everything = collections.Counter(f"s{i}/{j:06d}" for i, n in enumerate(sizes) for j in range(n))

    def read(ds, workers, count, state=None):
        if state is not None:
            ds.load_state_dict(state)
        # a resumed stream's workers have unequal shares left: an in-order loader would wait on an idle
        # one; the saving run stays in order, as StatefulDataLoader's states follow the order it yields
        loader = StatefulDataLoader(ds.to_tuple("__key__"), batch_size=None, num_workers=workers,
                                    in_order=state is None)
        got, it = [], iter(loader)
        while len(got) < count:
            got.append(next(it)[0])
        return got, copy.deepcopy(loader.state_dict()), loader

    first = wr.RefreshingWebDataset(d, mode="stream")
    before, state, loader = read(first, workers_before, 13)
    first.close()
    del loader
    second = wr.RefreshingWebDataset(d, mode="stream")
    after, _state, loader = read(second, workers_after, sum(sizes) - 13, state)
    second.close()
    assert collections.Counter(before + after) == everything


@pytest.mark.parametrize("num_workers", [0, 1])
def test_partial_batch_arrives_when_no_new_sample_comes(tmp_path, num_workers):
    """13 samples, batches of 8: the last 5 come as a partial batch with no further input,
    and a shard dropped later starts a new batch."""
    d = str(tmp_path)
    write_shard(d, "a.tar", 6)
    write_shard(d, "b.tar", 7)
    ds = wr.RefreshingWebDataset(d, mode="stream").to_tuple("__key__").batched(8, partial_after=0.2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    it = iter(loader)
    try:
        first, second = next(it)[0], next(it)[0]  # the second is partial: its wait is bounded by the timeout mark
        assert (len(first), len(second)) == (8, 5)
        assert set(first) | set(second) == {f"{s}/{j:06d}" for s, n in (("a", 6), ("b", 7)) for j in range(n)}
        write_shard(d, "c.tar", 3)
        third = next(it)[0]
        assert sorted(third) == [f"c/{j:06d}" for j in range(3)]
    finally:
        ds.close()
        del it


@pytest.mark.timeout(120)
def test_stream_checkpoint_between_partial_batches_resumes_each_sample_once(tmp_path):
    """States taken after partial batches (the stage holds samples pulled by its thread, or one
    in transit) resume with every sample exactly once."""
    import copy

    from torchdata.stateful_dataloader import StatefulDataLoader

    d = str(tmp_path)
    sizes = [5, 3, 6]
    for i, n in enumerate(sizes):
        write_shard(d, f"s{i}.tar", n)
    everything = collections.Counter(f"s{i}/{j:06d}" for i, n in enumerate(sizes) for j in range(n))
    ds = wr.RefreshingWebDataset(d, mode="stream").to_tuple("__key__").batched(4, partial_after=0.2)
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=1)
    it = iter(loader)
    before = []
    while len(before) < sum(sizes):  # 4, 4, 4, then 2 as a partial batch
        before.extend(next(it)[0])
    state = copy.deepcopy(loader.state_dict())
    write_shard(d, "s3.tar", 5)
    extra = next(it)[0]  # 4 of s3 in a full batch; the fifth stays held by the stage
    state_mid = copy.deepcopy(loader.state_dict())
    ds.close()
    del it, loader
    everything.update(f"s3/{j:06d}" for j in range(5))

    def resume(state, count):
        again = wr.RefreshingWebDataset(d, mode="stream").to_tuple("__key__").batched(4, partial_after=0.2)
        again.load_state_dict(state)
        got, it = [], iter(StatefulDataLoader(again, batch_size=None, num_workers=1))
        while len(got) < count:
            got.extend(next(it)[0])
        again.close()
        return got

    assert collections.Counter(before + resume(state, 5)) == everything
    assert collections.Counter(before + extra + resume(state_mid, 1)) == everything


def test_samples_held_by_a_waiting_batch_are_read_again_after_a_resume(tmp_path):
    """A state taken while .batched() holds samples that arrived after a partial batch (pulled by
    its thread, not yet in any batch) names them: the resumed stream yields them."""
    d = str(tmp_path)
    write_shard(d, "s0.tar", 6)
    ds = wr.RefreshingWebDataset(d, mode="stream").to_tuple("__key__").batched(4, partial_after=0.2)
    it = iter(ds)
    before = list(next(it)[0]) + list(next(it)[0])  # 4, then 2 as a partial batch
    write_shard(d, "s1.tar", 3)
    stage = ds.pipeline[-1]
    # the thread pulls s1's first sample into the waiting batch
    wait_for(stage.held, timeout=30, what="the new shard's sample to reach the batch stage")
    state = ds.state_dict()
    ds.close()
    again = wr.RefreshingWebDataset(d, mode="stream").to_tuple("__key__").batched(4, partial_after=0.2)
    again.load_state_dict(state)
    after = list(next(iter(again))[0])
    again.close()
    assert before + after == [f"s0/{j:06d}" for j in range(6)] + [f"s1/{j:06d}" for j in range(3)]


@pytest.mark.parametrize("close_first", [True, False])
def test_abandoned_stream_batches_leave_no_thread_behind(tmp_path, close_first):
    """The helper thread of a stream's .batched() ends when the batches are dropped or the
    dataset closed, with a pull in flight (waiting for a shard) or not."""
    import gc
    import threading

    def helpers() -> int:
        return sum(t.name == "wdsrefresh-batched" for t in threading.enumerate())

    write_shard(str(tmp_path), "a.tar", 6)
    before = helpers()
    ds = wr.RefreshingWebDataset(str(tmp_path), mode="stream").batched(4, partial_after=0.1)
    it = iter(ds)
    assert [len(next(it)["__key__"]), len(next(it)["__key__"])] == [4, 2]  # a pull is in flight now
    if close_first:
        ds.close()
    del it
    gc.collect()
    if not close_first:
        ds.close()
    wait_for(lambda: helpers() <= before, timeout=30, what="the .batched() helper thread to end with its stream")

"""The watched directory index: same snapshots as a rescan, O(changes), waiting, polling, lifecycle."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch.utils.data

import wdsrefresh as wr
from wdsrefresh.storage.local.directory import DirectoryIndex
from wdsrefresh.storage.waiting import NotEnoughShardsError
from wdsrefresh.storage.local.inotify import Inotify
from wdsrefresh.storage.resolver import Resolver
from wdsrefresh.storage.local.sources import DirectorySource

from conftest import wait_for
from shardutil import tar_bytes, make_samples, write_shard

pytestmark = pytest.mark.timeout(60)


def rescan(directory: str, epoch: int, **kw):
    return Resolver(DirectorySource(directory), **kw).resolve(epoch)


def threads() -> int:
    return threading.active_count()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def inotify_fds() -> int:
    """Open inotify instances in this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return count


def ours() -> tuple[int, int]:
    """Indexer threads and inotify fds of wdsrefresh in this process (the watcher's own; an S3 read-ahead
    thread of an earlier test may still be finishing a request)."""
    return sum(t.name == "wdsrefresh-indexer" for t in threading.enumerate()), inotify_fds()


def back_to(base_threads: int, base_fds: int) -> bool:
    # <=: a thread or fd another test left behind may end meanwhile; ours must all be gone
    return ours() == (0, 0) and threads() <= base_threads and fds() <= base_fds


def test_watched_snapshot_equals_rescan_through_adds_deletes_and_replacements(tmp_path):
    d = str(tmp_path)
    for i in range(5):
        write_shard(d, f"s{i}.tar", 3)
    resolver = Resolver(DirectorySource(d))  # a rescan that, like the index, knows the last epoch
    with DirectoryIndex(DirectorySource(d)) as index:
        assert index.snapshot(0).id == resolver.resolve(0).id
        write_shard(d, "s5.tar", 4)  # added
        os.unlink(os.path.join(d, "s1.tar"))  # deleted
        write_shard(d, "s2.tar", 7, prefix="v2")  # replaced by rename
        s3 = os.path.join(d, "s3.tar")
        with open(s3, "wb") as f:  # rewritten in place
            f.write(tar_bytes(make_samples("v3", 2)))
        os.rename(os.path.join(d, "s4.tar"), os.path.join(d, "s4.tar.tmp"))  # moved out (temporary name)
        half = os.path.join(d, "half.tar")
        with open(half, "wb") as f:  # still being written: its writer holds it open
            f.write(tar_bytes(make_samples("h", 3))[:700])
            f.flush()
            snap, expected = index.snapshot(1), resolver.resolve(1)
            assert snap.id == expected.id
            # s3 was rewritten in place and closed: no writer holds it, so it is read at once
            assert [s.nsamples for s in snap.shards] == [s.nsamples for s in expected.shards] == [3, 7, 2, 4]
            assert snap.pending == expected.pending == (half,)
            assert "open for writing" in snap.pending_reasons[half] == expected.pending_reasons[half]
        snap, expected = index.snapshot(2), resolver.resolve(2)  # closed, but no complete tar
        assert snap.id == expected.id and snap.pending == expected.pending == (half,)
        assert "not a complete tar yet" in snap.pending_reasons[half]


def test_shard_renamed_in_just_before_set_epoch_is_in_that_epoch(tmp_path):
    d = str(tmp_path)
    write_shard(d, "a-000.tar", 1)
    ds = wr.RefreshingWebDataset(d, watch=True)
    try:
        for epoch in range(1, 30):
            path = write_shard(d, f"a-{epoch:03d}.tar", 1)
            snap = ds.set_epoch(epoch)
            assert path in snap.urls and len(snap.shards) == epoch + 1
        assert ds.watching == "inotify"
    finally:
        ds.close()


def test_new_shards_are_indexed_in_the_background_before_the_epoch(tmp_path):
    d = str(tmp_path)
    write_shard(d, "a.tar", 2)
    with DirectoryIndex(DirectorySource(d)) as index:
        index.snapshot(0)
        for i in range(10):
            write_shard(d, f"b{i}.tar", 2)
        wait_for(lambda: index.counts() == (11, 0, 0), what="the background indexer")
        version = index.version
        snap = index.snapshot(1)
        assert index.version == version  # nothing left to index when the epoch starts
        assert len(snap.shards) == 11 and all(s.digest for s in snap.shards)


class DeafInotify(Inotify):
    """A real inotify queue that lost every event: it watches nothing."""

    def add(self, directory: str) -> None:
        pass


def test_missed_events_are_healed_by_the_periodic_rescan(tmp_path):
    d = str(tmp_path)
    write_shard(d, "a.tar", 2)
    index = DirectoryIndex(DirectorySource(d), rescan_interval=0.3, backend=DeafInotify).start()
    try:
        for i in range(3):
            write_shard(d, f"b{i}.tar", 2)
        wait_for(lambda: index.counts()[0] == 4, what="the periodic rescan")
    finally:
        index.close()


def test_polling_fallback_when_forced(tmp_path):
    d = str(tmp_path)
    write_shard(d, "a.tar", 2)
    with DirectoryIndex(DirectorySource(d), poll=0.1) as index:
        assert index.polling and index.watcher is None
        write_shard(d, "b.tar", 2)
        wait_for(lambda: index.counts()[0] == 2, what="the poller")  # indexed before any snapshot
    ds = wr.RefreshingWebDataset(d, watch=True, poll=0.1)
    try:
        assert len(ds.set_epoch(0).shards) == 2 and ds.watching == "poll"
        write_shard(d, "c.tar", 2)
        snap = ds.set_epoch(1)  # polling: the snapshot is as fresh as a rescan
        assert snap.id == rescan(d, 1).id and len(snap.shards) == 3
        assert sum(1 for _ in ds) == 6
    finally:
        ds.close()


def test_waits_for_min_shards_then_reads_and_says_what_it_waits_for(tmp_path, caplog):
    d = str(tmp_path / "shards")  # does not exist yet either

    def producer():
        time.sleep(0.3)
        os.makedirs(d)
        for i in range(3):
            write_shard(d, f"s{i}.tar", 2)
            time.sleep(0.1)

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        ds = wr.RefreshingWebDataset(DirectorySource(d), watch=True, min_shards=3, timeout=20)
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="wdsrefresh"):
            snap = ds.set_epoch(0)
        print(f"waited {time.monotonic() - started:.2f} s for 3 shards")
        assert len(snap.shards) == 3
        [said] = [r.getMessage() for r in caplog.records if "min_shards" in r.getMessage()]  # when the wait starts
        assert said.startswith("waiting for min_shards=3, for at most 20 s more") and d in said
        assert sorted(s["__key__"] for s in ds) == sorted(f"s{i}/{j:06d}" for i in range(3) for j in range(2))
        ds.close()
    finally:
        thread.join()


def test_timeout_error_says_ready_pending_and_rejected(tmp_path):
    d = str(tmp_path)
    write_shard(d, "good.tar", 2)
    with open(os.path.join(d, "half.tar"), "wb") as f:
        f.write(tar_bytes(make_samples("h", 3))[:700])
    with open(os.path.join(d, "bad.tar"), "wb") as f:
        f.write(b"this is not a tar archive" * 40)
    os.utime(os.path.join(d, "bad.tar"), (1_600_000_000, 1_600_000_000))  # junk dropped long ago
    for watch in (True, False):
        ds = wr.RefreshingWebDataset(d, watch=watch, min_shards=5, timeout=0.5)
        with pytest.raises(NotEnoughShardsError) as err:
            ds.set_epoch(0)
        message = str(err.value)
        assert "1 ready" in message and "need 5" in message
        assert "1 pending" in message and "half.tar" in message
        assert "1 rejected" in message and "bad.tar" in message
        ds.close()


@pytest.mark.parametrize("watch", [True, False])
def test_empty_directory_is_an_empty_epoch_with_a_warning_naming_it(tmp_path, caplog, watch):
    with wr.RefreshingWebDataset(str(tmp_path), watch=watch) as ds:
        with caplog.at_level("WARNING", logger="wdsrefresh"):
            assert len(ds.set_epoch(0).shards) == 0
        assert list(ds) == []
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(tmp_path) in warning and "epoch 0 is empty" in warning and "min_shards=N" in warning
    with wr.RefreshingWebDataset(str(tmp_path), watch=watch, empty_check=True) as ds:
        with pytest.raises(wr.NoShardsError, match="no sample to read") as raised:
            ds.set_epoch(0)
        assert str(tmp_path) in str(raised.value)


def test_a_directory_that_does_not_exist_raises_at_once(tmp_path):
    with pytest.raises(wr.NoShardsError) as raised:
        wr.RefreshingWebDataset(str(tmp_path / "nope"), watch=True).set_epoch(0)
    assert str(tmp_path / "nope") in str(raised.value)


def _record_inotify_fds(path: str) -> None:
    count = inotify_fds()  # before opening the probe file, whose own name says "inotify"
    with open(path, "a") as f:
        f.write(f"{count}\n")


def test_no_thread_or_fd_left_after_50_epochs_and_close(tmp_path):
    d = str(tmp_path / "shards")
    os.makedirs(d)
    for i in range(4):
        write_shard(d, f"s{i:03d}.tar", 3)
    probe = str(tmp_path / "worker-inotify-fds.txt")

    def epoch_loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                           worker_init_fn=lambda _: _record_inotify_fds(probe))

    warm = wr.RefreshingWebDataset(d, watch=False)  # let torch and multiprocessing start what they keep
    assert sum(1 for _ in epoch_loader(warm)) == 12
    del warm
    gc.collect()
    base_threads, base_fds = threads(), fds()

    ds = wr.RefreshingWebDataset(d, watch=True)
    seen = []
    for epoch in range(50):
        if epoch % 10 == 9:
            write_shard(d, f"n{epoch:03d}.tar", 3)
        snap = ds.set_epoch(epoch)
        assert sum(1 for _ in epoch_loader(ds)) == snap.nsamples
        seen.append((threads(), fds()))
    # a finished loader's queue threads may still be exiting: counts must come back, not grow
    wait_for(lambda: threads() <= seen[5][0] and fds() <= seen[5][1],
             what=f"threads and fds back to epoch 5's {seen[5]} (now {threads(), fds()})")
    assert ours() == (1, 1)  # one indexer thread, one inotify fd, after 50 epochs
    with open(probe) as f:
        assert {int(line) for line in f} == {0}, "a DataLoader worker inherited the inotify fd"
    ds.close()
    # what a live dataset keeps after close(): its state directory's owner lock (statedir.py)
    wait_for(lambda: back_to(base_threads, base_fds + 1), what="threads and fds back after close")

    ds = wr.RefreshingWebDataset(d, watch=True)  # collected without close()
    ds.set_epoch(0)
    assert ours() == (1, 1)
    del ds
    gc.collect()
    wait_for(lambda: back_to(base_threads, base_fds), what="threads and fds back after gc")


def test_watchdog_backend_sees_every_shard_renamed_in_before_set_epoch(tmp_path):
    """The backend used where inotify is missing (macOS, Windows), forced here on Linux."""
    d = str(tmp_path)
    write_shard(d, "a-000.tar", 1)
    ds = wr.RefreshingWebDataset(d, watch="watchdog")
    try:
        for epoch in range(1, 15):
            path = write_shard(d, f"a-{epoch:03d}.tar", 1)
            if epoch % 5 == 0:
                os.unlink(os.path.join(d, f"a-{epoch - 1:03d}.tar"))
            snap = ds.set_epoch(epoch)
            assert path in snap.urls and snap.id == rescan(d, epoch).id
        assert ds.watching == "watchdog"
        assert sum(1 for _ in ds) == len(snap.shards)
    finally:
        ds.close()


def test_watchdog_backend_indexes_new_shards_in_the_background(tmp_path):
    d = str(tmp_path)
    write_shard(d, "a.tar", 2)
    with DirectoryIndex(DirectorySource(d), backend="watchdog") as index:
        for i in range(5):
            write_shard(d, f"b{i}.tar", 2)
        wait_for(lambda: index.counts() == (6, 0, 0), what="the background indexer, woken by watchdog events")

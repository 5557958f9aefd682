"""When a fresh shard is read: as soon as its writer is done, by the signal that says so.

Writers are real: webdataset's ShardWriter in a subprocess (it writes each shard in place at its
final name and closes it when full), files held open by a writer, and a resolving process
without CAP_LEASE reading files it does not own (where no lease can tell, settle applies).
"""

import json
import os
import select
import subprocess
import sys
import time

import pytest
import torch

import wdsrefresh as wr
from shardutil import held_open, make_samples, tar_bytes, write_shard
from wdsrefresh.storage.local.lease import open_for_writing

HERE = os.path.dirname(os.path.abspath(__file__))
NOBODY = 65534

SHARD_WRITER = """
import sys, webdataset as wds
with wds.ShardWriter(sys.argv[1] + "/shard-%06d.tar", maxcount=100) as sink:
    for i in range(int(sys.argv[2])):
        sink.write({"__key__": f"k{i:06d}", "txt": f"sample {i}", "cls": str(i % 10)})
"""


def shard_writer(directory: str, samples: int) -> None:
    """Runs webdataset's ShardWriter in its own process to the end, as `python make_shards.py` does."""
    subprocess.run([sys.executable, "-c", SHARD_WRITER, directory, str(samples)], check=True, timeout=120)


def keys(ds, num_workers: int = 0, persistent: bool = False) -> list[str]:
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                         persistent_workers=persistent and num_workers > 0)
    return [s["__key__"] for s in loader]


@pytest.mark.parametrize("watch", [True, False])
def test_shards_of_webdataset_shardwriter_are_read_by_the_first_set_epoch(shard_dir, watch):
    shard_writer(shard_dir, 300)
    with wr.RefreshingWebDataset(shard_dir, watch=watch) as ds:
        snap = ds.set_epoch(0)
        assert (len(snap.shards), snap.pending) == (3, ())
        assert sorted(keys(ds, 2)) == [f"k{i:06d}" for i in range(300)]


@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, False), (2, True)])
def test_producer_starting_after_the_job_is_read_at_the_next_epoch(shard_dir, num_workers, persistent):
    with wr.RefreshingWebDataset(shard_dir) as ds:
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                             persistent_workers=persistent)
        assert len(ds.set_epoch(0).shards) == 0
        assert [s for s in loader] == []  # an empty epoch, in every worker (no len(loader): torch keeps it)
        shard_writer(shard_dir, 250)
        ds.set_epoch(1)
        assert sorted(s["__key__"] for s in loader) == [f"k{i:06d}" for i in range(250)]


def test_epoch_of_only_pending_files_is_empty_with_two_workers(shard_dir):
    with held_open(shard_dir, "a.tar", 5), held_open(shard_dir, "b.tar", 3):
        with wr.RefreshingWebDataset(shard_dir) as ds:
            snap = ds.set_epoch(0)
            assert (len(snap.shards), len(snap.pending)) == (0, 2)
            assert keys(ds, 2) == []


@pytest.mark.parametrize("watch", [True, False])
def test_file_held_open_by_its_writer_is_never_read_then_read_once_closed(shard_dir, watch, caplog):
    write_shard(shard_dir, "old.tar", 2)
    with wr.RefreshingWebDataset(shard_dir, watch=watch) as ds:
        with held_open(shard_dir, "new.tar", 4) as (path, _f):
            st = os.stat(path)  # its last write long ago: the settle time alone would take it
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 60_000_000_000))
            with caplog.at_level("WARNING", logger="wdsrefresh"):
                snap = ds.set_epoch(0)
                ds.set_epoch(1)  # the same file version: no second warning
            assert [os.path.basename(s.url) for s in snap.shards] == ["old.tar"]
            assert "still open for writing by another process" in snap.pending_reasons[path]
            assert len(keys(ds, 2)) == 2
        warned = [r.getMessage() for r in caplog.records if "new.tar" in r.getMessage()]
        assert len(warned) == 1 and "open for writing" in warned[0] and "read once its writer closes it" in warned[0]
        ds.set_epoch(2)  # closed: read at once
        assert sorted(keys(ds, 2)) == [f"new/{i:06d}" for i in range(4)] + [f"old/{i:06d}" for i in range(2)]


def test_a_shard_growing_under_its_writer_is_warned_about_once(shard_dir, caplog):
    data = tar_bytes(make_samples("g", 30, size=2000))
    with wr.RefreshingWebDataset(shard_dir) as ds, held_open(shard_dir, "g.tar", 0, data[:10_000]) as (path, f):
        with caplog.at_level("WARNING", logger="wdsrefresh"):
            for epoch, end in enumerate(range(20_000, len(data), 20_000)):
                f.write(data[f.tell():end])  # a new version of the file at every epoch
                f.flush()
                assert ds.set_epoch(epoch).pending == (path,)
        assert epoch >= 3
        assert len([r for r in caplog.records if "g.tar" in r.getMessage()]) == 1


def test_lease_checks_never_kill_or_block_a_writer(shard_dir):
    """A writer opens the file for writing 100 times while this process asks for the lease in a
    loop: the lease's break signal kills no one, and every open succeeds at once."""
    path = write_shard(shard_dir, "a.tar", 3)
    writer = subprocess.Popen([sys.executable, "-c", """
import sys, time
longest = 0.0
for _ in range(100):
    started = time.monotonic()
    with open(sys.argv[1], "r+b"):
        longest = max(longest, time.monotonic() - started)
    time.sleep(0.002)
print(longest)
""", path], stdout=subprocess.PIPE, text=True)
    asked = 0
    try:
        deadline = time.monotonic() + 60
        while writer.poll() is None and time.monotonic() < deadline:
            assert open_for_writing(path, 10.0) in (True, False)
            asked += 1
        out, _ = writer.communicate(timeout=30)
    finally:
        writer.kill()
    assert writer.returncode == 0 and asked > 100
    assert float(out) < 1.0, f"a writer's open waited {float(out):.3f} s"  # the kernel's lease break time is 45 s


def _nobodys_shard(directory: str, name: str, n: int) -> str:
    """A shard written in place and closed, owned by another user (so no lease can be taken on
    it without CAP_LEASE); the owner is set before the write, so ctime does not pass mtime."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchown(fd, NOBODY, NOBODY)
        os.write(fd, tar_bytes(make_samples(name.split(".")[0], n)))
    finally:
        os.close(fd)
    return path


class ResolvingWithoutLease:
    """resolve_child.py in a process without CAP_LEASE: it cannot lease files it does not own."""

    def __init__(self, directory: str, watch: bool, procs):
        self.proc = subprocess.Popen(
            ["setpriv", "--bounding-set=-lease", "--inh-caps=-lease", sys.executable,
             os.path.join(HERE, "resolve_child.py"), directory, "--watch" if watch else "--no-watch"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(self.proc)

    def epoch(self, n: int) -> dict:
        self.proc.stdin.write(f"epoch {n}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, "the resolving process printed nothing for 60 s"
        return json.loads(self.proc.stdout.readline())


@pytest.fixture
def foreign_dir(tmp_path):
    os.chmod(tmp_path, 0o755)
    return str(tmp_path)


def test_close_seen_by_the_watcher_makes_a_shard_ready_where_no_lease_can_be_taken(foreign_dir, procs):
    child = ResolvingWithoutLease(foreign_dir, watch=True, procs=procs)
    assert child.epoch(0)["shards"] == []
    _nobodys_shard(foreign_dir, "a.tar", 3)
    first = child.epoch(1)
    assert (first["shards"], first["pending"]) == (["a.tar"], {})


def test_without_lease_or_watcher_written_in_place_waits_for_settle_and_says_so(foreign_dir, procs):
    child = ResolvingWithoutLease(foreign_dir, watch=False, procs=procs)
    child.epoch(0)
    _nobodys_shard(foreign_dir, "a.tar", 3)
    write_shard(foreign_dir, "b.tar", 2)  # published by rename: ready at once everywhere
    first, second = child.epoch(1), child.epoch(2)
    assert first["shards"] == second["shards"] == ["b.tar"]
    assert "no signal that its writer is done; ready after 10 s without a write, or publish by rename" \
        in first["pending"]["a.tar"]
    fallback = [w for w in first["warnings"] + second["warnings"] if "falls back" in w]
    assert len(fallback) == 1 and foreign_dir in fallback[0] and "publish by rename" in fallback[0]
    assert [w for w in second["warnings"] if "a.tar" in w] == []  # once per file version

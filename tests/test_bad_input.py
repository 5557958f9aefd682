"""Nothing corrupt yielded, nothing half-written listed, nothing lost silently: files at rest that
are not what they claim (rotted, preallocated, truncated, miscounted), and the same data elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import wdsrefresh as wr
from conftest import wait_for
from shardutil import make_samples, tar_bytes, write_shard


def long_ago(path: str, seconds: float = 60.0) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def collecting_handler():
    errors: list[BaseException] = []
    return errors, lambda exn: errors.append(exn) or True


def test_bit_rot_goes_through_the_handler_as_digest_mismatch_and_is_never_yielded(tmp_path):
    from wdsrefresh.write.pack import pack_entries

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        (raw / f"k{i}.bin").write_bytes(bytes([65 + i]) * 1000)
    pack_entries([str(raw)], str(tmp_path / "out"), maxcount=100)
    shard = str(tmp_path / "out" / "shard-000000.tar")
    st = os.stat(shard)
    with open(shard, "r+b") as f:  # one payload byte of sample k2 rots; size and mtime stay
        f.seek(2 * 1536 + 512 + 10)  # member k2.bin: header 512 bytes, payload 1000 (1024 padded)
        f.write(b"Z")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    errors, handler = collecting_handler()
    ds = wr.RefreshingWebDataset(str(tmp_path / "out"), handler=handler)  # on_change="reload" by default
    ds.set_epoch(0)
    got = list(ds)
    assert not any(b"Z" in s["bin"] for s in got)
    assert len(errors) == 1 and isinstance(errors[0], wr.DigestMismatch) and "shard-000000.tar" in str(errors[0])
    assert "block 0" in str(errors[0])
    stats = ds.stats(0)
    assert stats.corrupt == 1 and stats.replaced == 0 and stats.yielded + stats.skipped == 6
    ds.close()


PREALLOCATING_WRITER = r"""
import os, sys
path, data_path, go = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(data_path, "rb").read()
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
os.posix_fallocate(fd, 0, len(data))  # aria2c style: the final name, full size, zeros
os.ftruncate(fd, len(data))
half = len(data) // 2
os.pwrite(fd, data[:half], 0)
print("half", flush=True)
while not os.path.exists(go):  # stalls, for less than settle
    pass
os.pwrite(fd, data[half:], half)
os.close(fd)
print("done", flush=True)
"""


def test_preallocated_shard_filled_in_place_is_never_listed_half_written(tmp_path, procs):
    d = tmp_path / "shards"
    d.mkdir()
    write_shard(str(d), "ready.tar", 2)
    data = tar_bytes(make_samples("pre", 40, size=4000))
    (tmp_path / "data").write_bytes(data)
    path, go = str(d / "pre.tar"), str(tmp_path / "go")
    writer = subprocess.Popen([sys.executable, "-c", PREALLOCATING_WRITER, path, str(tmp_path / "data"), go],
                              stdout=subprocess.PIPE, text=True)
    procs.append(writer)
    assert writer.stdout.readline().strip() == "half"
    ds = wr.RefreshingWebDataset(str(d), settle=3.0, shardshuffle=False)
    snap = ds.set_epoch(0)
    assert [os.path.basename(s.url) for s in snap.shards] == ["ready.tar"] and snap.pending == (path,)
    assert [s["__key__"] for s in ds] == ["ready/000000", "ready/000001"]
    open(go, "w").close()
    assert writer.stdout.readline().strip() == "done" and writer.wait(timeout=10) == 0
    epoch = iter(range(1, 10**6))
    wait_for(lambda: path in ds.set_epoch(next(epoch)).urls, timeout=30, what="the filled shard to settle")
    assert sorted(s["__key__"] for s in ds) == [f"pre/{i:06d}" for i in range(40)] + ["ready/000000", "ready/000001"]
    ds.close()


def test_truncated_shard_at_rest_is_rejected_once_then_read_when_a_resumed_copy_completes_it(tmp_path, caplog):
    d = str(tmp_path)
    write_shard(d, "ok.tar", 2)
    data = tar_bytes(make_samples("cut", 10, size=2000))
    path = os.path.join(d, "cut.tar")
    with open(path, "wb") as f:
        f.write(data[:9000])  # a download that failed long ago
    long_ago(path)
    for watch in (True, False):
        caplog.clear()
        ds = wr.RefreshingWebDataset(d, watch=watch)
        for epoch in range(3):
            snap = ds.set_epoch(epoch)
            [(url, reason)] = snap.rejected
            assert url == path and "at byte" in reason and "end-of-archive" in reason
            assert snap.pending == () and len(list(ds)) == 2
        warnings = [r for r in caplog.records if r.levelname == "WARNING" and "cut.tar" in r.getMessage()]
        assert len(warnings) == 1
        ds.close()
    with open(path, "ab") as f:  # the copy resumes and completes: a new version of the file
        f.write(data[9000:])
    long_ago(path)
    ds = wr.RefreshingWebDataset(d, watch=False)
    assert ds.set_epoch(0).rejected == () and len(list(ds)) == 12


@pytest.mark.parametrize("claimed,found", [(1, "more"), (5, "3")])
def test_a_count_the_shard_disagrees_with_is_an_error_for_that_shard(tmp_path, claimed, found):
    d = str(tmp_path)
    path = write_shard(d, "a.tar", 3)
    write_shard(d, "b.tar", 2)
    manifest = os.path.join(d, "list.json")
    with open(manifest, "w") as f:  # a manifest given as the source, with a wrong count
        f.write('{"shardlist": [{"url": "a.tar", "nsamples": %d}, {"url": "b.tar", "nsamples": 2}]}' % claimed)
    errors, handler = collecting_handler()
    ds = wr.RefreshingWebDataset(manifest, verify="off", shardshuffle=False, handler=handler)
    ds.set_epoch(0)
    keys = [s["__key__"] for s in ds]
    assert keys[-2:] == ["b/000000", "b/000001"]
    assert len(errors) == 1 and isinstance(errors[0], wr.CountMismatch)
    assert os.path.basename(path) in str(errors[0]) and f"holds {found} samples" in str(errors[0])
    assert ds.stats(0).corrupt == 1


def test_same_data_copied_elsewhere_has_the_same_snapshot_id_and_shuffle(tmp_path):
    a = tmp_path / "here"
    a.mkdir()
    for i in range(12):
        write_shard(str(a), f"s{i:02d}.tar", 3 + i % 4)
    b = tmp_path / "elsewhere"
    shutil.copytree(a, b)  # new inodes; copy2 keeps mtimes, but nothing may depend on them either
    for p in b.iterdir():
        os.utime(p, (time.time() - 100, time.time() - 100))

    def first_epochs(directory):
        ds = wr.RefreshingWebDataset(str(directory), seed=7, watch=False)
        out = []
        for epoch in range(3):
            snap = ds.set_epoch(epoch)
            out.append((snap.id, [s["__key__"] for s in ds]))
        return out

    assert first_epochs(a) == first_epochs(b)


def _stream_under_ddp(rank, port, directory, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        wr.RefreshingWebDataset(directory, mode="stream")
        outcome = "no error"
    except ValueError as exn:
        outcome = str(exn)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_stream_mode_under_ddp_refuses_at_start_naming_join(tmp_path, procs):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import ddp_check

    ctx = torch.multiprocessing.get_context("spawn")
    port = ddp_check.free_port()
    ranks = [ctx.Process(target=_stream_under_ddp, args=(r, port, str(tmp_path), str(tmp_path))) for r in range(2)]
    for p in ranks:
        p.start()
        procs.append(p)
    for p in ranks:
        p.join(timeout=90)
    assert [p.exitcode for p in ranks] == [0, 0]
    for r in range(2):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert "Join" in text and "equalize=False" in text and 'mode="epoch"' in text


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs (the tests run as root, as CI does), unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_state_directory_error_names_the_file(tmp_path, tiny_filesystem):
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        write_shard(str(d), f"s{i}.tar", 2)
    ds = wr.RefreshingWebDataset(str(d), state_dir=str(tiny_filesystem), watch=False)
    fd = os.open(tiny_filesystem / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    with pytest.raises(OSError, match="No space left") as err:
        ds.set_epoch(0)
    assert ds.state_directory in str(err.value)


def test_a_member_above_max_sample_bytes_is_refused_naming_shard_and_offset(tmp_path):
    d = str(tmp_path)
    write_shard(d, "big.tar", 2, size=300_000)
    write_shard(d, "small.tar", 3, size=100)
    ds = wr.RefreshingWebDataset(d, max_sample_bytes=200_000, shardshuffle=False, watch=False)
    [(url, reason)] = ds.set_epoch(0).rejected  # refused while indexed, before a byte of it is held
    assert url.endswith("big.tar") and "max_sample_bytes=200000" in reason and "at byte" in reason
    assert [s["__key__"] for s in ds] == ["small/000000", "small/000001", "small/000002"]
    assert len(list(wr.RefreshingWebDataset(d, watch=False))) == 5  # the default (1 GiB) reads it

"""No torn samples, content-checked: replaced, deleted, truncated, half-written and corrupt shards."""

import io
import json
import os
import tarfile

import pytest
import torch

import wdsrefresh as wr
from shardutil import held_open, make_samples, tar_bytes, write_shard

BIG = 100_000  # 100 KB payloads: a shard of 100 samples spans 3 blocks of 4 MiB


def versioned_shard(version: bytes, n=100, size=BIG):
    """A shard whose every payload byte says which version it is (to spot torn samples)."""
    samples = [{"__key__": f"s/{i:06d}", "bin": version * size, "cls": version} for i in range(n)]
    return tar_bytes(samples)


def loader(ds, num_workers=1, persistent=False):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=persistent,
                                       prefetch_factor=1 if num_workers else None)


def assert_whole_versions(samples):
    for s in samples:
        versions = set(s["bin"]) | set(s["cls"])
        assert len(versions) == 1, f"{s['__key__']} mixes versions {versions}"


def read_while_rewritten_in_place(shard_dir, new_content: bytes, writer_done: bool, **options):
    """Reads an epoch of a 3-block shard, rewriting it in place (same inode) after the first sample.

    ``writer_done``: the rewriting writer closes the file at once; else it holds it open (still
    writing) until the epoch was read.
    """
    path = os.path.join(shard_dir, "v.tar")
    with open(path, "wb") as f:
        f.write(versioned_shard(b"A"))
    ds = wr.RefreshingWebDataset(shard_dir, **options)
    ds.set_epoch(0)
    it = iter(loader(ds, num_workers=1))
    got = [next(it)]
    with open(path, "r+b") as f:  # what `cp` or open("wb") does: same inode, new bytes
        f.write(new_content)
        f.flush()
        if not writer_done:
            got.extend(it)
    got.extend(it)  # what is left once the writer closed the file
    assert_whole_versions(got)
    return got, ds.stats(0)


@pytest.mark.parametrize("verify", ["inline", "strict"])
def test_in_place_rewrite_during_epoch_is_detected_and_never_torn(shard_dir, verify):
    got, stats = read_while_rewritten_in_place(shard_dir, versioned_shard(b"B"), writer_done=True,
                                               verify=verify, on_change="reload")
    assert [s["__key__"] for s in got] == [f"s/{i:06d}" for i in range(100)]
    assert {bytes(s["cls"]) for s in got} == {b"A", b"B"}
    assert stats.replaced == 1 and stats.yielded == 100


def test_shard_still_being_rewritten_in_place_is_skipped_not_reloaded(shard_dir):
    half_written = versioned_shard(b"B")[: 5 << 20]
    got, stats = read_while_rewritten_in_place(shard_dir, half_written, writer_done=False, on_change="reload")
    assert {bytes(s["cls"]) for s in got} == {b"A"}
    assert stats.replaced == 1 and stats.yielded + stats.skipped == 100 and stats.skipped > 0


def test_in_place_rewrite_with_skip_policy_counts_skipped(shard_dir):
    got, stats = read_while_rewritten_in_place(shard_dir, versioned_shard(b"B"), writer_done=True,
                                               on_change="skip")
    assert {bytes(s["cls"]) for s in got} == {b"A"}
    assert stats.replaced == 1 and stats.yielded + stats.skipped == 100 and stats.skipped > 0


@pytest.mark.parametrize("on_change,expect_new", [("reload", True), ("skip", False)])
def test_shard_replaced_by_rename_after_snapshot(shard_dir, on_change, expect_new):
    write_shard(shard_dir, "a.tar", 5)
    ds = wr.RefreshingWebDataset(shard_dir, on_change=on_change)
    ds.set_epoch(0)
    write_shard(shard_dir, "a.tar", 5, prefix="new")
    keys = sorted(s["__key__"] for s in loader(ds, num_workers=2))
    assert keys == ([f"new/{i:06d}" for i in range(5)] if expect_new else [])
    stats = ds.stats(0)
    assert stats.replaced == 1 and stats.skipped == (0 if expect_new else 5)


@pytest.mark.parametrize("new_count", [3, 8])
def test_reload_of_a_shard_whose_sample_count_changed_counts_every_sample(shard_dir, new_count):
    write_shard(shard_dir, "a.tar", 5)
    write_shard(shard_dir, "b.tar", 4)
    ds = wr.RefreshingWebDataset(shard_dir, on_change="reload", shardshuffle=False)
    ds.set_epoch(0)
    write_shard(shard_dir, "a.tar", new_count, prefix="new")
    keys = sorted(s["__key__"] for s in loader(ds, num_workers=2))
    # the snapshot's share of a.tar is 5 samples: read from the new content, the rest counted
    assert keys == sorted([f"new/{i:06d}" for i in range(min(5, new_count))] + [f"b/{i:06d}" for i in range(4)])
    stats = ds.stats(0)
    assert stats.yielded + stats.skipped == 9 and stats.skipped == max(0, 5 - new_count)


def test_replaced_shard_raises_under_raise_policy(shard_dir):
    write_shard(shard_dir, "a.tar", 5)
    ds = wr.RefreshingWebDataset(shard_dir, on_change="raise")
    ds.set_epoch(0)
    write_shard(shard_dir, "a.tar", 6)
    with pytest.raises(Exception, match="a.tar"):
        list(loader(ds, num_workers=2))


def test_shard_deleted_after_snapshot_is_skipped_and_counted(shard_dir):
    write_shard(shard_dir, "a.tar", 5)
    write_shard(shard_dir, "b.tar", 6)
    ds = wr.RefreshingWebDataset(shard_dir)
    ds.set_epoch(0)
    os.unlink(os.path.join(shard_dir, "a.tar"))
    keys = [s["__key__"] for s in loader(ds, num_workers=2, persistent=True)]
    assert sorted(keys) == [f"b/{i:06d}" for i in range(6)]
    stats = ds.stats(0)
    assert (stats.deleted, stats.skipped, stats.padded) == (1, 5, 0)


def test_deleted_shard_raises_under_raise_policy(shard_dir):
    write_shard(shard_dir, "a.tar", 5)
    ds = wr.RefreshingWebDataset(shard_dir, on_change="raise")
    ds.set_epoch(0)
    os.unlink(os.path.join(shard_dir, "a.tar"))
    with pytest.raises(wr.ShardVanishedError, match="a.tar"):
        list(ds)


def test_symlinked_directory_swap_switches_at_next_epoch(tmp_path):
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        write_shard(str(tmp_path / version), "x.tar", 3, prefix=version)
    data = tmp_path / "data"
    data.symlink_to(tmp_path / "v1")
    ds = wr.RefreshingWebDataset(str(data))
    ds.set_epoch(0)
    swap = tmp_path / "data.new"
    swap.symlink_to(tmp_path / "v2")
    os.replace(swap, data)  # the epoch in flight keeps reading v1: the snapshot holds resolved paths
    assert {s["__key__"].split("/")[0] for s in loader(ds, num_workers=2)} == {"v1"}
    ds.set_epoch(1)
    assert {s["__key__"].split("/")[0] for s in loader(ds, num_workers=2)} == {"v2"}


def test_half_written_shard_is_not_read_until_its_writer_closes_it(shard_dir):
    write_shard(shard_dir, "done.tar", 3)
    data = tar_bytes(make_samples("late", 20, size=1000))
    with held_open(shard_dir, "late.tar", 0, data[: len(data) // 2]) as (path, f):  # a `cp` caught half way
        ds = wr.RefreshingWebDataset(shard_dir)
        snap = ds.set_epoch(0)
        assert [os.path.basename(s.url) for s in snap.shards] == ["done.tar"]
        assert [os.path.basename(p) for p in snap.pending] == ["late.tar"]
        assert len(list(loader(ds, num_workers=2))) == 3
        f.write(data[len(data) // 2 :])
        f.flush()  # complete now, but its writer still holds it open
        assert [os.path.basename(p) for p in ds.set_epoch(1).pending] == ["late.tar"]
    ds.set_epoch(2)  # closed: read at once
    assert len(list(loader(ds, num_workers=2))) == 23


def _truncated_then_good(shard_dir):
    """A manifest vouching for a shard cut inside sample 3 (of 6), then a good 4-sample shard."""
    samples = make_samples("t", 6, size=3000)
    data = tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member_offsets = [m.offset for m in tar.getmembers()]  # where each member's header starts
    cut = member_offsets[6] + 512 + 100  # inside sample 3's 3000-byte .bin
    with open(os.path.join(shard_dir, "t.tar"), "wb") as f:
        f.write(data[:cut])
    write_shard(shard_dir, "u.tar", 4)
    manifest = os.path.join(shard_dir, "index.json")
    with open(manifest, "w") as f:  # a manifest vouches for the truncated shard, so it is read
        json.dump({"shardlist": [{"url": "t.tar", "nsamples": 6}, {"url": "u.tar", "nsamples": 4}]}, f)
    return manifest, member_offsets[6]


def test_truncated_shard_error_names_offset_and_partial_sample_never_merges(shard_dir):
    manifest, cut_member = _truncated_then_good(shard_dir)
    errors = []
    ds = wr.RefreshingWebDataset(manifest, shardshuffle=False, verify="off",
                                 handler=lambda exn: errors.append(exn) or True)
    got = list(ds)
    assert [s["__key__"] for s in got] == [f"t/{i:06d}" for i in range(3)] + [f"u/{i:06d}" for i in range(4)]
    for s in got:
        assert s["bin"].startswith(s["__key__"].split("/")[0].encode()), "sample assembled across shards"
    assert len(errors) == 1 and "t.tar" in str(errors[0]) and f"at byte {cut_member}" in str(errors[0])
    assert ds.stats().corrupt == 1 and ds.stats().skipped == 3


@pytest.mark.timeout(240)
@pytest.mark.parametrize("verify", ["inline", "strict"])
def test_torture_writer_never_yields_duplicates_or_torn_samples(tmp_path, verify):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import torture

    totals = torture.run(str(tmp_path), epochs=6, seed=1, verify=verify)
    assert totals["yielded"] > 0
    assert totals["duplicates"] == 0 and totals["torn"] == 0, totals


def _manifest_with_digest(shard_dir, name, digest):
    manifest = os.path.join(shard_dir, "index.json")
    with open(manifest, "w") as f:
        json.dump({"shardlist": [{"url": name, "nsamples": 5, "digest": digest}]}, f)
    return manifest


def _hexdigest(algo: str, data: bytes) -> str:
    import hashlib

    import xxhash

    return xxhash.xxh3_128(data).hexdigest() if algo == "xxh3_128" else hashlib.new(algo, data).hexdigest()


@pytest.mark.parametrize("algo", ["sha256", "md5", "xxh3_128"])
@pytest.mark.parametrize("verify", ["inline", "strict"])
def test_manifest_whole_file_digests_are_checked(shard_dir, algo, verify):
    path = write_shard(shard_dir, "a.tar", 5)
    digest = f"{algo}:{_hexdigest(algo, open(path, 'rb').read())}"
    manifest = _manifest_with_digest(shard_dir, "a.tar", digest)
    assert len(list(loader(wr.RefreshingWebDataset(manifest, verify=verify), num_workers=2))) == 5

    wrong = f"{algo}:{_hexdigest(algo, b'other bytes')}"
    manifest = _manifest_with_digest(shard_dir, "a.tar", wrong)
    with pytest.raises(wr.ShardChangedError, match=f"a.tar.*{algo}"):
        wr.RefreshingWebDataset(manifest, verify=verify, on_invalid="raise").set_epoch(0)
    [(url, reason)] = wr.RefreshingWebDataset(manifest, verify=verify).set_epoch(0).rejected
    assert url == "a.tar" and algo in reason


def test_empty_file_just_created_by_a_producer_is_pending_not_an_error(shard_dir):
    write_shard(shard_dir, "a.tar", 2)
    open(os.path.join(shard_dir, "b.tar"), "wb").close()
    snap = wr.RefreshingWebDataset(shard_dir).set_epoch(0)
    assert [os.path.basename(s.url) for s in snap.shards] == ["a.tar"]
    assert [os.path.basename(p) for p in snap.pending] == ["b.tar"]


def test_stopping_handler_counts_what_it_did_not_read(shard_dir):
    manifest, _ = _truncated_then_good(shard_dir)
    ds = wr.RefreshingWebDataset(manifest, shardshuffle=False, verify="off", handler=lambda exn: False)
    assert [s["__key__"] for s in ds] == [f"t/{i:06d}" for i in range(3)]
    stats = ds.stats()
    assert (stats.yielded, stats.skipped, stats.corrupt) == (3, 7, 1)

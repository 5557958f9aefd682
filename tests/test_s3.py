"""s3:// sources against a real S3 server on 127.0.0.1 (moto): the refresh contract on objects.

Each epoch lists the prefix; objects are read pinned to the snapshot's version; replaced,
deleted, corrupt or unreachable objects go through the same policies as local shards.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import re
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import webdataset as wds

import wdsrefresh as wr
from s3fixtures import fault_proxy, moto_server, s3, shard_bytes  # noqa: F401 - fixtures
from wdsrefresh.format.digest import BLOCK_SIZE, FileDigester
from wdsrefresh.storage.objects.blocks import ObjectCorruptError, open_object
from wdsrefresh.storage.objects.s3 import ObjectReadError

MiB = 1 << 20


def keys_of(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def expected_keys(**shards: int) -> list[str]:
    return sorted(f"{name}/{i:06d}" for name, n in shards.items() for i in range(n))


def via(bucket, proxy=None, **options) -> dict:
    """storage_options for a test: through the fault proxy when given, fast retries."""
    opts = {"backoff": 0.01, "max_backoff": 0.05, **options}
    if proxy is not None:
        opts["endpoint_url"] = proxy.url
    return opts


def digests_of(data: bytes) -> FileDigester:
    d = FileDigester()
    for i in range(0, max(len(data), 1), BLOCK_SIZE):
        d.update_block(data[i : i + BLOCK_SIZE])
    return d


def manifest_entry(url: str, data: bytes, etag: str | None, nsamples: int, blocks: bytes | None = None) -> dict:
    d = digests_of(data)
    entry = {"url": url, "nsamples": nsamples, "filesize": len(data), "digest": d.digest,
             "blocks": (blocks if blocks is not None else d.blocks).hex()}
    if etag is not None:
        entry["etag"] = etag
    return entry


def put_manifest(bucket, key: str, entries: list[dict]) -> None:
    doc = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "wdsrefresh_version": 1, "shardlist": entries}
    bucket.put(key, json.dumps(doc).encode())


def tagged(sample: dict) -> str:
    """The version a sample's payload came from; asserts the sample is not torn between two."""
    version = sample["ver"].decode()
    assert sample["bin"].startswith(f"[{version}]".encode()), f"{sample['__key__']}: payload of another version"
    return version


# --------------------------------------------------------------------------- listing, growth


def test_object_uploaded_between_epochs_is_read_next_epoch_and_tmp_keys_never(s3):
    a = s3.put_shard("data/a.tar", 3)
    s3.put_shard("data/b.tar", 4)
    for key in ("data/_tmp.c.tar", "data/c.tar.part", "data/.c.tar", "data/c.tar.tmp", "data/sub/d.tar",
                "data/notes.txt"):
        s3.put(key, shard_bytes("x", 2))
    ds = wr.RefreshingWebDataset(s3.url("data/"), shardshuffle=False)
    snap = ds.set_epoch(0)
    assert [s.url for s in snap.shards] == [s3.url("data/a.tar"), s3.url("data/b.tar")]
    first = snap.shards[0]
    assert (first.etag, first.version_id, first.nsamples, first.name) == (a["ETag"], None, 3, "a.tar")
    assert first.size == len(shard_bytes("a", 3)) and first.mtime_ns > 0 and first.digest.startswith("xxh3_128:")
    assert sorted(keys_of(ds)) == expected_keys(a=3, b=4)

    s3.put_shard("data/c.tar", 5)
    s3.put("data/_tmp.e.tar", shard_bytes("e", 2))
    snap = ds.set_epoch(1)
    assert [s.url.rsplit("/", 1)[1] for s in snap.shards] == ["a.tar", "b.tar", "c.tar"]
    assert sorted(keys_of(ds)) == expected_keys(a=3, b=4, c=5)
    assert ds.stats(1).added == 1

    s3.delete("data/a.tar")
    snap = ds.set_epoch(2)
    assert [s.url.rsplit("/", 1)[1] for s in snap.shards] == ["b.tar", "c.tar"]
    assert sorted(keys_of(ds)) == expected_keys(b=4, c=5)
    assert (ds.stats(2).removed, ds.stats(2).deleted) == (1, 0)


@pytest.mark.parametrize("num_workers,persistent", [(2, False), (2, True)])
def test_two_workers_read_every_sample_once_each_epoch(s3, num_workers, persistent):
    for i, n in enumerate([7, 1, 12, 5]):
        s3.put_shard(f"p/s{i}.tar", n)
    ds = wr.RefreshingWebDataset(s3.url("p/"))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                         persistent_workers=persistent)
    ds.set_epoch(0)
    assert sorted(keys_of(loader)) == expected_keys(s0=7, s1=1, s2=12, s3=5)
    s3.put_shard("p/s4.tar", 9)
    ds.set_epoch(1)
    keys = keys_of(loader)
    assert sorted(keys) == expected_keys(s0=7, s1=1, s2=12, s3=5, s4=9)
    assert ds.stats(1).consumers == num_workers and ds.stats(1).yielded == len(keys)


def test_listing_pages_through_2000_keys_and_an_unchanged_prefix_costs_one_listing(s3, fault_proxy):
    n = 2000

    def upload(i: int) -> dict:
        data = shard_bytes(f"k{i:04d}", 1 + i % 3)
        etag = s3.put(f"many/k{i:04d}.tar", data)["ETag"]
        return manifest_entry(f"k{i:04d}.tar", data, etag, 1 + i % 3)

    with ThreadPoolExecutor(8) as pool:
        entries = list(pool.map(upload, range(n)))
    put_manifest(s3, "many/manifest.json", entries)
    s3.put_shard("many/k0007.tar", 5)  # replaced after the manifest was written: its entry no longer applies
    source = wr.ObjectSource(s3.url("many/"), storage_options=via(s3, fault_proxy, page_size=250))
    ds = wr.RefreshingWebDataset(source)

    snap = ds.set_epoch(0)
    assert len(snap.shards) == n
    assert [s.url for s in snap.shards] == sorted(s.url for s in snap.shards)
    assert snap.nsamples == sum(1 + i % 3 for i in range(n)) - 1 + 5 - 1  # k0007 counted from its object
    pages = fault_proxy.requests("GET", "list-type=2")
    assert len(pages) == math.ceil((n + 1) / 250)  # the shards and manifest.json, 250 keys a page
    reads = fault_proxy.requests("GET")
    assert {r.path.split("?")[0] for r in reads if r.range} == {f"/{s3.name}/many/k0007.tar"}

    fault_proxy.clear()
    again = ds.set_epoch(1)
    assert again.id == snap.id
    assert len(fault_proxy.requests("GET", "list-type=2")) == len(pages)
    assert [r for r in fault_proxy.requests() if r.range or r.method == "HEAD"] == []
    manifest_gets = fault_proxy.requests("GET", "many/manifest.json")
    assert len(manifest_gets) == 1  # answered 304 Not Modified: fetched again only when its ETag changes


def test_keys_with_spaces_and_symbols_are_listed_and_read_by_their_exact_names(s3):
    names = ["a b+c.tar", "x&y<z>.tar", "é%20ü.tar"]
    for name in names:
        s3.put_shard(f"sym/{name}", 2, prefix=name.split(".")[0])
    snap = wr.RefreshingWebDataset(s3.url("sym/"), shardshuffle=False).set_epoch(0)
    assert sorted(s.name for s in snap.shards) == sorted(names)
    assert all(s.url == s3.url(f"sym/{s.name}") and s.nsamples == 2 for s in snap.shards)


def test_manifest_url_lists_relative_and_absolute_urls(s3):
    a = shard_bytes("a", 4)
    a_etag = s3.put("m/a.tar", a)["ETag"]
    s3.put_shard("other/b.tar", 3)
    s3.put_shard("m/c.tar", 2)
    put_manifest(s3, "m/manifest.json", [
        manifest_entry("a.tar", a, a_etag, 4),
        {"url": s3.url("other/b.tar")},  # no count: indexed
        {"url": "missing.tar", "nsamples": 3},  # not in the bucket: left out, as a missing file is
    ])
    ds = wr.RefreshingWebDataset(s3.url("m/manifest.json"), shardshuffle=False)
    snap = ds.set_epoch(0)
    assert [(s.url, s.nsamples, s.name) for s in snap.shards] == [
        (s3.url("m/a.tar"), 4, "a.tar"), (s3.url("other/b.tar"), 3, s3.url("other/b.tar"))]
    assert sorted(keys_of(ds)) == expected_keys(a=4, b=3)


def test_one_object_a_brace_pattern_a_glob_and_a_list_of_urls(s3):
    for i in range(4):
        s3.put_shard(f"g/s{i}.tar", 2)
    s3.put_shard("g/deep/s9.tar", 2)
    ds = wr.RefreshingWebDataset(s3.url("g/s{0..5}.tar"), shardshuffle=False)  # s4, s5 do not exist
    assert [s.name for s in ds.set_epoch(0).shards] == ["s0.tar", "s1.tar", "s2.tar", "s3.tar"]
    ds = wr.RefreshingWebDataset(s3.url("g/s[12].tar"), shardshuffle=False)
    assert [s.name for s in ds.set_epoch(0).shards] == ["s1.tar", "s2.tar"]
    ds = wr.RefreshingWebDataset(s3.url("g/**.tar"), shardshuffle=False)
    assert len(ds.set_epoch(0).shards) == 5
    ds = wr.RefreshingWebDataset([s3.url("g/s3.tar"), s3.url("g/deep/s9.tar"), s3.url("g/s3.tar")],
                                 shardshuffle=False)
    assert [s.url for s in ds.set_epoch(0).shards] == [s3.url("g/s3.tar"), s3.url("g/deep/s9.tar")]
    assert sorted(keys_of(ds)) == expected_keys(s3=2, s9=2)


def test_gzip_object_reads_like_webdataset(s3, tmp_path):
    import gzip

    data = gzip.compress(shard_bytes("a", 6))
    s3.put("z/a.tar.gz", data)
    ds = wr.RefreshingWebDataset(s3.url("z/"))
    assert ds.set_epoch(0).shards[0].nsamples == 6
    local = tmp_path / "a.tar.gz"
    local.write_bytes(data)
    theirs = {s["__key__"]: (s["bin"], s["cls"]) for s in wds.WebDataset(str(local), shardshuffle=False)}
    assert {s["__key__"]: (s["bin"], s["cls"]) for s in ds} == theirs and len(theirs) == 6


def test_junk_and_truncated_objects_are_left_out_naming_the_url_once(s3, caplog):
    s3.put_shard("j/good.tar", 3)
    s3.put("j/junk.tar", b"this is no tar archive" * 100)
    s3.put("j/trunc.tar", shard_bytes("t", 5)[:1536])  # ends inside a member: a broken upload
    ds = wr.RefreshingWebDataset(s3.url("j/"))
    with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
        for epoch in range(3):
            snap = ds.set_epoch(epoch)
            assert [s.name for s in snap.shards] == ["good.tar"]
            assert [url for url, _ in snap.rejected] == [s3.url("j/junk.tar"), s3.url("j/trunc.tar")]
    warned = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warned) == 2 and s3.url("j/junk.tar") in warned[0] and s3.url("j/trunc.tar") in warned[1]
    assert sorted(keys_of(ds)) == expected_keys(good=3)


def claiming_size(data: bytes, size: int) -> bytes:
    """``data`` (a tar) with its first member's header claiming ``size`` bytes (checksum fixed)."""
    h = bytearray(data[:512])
    h[124:136] = b"%011o\0" % size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data[512:]


def test_member_sizes_are_checked_while_an_object_is_indexed(s3):
    import tracemalloc

    s3.put_shard("h/small.tar", 3, 100)
    s3.put_shard("h/big.tar", 2, 5000)  # members larger than the strict dataset's max_sample_bytes
    s3.put("h/hostile.tar", claiming_size(shard_bytes("x", 2), (1 << 33) - 1))  # 8 GiB claimed in 3 KB
    strict = wr.RefreshingWebDataset(s3.url("h/"), shardshuffle=False, max_sample_bytes=4000)
    snap = strict.set_epoch(0)
    assert [s.name for s in snap.shards] == ["small.tar"]
    assert "max_sample_bytes=4000" in dict(snap.rejected)[s3.url("h/big.tar")]

    source = wr.ObjectSource(s3.url("h/"))
    source.store.client()  # made before the count: botocore's models weigh megabytes
    source.store.versioning(s3.name)  # (each operation's model is loaded at its first call)
    lenient = wr.RefreshingWebDataset(source, shardshuffle=False, max_sample_bytes=1 << 62)
    tracemalloc.start()
    try:
        snap = lenient.set_epoch(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s.name for s in snap.shards] == ["big.tar", "small.tar"]
    assert "before its end-of-archive marker" in dict(snap.rejected)[s3.url("h/hostile.tar")]
    assert peak < 16 << 20, f"indexing allocated {peak} bytes"


def test_objects_are_indexed_once_per_etag(s3, fault_proxy):
    for name in "abc":
        s3.put_shard(f"c/{name}.tar", 3)
    ds = wr.RefreshingWebDataset(wr.make_source(s3.url("c/"), storage_options=via(s3, fault_proxy)))
    first = ds.set_epoch(0)
    assert len([r for r in fault_proxy.requests("GET") if r.range]) == 3
    fault_proxy.clear()
    assert ds.set_epoch(1).id == first.id
    assert [r for r in fault_proxy.requests() if r.range] == []
    s3.put_shard("c/b.tar", 4)
    fault_proxy.clear()
    third = ds.set_epoch(2)
    assert {r.path for r in fault_proxy.requests() if r.range} == {f"/{s3.name}/c/b.tar"}
    assert third.id != first.id and [s.nsamples for s in third.shards] == [3, 4, 3]


def test_the_indexing_threads_ask_once_per_listing_whether_the_bucket_is_versioned(s3, fault_proxy):
    for i in range(24):  # more objects than indexing threads, each without a VersionId of its own
        s3.put_shard(f"v/{i:02d}.tar", 2)
    ds = wr.RefreshingWebDataset(wr.make_source(s3.url("v/"), storage_options=via(s3, fault_proxy)))
    assert len(ds.set_epoch(0).shards) == 24
    asked = [r for r in fault_proxy.requests("GET") if r.path.endswith("?versioning")]
    assert len(asked) == 1, [r.path for r in asked]
    s3.put_shard("v/24.tar", 2)
    fault_proxy.clear()
    assert len(ds.set_epoch(1).shards) == 25
    assert len([r for r in fault_proxy.requests("GET") if r.path.endswith("?versioning")]) == 1


@pytest.mark.parametrize("spec", ["gs://bucket/shards/", "az://container/shards/",
                                  ["s3://bucket/a.tar", "gs://bucket/b.tar"]])
def test_other_protocols_are_refused_saying_why(spec):
    with pytest.raises(NotImplementedError, match=r"(gs|az)://.*cannot be read consistently.*s3:// and https://"
                                                  r".*pinned"):
        wr.RefreshingWebDataset(spec)


def test_stream_mode_and_pipe_commands_are_refused_saying_what_to_use(s3):
    s3.put_shard("st/a.tar", 2)
    with pytest.raises(ValueError, match=r'mode="stream" reads a local directory.*mode="epoch"'):
        wr.RefreshingWebDataset(s3.url("st/"), mode="stream")
    with pytest.raises(NotImplementedError, match=r"pipe: command cannot be listed again"):
        wr.RefreshingWebDataset("pipe:aws s3 cp s3://bucket/a.tar -")


# --------------------------------------------------------------------------- changes during an epoch

BIG = 512 * 1024  # 24 samples of this size span three 4 MiB blocks


def _start_reading(s3, key: str, versioned: bool, **kw):
    """An epoch over one three-block object, read to its first sample with no read-ahead and one
    block per GET, so the second block is requested only after the test changed the object (a
    GET already streaming goes on with the version it started with)."""
    if versioned:
        s3.enable_versioning()
    s3.put_shard(key, 24, BIG, version="v1")
    source = wr.ObjectSource(s3.url(key), storage_options=via(s3, readahead=0, request_blocks=1))
    ds = wr.RefreshingWebDataset(source, shardshuffle=False, **kw)
    snap = ds.set_epoch(0)
    assert snap.shards[0].size > 2 * BLOCK_SIZE and (snap.shards[0].version_id is not None) == versioned
    it = iter(ds)
    return ds, it, [next(it)]


@pytest.mark.parametrize("versioned", [False, True])
def test_replaced_during_epoch_never_yields_a_torn_sample(s3, versioned):
    ds, it, seen = _start_reading(s3, "r/a.tar", versioned)
    s3.put_shard("r/a.tar", 24, BIG, version="v2")
    seen += list(it)
    assert sorted(keys_of(seen)) == expected_keys(a=24)  # exactly once
    versions = [tagged(s) for s in seen]
    stats = ds.stats(0)
    if versioned:  # read pinned to the snapshot's VersionId: the old bytes, exactly
        assert set(versions) == {"v1"} and stats.replaced == 0
    else:  # 412 at the second block: reloaded, the rest read from the new version
        assert versions[0] == "v1" and versions[-1] == "v2" and stats.replaced == 1
        assert versions == sorted(versions)


def test_replaced_during_epoch_raise_names_the_url(s3):
    ds, it, seen = _start_reading(s3, "r/a.tar", False, on_change="raise")
    s3.put_shard("r/a.tar", 24, BIG, version="v2")
    with pytest.raises(wr.ShardChangedError, match=r"s3://.*/r/a\.tar.*replaced"):
        for sample in it:
            seen.append(sample)
    assert {tagged(s) for s in seen} == {"v1"} and 0 < len(seen) < 24


def test_replaced_during_epoch_skip_counts_what_it_skipped(s3):
    ds, it, seen = _start_reading(s3, "r/a.tar", False, on_change="skip")
    s3.put_shard("r/a.tar", 24, BIG, version="v2")
    seen += list(it)
    stats = ds.stats(0)
    assert {tagged(s) for s in seen} == {"v1"}
    assert (stats.replaced, stats.skipped, stats.yielded) == (1, 24 - len(seen), len(seen))


@pytest.mark.parametrize("versioned", [False, True])
def test_deleted_during_epoch(s3, versioned):
    ds, it, seen = _start_reading(s3, "d/a.tar", versioned)
    s3.delete("d/a.tar")
    seen += list(it)
    stats = ds.stats(0)
    if versioned:  # the snapshot's version still exists behind the delete marker
        assert sorted(keys_of(seen)) == expected_keys(a=24) and stats.deleted == 0
    else:
        assert 0 < len(seen) < 24 and (stats.deleted, stats.skipped) == (1, 24 - len(seen))


def test_deleted_during_epoch_raise_names_the_url(s3):
    ds, it, seen = _start_reading(s3, "d/a.tar", False, on_change="raise")
    s3.delete("d/a.tar")
    with pytest.raises(wr.ShardVanishedError, match=r"s3://.*/d/a\.tar"):
        list(it)


def test_block_that_differs_from_its_digest_is_never_cut_into_samples(s3):
    data = shard_bytes("a", 24, BIG, version="v1")
    etag = s3.put("k/a.tar", data)["ETag"]
    good = digests_of(data).blocks
    lying = good[:8] + bytes(8) + good[16:]  # block 1's digest is wrong: bytes in the store that rotted
    put_manifest(s3, "k/manifest.json", [manifest_entry("a.tar", data, etag, 24, blocks=lying)])
    ds = wr.RefreshingWebDataset(s3.url("k/"), handler=wds.warn_and_continue)
    ds.set_epoch(0)
    samples = list(ds)
    assert 0 < len(samples) < 24
    layout = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data))}
    for s in samples:  # every yielded sample lies wholly in block 0, the one that checked out
        member = layout[s["__key__"] + ".bin"]
        assert member.offset_data + member.size <= BLOCK_SIZE
    assert ds.stats(0).corrupt == 1 and ds.stats(0).skipped == 24 - len(samples)
    ds = wr.RefreshingWebDataset(s3.url("k/"))
    ds.set_epoch(0)
    with pytest.raises(ObjectCorruptError, match=r"s3://.*/k/a\.tar.*block 1 differs"):
        list(ds)


# --------------------------------------------------------------------------- reads: blocks, faults


def test_consumer_starting_mid_object_reads_only_the_blocks_it_needs(s3, fault_proxy):
    size = 9 * MiB  # each payload covers whole blocks that a reader skipping it never needs
    data = shard_bytes("a", 3, size)
    s3.put("b/a.tar", data)
    source = wr.ObjectSource(s3.url("b/"), storage_options=via(s3, fault_proxy, readahead=0, request_blocks=1))
    shard = wr.RefreshingWebDataset(source).set_epoch(0).shards[0]
    fault_proxy.clear()
    reader, close = open_object(source.store, shard.url, shard.expected(), shard.etag, shard.version_id)
    try:
        (sample,) = list(reader.samples(2, 3))
    finally:
        close()
    assert sample["__key__"] == "a/000002" and len(sample["bin"]) == size
    members = list(tarfile.open(fileobj=io.BytesIO(data)))
    needed = {m.offset // BLOCK_SIZE for m in members}  # every header is walked
    needed |= {b for m in members if m.name.startswith("a/000002.")
               for b in range(m.offset_data // BLOCK_SIZE, (m.offset_data + m.size - 1) // BLOCK_SIZE + 1)}
    fetched = [r.range for r in fault_proxy.requests("GET") if r.range]
    blocks = sorted(int(r.split("=")[1].split("-")[0]) // BLOCK_SIZE for r in fetched)
    assert blocks == sorted(needed) and len(blocks) < math.ceil(len(data) / BLOCK_SIZE)


@pytest.mark.timeout(120)
def test_worker_forked_while_the_main_process_reads_ahead_reads_on_its_own(s3):
    s3.put_shard("w/a.tar", 2)
    s3.put_shard("w/b.tar", 48, BIG)  # six blocks: more than the read-ahead fetches unasked
    ds = wr.RefreshingWebDataset(s3.url("w/"), shardshuffle=False)
    ds.set_epoch(0)
    it = iter(ds)
    next(it)  # reading a.tar; b.tar's first blocks are being fetched ahead in this process
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert sorted(keys_of(loader)) == expected_keys(a=2, b=48)


def readahead_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "wdsrefresh-readahead" and t.is_alive()]


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_read_ahead_threads_end_with_their_reader_and_with_an_abandoned_epoch(s3):
    for name in "abc":
        s3.put_shard(f"t/{name}.tar", 24, BIG)  # three blocks each
    ds = wr.RefreshingWebDataset(s3.url("t/"), shardshuffle=False)
    snap = ds.set_epoch(0)
    assert readahead_threads() == []  # indexing joined its own
    shard = snap.shards[1]
    reader, close = open_object(ds.sample_source.source.store, shard.url, shard.expected(), shard.etag,
                                shard.version_id)
    next(reader.samples(0, 1))
    assert readahead_threads()  # its blocks are fetched ahead, by several GETs at once
    close()
    assert readahead_threads() == []  # joined by close()

    it = iter(ds)
    next(it)  # a.tar is read ahead, b.tar prefetched
    assert wait_until(lambda: len(readahead_threads()) >= 2)
    it.close()  # the consumer abandons its epoch
    assert wait_until(lambda: readahead_threads() == [])


def test_injected_faults_are_retried_and_the_epoch_is_read_exactly_once(s3, fault_proxy):
    for i, n in enumerate([6, 3, 9, 4]):
        s3.put_shard(f"f/s{i}.tar", n)
    # more attempts than faults: all of them may fall on one object's requests
    opts = via(s3, fault_proxy, attempts=8, config_kwargs={"read_timeout": 1, "connect_timeout": 2})
    ds = wr.RefreshingWebDataset(wr.ObjectSource(s3.url("f/"), storage_options=opts))
    listing = fault_proxy.inject("status", times=2, path="list-type=2")  # the listing is retried too
    error_page = fault_proxy.inject("status", times=1, status=200, path="list-type=2")  # an error in a 200
    cut_page = fault_proxy.inject("cut-body", times=1, path="list-type=2")
    ds.set_epoch(0)
    assert (error_page.injected, cut_page.injected) == (1, 1)
    faults = [fault_proxy.inject("status", times=2, ranged=True),
              fault_proxy.inject("reset-body", times=1, ranged=True),
              fault_proxy.inject("reset", times=1, ranged=True),
              fault_proxy.inject("status", times=1, status=500, ranged=True),
              fault_proxy.inject("delay", times=1, delay=3.0, ranged=True)]  # beyond the read timeout
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = keys_of(loader)
    assert sorted(keys) == expected_keys(s0=6, s1=3, s2=9, s3=4)
    assert [f.injected for f in faults] == [f.times for f in faults] and listing.injected == 2
    stats = ds.stats(0)
    assert (stats.corrupt, stats.skipped, stats.yielded) == (0, 0, 22)


def test_a_stream_cut_midway_resumes_at_the_block_it_was_reading(s3, fault_proxy):
    data = shard_bytes("a", 24, BIG, version="v1")  # three blocks
    s3.put("m/a.tar", data)
    ds = wr.RefreshingWebDataset(wr.ObjectSource(s3.url("m/"), storage_options=via(s3, fault_proxy)))
    ds.set_epoch(0)
    fault_proxy.clear()
    cut = fault_proxy.inject("cut-body", times=1, ranged=True, path="/m/a.tar")  # half of a GET's body
    samples = list(ds)
    assert sorted(keys_of(samples)) == expected_keys(a=24) and {tagged(s) for s in samples} == {"v1"}
    assert cut.injected == 1
    gets = [(r, [int(x) for x in r.range.split("=")[1].split("-")]) for r in fault_proxy.requests("GET") if r.range]
    (start, end), = [span for r, span in gets if r.fault == "cut-body"]
    resumed = (start + (end + 1 - start) // 2) // BLOCK_SIZE * BLOCK_SIZE  # the block the cut fell in
    assert [f"{s}-{e}" for _, (s, e) in gets].count(f"{resumed}-{end}") == 1  # reopened there, to the same end
    # every block came whole from exactly one response: none twice, none in part
    fetched = [b for r, (s, e) in gets for b in range(s // BLOCK_SIZE, resumed // BLOCK_SIZE if r.fault else
                                                      e // BLOCK_SIZE + 1)]
    assert sorted(fetched) == list(range(math.ceil(len(data) / BLOCK_SIZE)))


def test_read_failing_after_its_retries_names_url_and_range_through_the_handler(s3, fault_proxy):
    s3.put_shard("e/good.tar", 5)
    s3.put_shard("e/bad.tar", 4)
    source = wr.ObjectSource(s3.url("e/"), storage_options=via(s3, fault_proxy, attempts=3))
    ds = wr.RefreshingWebDataset(source, handler=wds.warn_and_continue)
    ds.set_epoch(0)
    down = fault_proxy.inject("status", times=10**6, path="/e/bad.tar", ranged=True)
    assert sorted(keys_of(ds)) == expected_keys(good=5)
    assert down.injected == 3 and ds.stats(0).corrupt == 1 and ds.stats(0).skipped == 4

    ds = wr.RefreshingWebDataset(source)
    ds.set_epoch(0)
    with pytest.raises(ObjectReadError, match=r"s3://.*/e/bad\.tar: bytes 0-\d+: GET failed after 3 attempts"):
        list(ds)


def test_object_that_cannot_be_indexed_is_left_out_this_epoch_and_tried_again_the_next(s3, fault_proxy):
    s3.put_shard("i/a.tar", 3)
    s3.put_shard("i/b.tar", 2)
    source = wr.ObjectSource(s3.url("i/"), storage_options=via(s3, fault_proxy, attempts=2))
    ds = wr.RefreshingWebDataset(source)
    down = fault_proxy.inject("status", times=10**6, path="/i/b.tar", ranged=True)
    snap = ds.set_epoch(0)
    assert [s.name for s in snap.shards] == ["a.tar"]
    assert [url for url, _ in snap.rejected] == [s3.url("i/b.tar")] and "after 2 attempts" in snap.rejected[0][1]
    down.times = 0  # the store recovers
    snap = ds.set_epoch(1)
    assert [s.name for s in snap.shards] == ["a.tar", "b.tar"] and snap.rejected == ()


def test_a_listing_that_keeps_failing_makes_set_epoch_raise_naming_the_prefix(s3, fault_proxy):
    s3.put_shard("l/a.tar", 3)
    source = wr.ObjectSource(s3.url("l/"), storage_options=via(s3, fault_proxy, attempts=2))
    fault_proxy.inject("status", times=10**6, path="list-type=2")
    with pytest.raises(ObjectReadError, match=r"s3://.*/l/: LIST failed after 2 attempts"):
        wr.RefreshingWebDataset(source).set_epoch(0)


RESUME_SCRIPT = """
import json, sys, torch
from torchdata.stateful_dataloader import StatefulDataLoader
import wdsrefresh as wr
url, checkpoint, on_change = sys.argv[1:4]
ds = wr.RefreshingWebDataset(url, shardshuffle=False, on_change=on_change)
loader = StatefulDataLoader(ds, batch_size=2, num_workers=2, collate_fn=list)
loader.load_state_dict(torch.load(checkpoint, weights_only=False))
try:
    rest = [[s["__key__"], s["ver"].decode(), s["bin"].decode("latin-1")] for b in loader for s in b]
except Exception as exn:
    print(json.dumps({"error": str(exn)}))
else:
    print(json.dumps({"rest": rest, "replaced": ds.stats(0).replaced}))
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("versioned,on_change", [(True, "reload"), (False, "reload"), (False, "raise")])
def test_epoch_resumed_in_a_fresh_process_after_a_replacement_reads_the_checkpointed_version(
        s3, tmp_path, versioned, on_change):
    from torchdata.stateful_dataloader import StatefulDataLoader

    if versioned:
        s3.enable_versioning()
    for name in "ab":
        s3.put_shard(f"s/{name}.tar", 8, version="v1")
    ds = wr.RefreshingWebDataset(s3.url("s/"), shardshuffle=False)
    loader = StatefulDataLoader(ds, batch_size=2, num_workers=2, collate_fn=list)
    it = iter(loader)
    before = [s for _ in range(3) for s in next(it)]
    state = loader.state_dict()
    del it, loader
    torch.save(state, tmp_path / "checkpoint.pt")
    for name in "ab":  # same keys and counts, new bytes: replaced after the checkpoint
        s3.put_shard(f"s/{name}.tar", 8, version="v2")

    run = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, s3.url("s/"), str(tmp_path / "checkpoint.pt"),
                          on_change], capture_output=True, text=True, timeout=150, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if on_change == "raise":  # unversioned: 412 at the first GET -> ShardChangedError naming the object
        assert re.search(r"s3://.*/s/[ab]\.tar.*replaced", out["error"]), out
        return
    rest = out["rest"]
    assert sorted(keys_of(before) + [k for k, _, _ in rest]) == expected_keys(a=8, b=8)  # exactly once
    assert all(payload.startswith(f"[{ver}]") for _, ver, payload in rest)  # none torn
    versions = {ver for _, ver, _ in rest}
    if versioned:  # pinned by the checkpoint's VersionIds: the old bytes, exactly
        assert versions == {"v1"} and out["replaced"] == 0
    else:  # 412: reloaded, the unread samples come from the current version
        assert versions == {"v2"} and out["replaced"] == 2


def cached(s3, proxy, tmp_path, limit: str = "64MB", **options) -> dict:
    return via(s3, proxy, cache_dir=str(tmp_path / "cache"), cache_limit=limit, **options)


def test_cache_serves_later_epochs_without_a_get_and_never_a_replaced_version(s3, fault_proxy, tmp_path):
    for name in "ab":
        s3.put_shard(f"k/{name}.tar", 5, 2000, version="v1")
    ds = wr.RefreshingWebDataset(wr.make_source(s3.url("k/"), storage_options=cached(s3, fault_proxy, tmp_path)))
    ds.set_epoch(0)
    assert sorted(keys_of(ds)) == expected_keys(a=5, b=5)
    fault_proxy.clear()
    ds.set_epoch(1)
    samples = list(ds)
    assert sorted(keys_of(samples)) == expected_keys(a=5, b=5) and {tagged(s) for s in samples} == {"v1"}
    assert [r for r in fault_proxy.requests() if r.range] == []  # every block from the cache
    s3.put_shard("k/b.tar", 5, 2000, version="v2")
    fault_proxy.clear()
    ds.set_epoch(2)
    samples = list(ds)
    assert {s["__key__"][0]: tagged(s) for s in samples} == {"a": "v1", "b": "v2"}
    assert {r.path for r in fault_proxy.requests() if r.range} == {f"/{s3.name}/k/b.tar"}


def test_cached_block_damaged_on_the_node_is_read_from_the_store_again(s3, fault_proxy, tmp_path, caplog):
    s3.put_shard("k/a.tar", 5, 2000, version="v1")
    ds = wr.RefreshingWebDataset(wr.make_source(s3.url("k/"), storage_options=cached(s3, fault_proxy, tmp_path)))
    ds.set_epoch(0)
    list(ds)
    (block,) = (tmp_path / "cache").glob("*/0.blk")
    data = bytearray(block.read_bytes())
    data[600] ^= 1
    block.write_bytes(bytes(data))
    fault_proxy.clear()
    ds.set_epoch(1)
    with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
        samples = list(ds)
    assert sorted(keys_of(samples)) == expected_keys(a=5) and {tagged(s) for s in samples} == {"v1"}
    assert len([r for r in fault_proxy.requests() if r.range]) == 1
    assert "cached block 0 differs from its digest" in caplog.text


def test_cache_stays_under_its_limit_over_20_epochs_of_a_dataset_three_times_its_size(s3, tmp_path):
    from wdsrefresh.storage.objects.cache import BlockCache

    sizes = [len(s3.put_shard(f"c/s{i}.tar", 4, 250_000) and shard_bytes(f"s{i}", 4, 250_000)) for i in range(6)]
    limit = sum(sizes) // 3  # the dataset is three times the cache
    source = wr.make_source(s3.url("c/"), storage_options=via(s3, cache_dir=str(tmp_path / "cache"),
                                                              cache_limit=limit))
    ds = wr.RefreshingWebDataset(source)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    cache = BlockCache(tmp_path / "cache", limit)
    held = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        assert sorted(keys_of(loader)) == expected_keys(**{f"s{i}": 4 for i in range(6)})
        held.append(cache.size())
        assert held[-1] <= limit, f"epoch {epoch}: the cache holds {held[-1]} bytes, its limit is {limit}"
    assert max(held) > limit // 2  # it was used, not merely empty


def test_storage_options_reach_spawned_workers_and_credentials_are_never_shown(s3, fault_proxy, monkeypatch,
                                                                               caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: only the options work
    secret = "SECRET-marker-d41d8cd98f00"
    s3.put_shard("o/a.tar", 5)
    s3.put_shard("o/b.tar", 2)
    opts = via(s3, fault_proxy, key="AKIA-marker-1234", secret=secret, attempts=2)
    source = wr.ObjectSource(s3.url("o/"), storage_options=opts)
    ds = wr.RefreshingWebDataset(source)
    with caplog.at_level(logging.DEBUG):
        snap = ds.set_epoch(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
        assert sorted(keys_of(loader)) == expected_keys(a=5, b=2)
        fault_proxy.inject("status", times=10**6, ranged=True)
        ds.set_epoch(1)
        with pytest.raises(ObjectReadError) as failure:
            list(ds)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("wdsrefresh"))
    shown = [pickle.dumps(snap), pickle.dumps(ds.state_dict()), repr(source), repr(source.store),
             source.describe(), str(failure.value), ours]
    for text in shown:
        text = text.decode("latin-1") if isinstance(text, bytes) else text
        assert secret not in text
        assert "AKIA-marker" not in text
    assert secret not in caplog.text  # botocore's own debug log names the key id in headers, never the secret

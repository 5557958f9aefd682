"""The object-store read path, source by source: each source reads through its own store, every
version is pinned (the ``null`` one included), reads are counted, and a shard that grew under a
reload says so.

Two endpoints are two moto servers in two processes (two in one process share one backend).
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import uuid

import boto3
import pytest
import torch

import wdsrefresh as wr
from s3fixtures import REGION, aws_environment, moto_server, s3, shard_bytes  # noqa: F401 - fixtures
from shardutil import write_shard
from wdsrefresh.format.digest import BLOCK_SIZE, FileDigester

pytest_plugins = ("httpfixtures",)  # the ``web`` fixture

BIG = 512 * 1024  # payload size: 12 samples span two 4 MiB blocks

_SERVER = """
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # serves until the test closes stdin
server.stop()
"""


def keys_of(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def expected_keys(**shards: int) -> list[str]:
    return sorted(f"{name}/{i:06d}" for name, n in shards.items() for i in range(n))


def loader(ds, num_workers: int):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)


def tagged(sample: dict) -> str:
    """The version a sample's payload came from; asserts the sample is not torn between two."""
    version = sample["ver"].decode()
    assert sample["bin"].startswith(f"[{version}]".encode()), f"{sample['__key__']}: payload of another version"
    return version


def _start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready:
        proc.kill()
        raise AssertionError("a moto server did not start within 60 s")
    return proc, proc.stdout.readline().strip()


@pytest.fixture(scope="module")
def two_endpoints():
    """Two S3 servers, each its own process (its own backend) on 127.0.0.1."""
    started = [_start_server() for _ in range(2)]
    yield [url for _, url in started]
    for proc, _ in started:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


# --------------------------------------------------------------------------- item 1: a store per source


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_endpoints_with_one_bucket_name_each_read_only_their_own_objects(two_endpoints, monkeypatch, caplog,
                                                                             num_workers):
    aws_environment(monkeypatch, "http://127.0.0.1:9")  # nothing listens there: only each source's option works
    bucket = f"t{uuid.uuid4().hex[:16]}"
    counts = [{"a0": 10, "a1": 10}, {"b0": 10, "b1": 10, "b2": 10}]  # A holds 20 samples, B 30
    for endpoint, shards in zip(two_endpoints, counts):
        client = _client(endpoint)
        client.create_bucket(Bucket=bucket)
        for i, (prefix, n) in enumerate(shards.items()):  # the same keys on both: d/0.tar, d/1.tar, ...
            client.put_object(Bucket=bucket, Key=f"d/{i}.tar", Body=shard_bytes(prefix, n))
    datasets = [wr.RefreshingWebDataset(wr.ObjectSource(f"s3://{bucket}/d/", storage_options={"endpoint_url": e}))
                for e in two_endpoints]
    try:
        for ds in datasets:  # both made and resolved before either reads
            ds.set_epoch(0)
        with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
            got = [sorted(keys_of(loader(ds, num_workers))) for ds in datasets]
        assert got == [expected_keys(**shards) for shards in counts]
        for ds in datasets:
            stats = ds.stats(0)
            assert (stats.replaced, stats.deleted, stats.corrupt, stats.skipped) == (0, 0, 0, 0)
        assert "412" not in caplog.text and "replaced" not in caplog.text
    finally:
        for ds in datasets:
            ds.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_https_sources_on_one_host_each_send_their_own_header(web, num_workers):
    tokens = {"a": "Bearer token-of-A", "b": "Bearer token-of-B"}
    web.required_under = {f"/{name}/": {"Authorization": token} for name, token in tokens.items()}
    counts = {"a": {"a0": 4, "a1": 3}, "b": {"b0": 5}}
    for name, shards in counts.items():
        os.makedirs(web.path(name))
        for prefix, n in shards.items():
            with open(web.path(f"{name}/{prefix}.tar"), "wb") as f:
                f.write(shard_bytes(prefix, n))
    datasets = {name: wr.RefreshingWebDataset(wr.ObjectSource(
        [web.at(f"{name}/{prefix}.tar") for prefix in counts[name]],
        storage_options={"headers": {"Authorization": tokens[name]}, "attempts": 1})) for name in counts}
    for ds in datasets.values():
        ds.set_epoch(0)
    got = {name: sorted(keys_of(loader(ds, num_workers))) for name, ds in datasets.items()}
    assert got == {name: expected_keys(**shards) for name, shards in counts.items()}
    assert [r for r in web.requests() if r.status == 401] == []
    assert {r.method for r in web.requests()} >= {"HEAD", "GET"}  # the reads went through the check too


# --------------------------------------------------------------------------- item 2: the null version


def _manifest(bucket, entries: dict[str, tuple[bytes, str, int]]) -> None:
    shardlist = []
    for name, (data, etag, n) in entries.items():
        d = FileDigester()
        for i in range(0, len(data), BLOCK_SIZE):
            d.update_block(data[i : i + BLOCK_SIZE])
        shardlist.append({"url": name, "nsamples": n, "filesize": len(data), "etag": etag, "digest": d.digest,
                          "blocks": d.blocks.hex()})
    doc = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "wdsrefresh_version": 1, "shardlist": shardlist}
    bucket.put("n/manifest.json", json.dumps(doc).encode())


@pytest.mark.parametrize("described", [False, True], ids=["indexed", "manifest"])
def test_object_written_before_versioning_was_enabled_is_read_as_the_snapshot_saw_it(s3, described):
    counts = {"a.tar": 8, "b.tar": 6}
    written = {}
    for name, n in counts.items():
        data = shard_bytes(name[0], n, version="v1")
        written[name] = (data, s3.put(f"n/{name}", data)["ETag"], n)
    if described:  # counts and digests from a manifest entry with the object's ETag: no index read
        _manifest(s3, written)
    s3.enable_versioning()  # the objects keep VersionId "null"
    ds = wr.RefreshingWebDataset(s3.url("n/"), shardshuffle=False)
    ds.set_epoch(0)
    s3.put_shard("n/a.tar", 8, version="v2")  # a new version, after the snapshot
    samples = list(ds)
    assert sorted(keys_of(samples)) == expected_keys(a=8, b=6)
    assert {tagged(s) for s in samples} == {"v1"}  # the snapshot's bytes, exactly
    assert ds.stats(0).replaced == 0
    ds.set_epoch(1)
    assert {tagged(s) for s in ds if s["__key__"].startswith("a/")} == {"v2"}


# --------------------------------------------------------------------------- item 3: counted reads


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bytes_and_seconds_of_s3_reads_are_counted(s3, num_workers):
    blobs = [shard_bytes(f"c{i}", 10, 1000 * (i + 1)) for i in range(4)]  # 10 samples each: whole shards per worker
    for i, data in enumerate(blobs):
        s3.put(f"c/{i}.tar", data)
    ds = wr.RefreshingWebDataset(s3.url("c/"), shardshuffle=False)
    ds.set_epoch(0)
    assert sorted(keys_of(loader(ds, num_workers))) == expected_keys(c0=10, c1=10, c2=10, c3=10)
    stats = ds.stats(0)
    assert stats.bytes_read == sum(map(len, blobs))  # every object once: each is read whole by one consumer
    assert stats.read_seconds > 0 and stats.verify_seconds > 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bytes_and_seconds_of_https_reads_are_counted(web, num_workers):
    blobs = [shard_bytes(f"c{i}", 10, 1000 * (i + 1)) for i in range(4)]
    for i, data in enumerate(blobs):
        with open(web.path(f"{i}.tar"), "wb") as f:
            f.write(data)
    ds = wr.RefreshingWebDataset(web.at("{0..3}.tar"), shardshuffle=False)
    ds.set_epoch(0)
    assert sorted(keys_of(loader(ds, num_workers))) == expected_keys(c0=10, c1=10, c2=10, c3=10)
    stats = ds.stats(0)
    assert stats.bytes_read == sum(map(len, blobs))
    assert stats.read_seconds > 0 and stats.verify_seconds > 0


# --------------------------------------------------------------------------- item 4: grown under a reload


def test_object_replaced_mid_epoch_by_a_bigger_version_says_and_counts_what_it_grew(s3, caplog):
    s3.put_shard("g/a.tar", 12, BIG, version="v1")
    # no read-ahead, one block per GET: the second block is asked for after the replacement
    source = wr.ObjectSource(s3.url("g/a.tar"), storage_options={"readahead": 0, "request_blocks": 1})
    ds = wr.RefreshingWebDataset(source, shardshuffle=False)
    assert ds.set_epoch(0).shards[0].size > BLOCK_SIZE
    it = iter(ds)
    seen = [next(it)]
    s3.put_shard("g/a.tar", 30, BIG, version="v2")
    with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
        seen += list(it)
    assert sorted(keys_of(seen)) == expected_keys(a=12)  # the snapshot's share, exactly once
    assert tagged(seen[0]) == "v1" and tagged(seen[-1]) == "v2"
    stats = ds.stats(0)
    assert (stats.replaced, stats.grown_samples, stats.skipped) == (1, 30 - 12, 0)
    grown = [r.getMessage() for r in caplog.records if "holds 30 samples" in r.getMessage()]
    assert len(grown) == 1 and s3.url("g/a.tar") in grown[0] and str(30 - 12) in grown[0]
    ds.set_epoch(1)
    assert sorted(keys_of(ds)) == expected_keys(a=30)  # the next epoch reads all of them
    assert ds.stats(1).grown_samples == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_file_replaced_mid_epoch_by_a_bigger_version_says_and_counts_it_once(shard_dir, caplog, num_workers):
    write_shard(shard_dir, "a.tar", 12)
    ds = wr.RefreshingWebDataset(shard_dir, shardshuffle=False)
    ds.set_epoch(0)
    write_shard(shard_dir, "a.tar", 30, prefix="new")  # with 2 workers, both reload it
    with caplog.at_level(logging.WARNING, logger="wdsrefresh"):
        keys = sorted(keys_of(loader(ds, num_workers)))
    assert keys == expected_keys(new=12)
    stats = ds.stats(0)
    assert (stats.replaced, stats.grown_samples, stats.skipped) == (1, 30 - 12, 0)
    if num_workers == 0:  # (a worker's log records stay in its process)
        assert any("a.tar" in r.getMessage() and "holds 30 samples" in r.getMessage() for r in caplog.records)
    ds.set_epoch(1)
    assert sorted(keys_of(loader(ds, num_workers))) == expected_keys(new=30)

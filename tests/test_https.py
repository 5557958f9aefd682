"""https:// sources against a real web server on 127.0.0.1: the refresh contract over HTTP.

Each epoch HEADs the shard URLs (or fetches the manifest again only if its ETag changed); every
ranged GET is pinned by If-Match and its response's ETag checked, so replaced, deleted or
unpinnable shards go through the same policies (or refusals) as objects in S3.
"""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch
import webdataset as wds

import wdsrefresh as wr
from s3fixtures import shard_bytes
from wdsrefresh.format.digest import BLOCK_SIZE, FileDigester
from wdsrefresh.storage.objects.http import UnpinnableError
from wdsrefresh.storage.objects.s3 import ObjectReadError

pytest_plugins = ("httpfixtures",)  # the ``web`` fixture

BIG = 512 * 1024  # 24 samples of this size span three 4 MiB blocks
FAST = {"backoff": 0.01, "max_backoff": 0.05}


def keys_of(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def expected_keys(**shards: int) -> list[str]:
    return sorted(f"{name}/{i:06d}" for name, n in shards.items() for i in range(n))


def publish(web, name: str, data: bytes) -> str:
    """Writes a file the way a producer publishes one (temporary name, then rename); its URL.
    Its last write is dated a second back, as a slower writer's is (local reads of the same
    files then take them as ready, see shardutil.write_shard)."""
    tmp = web.path(f"_tmp.{name.replace('/', '_')}")
    with open(tmp, "wb") as f:
        f.write(data)
    written = os.stat(tmp).st_mtime_ns - 1_000_000_000
    os.utime(tmp, ns=(written, written))
    os.replace(tmp, web.path(name))
    return web.at(name)


def publish_shard(web, name: str, n: int, size: int = 64, version: str = "") -> str:
    return publish(web, name, shard_bytes(os.path.basename(name).split(".")[0], n, size, version))


def manifest_entry(web, name: str, n: int, with_etag: bool = True) -> dict:
    data = open(web.path(name), "rb").read()
    d = FileDigester()
    for i in range(0, max(len(data), 1), BLOCK_SIZE):
        d.update_block(data[i : i + BLOCK_SIZE])
    entry = {"url": name, "nsamples": n, "filesize": len(data), "digest": d.digest, "blocks": d.blocks.hex()}
    if with_etag:
        entry["etag"] = web.etag_of(name)
    return entry


def publish_manifest(web, entries: list[dict], name: str = "manifest.json") -> str:
    doc = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "wdsrefresh_version": 1, "shardlist": entries}
    return publish(web, name, json.dumps(doc).encode())


def tagged(sample: dict) -> str:
    """The version a sample's payload came from; asserts the sample is not torn between two."""
    version = sample["ver"].decode()
    assert sample["bin"].startswith(f"[{version}]".encode()), f"{sample['__key__']}: payload of another version"
    return version


def plain(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}


# --------------------------------------------------------------------------- sources


def test_brace_list_is_read_exactly_once_with_the_samples_a_local_read_yields(web):
    for i, n in enumerate([5, 1, 9]):
        publish_shard(web, f"shard-{i:03d}.tar", n, size=300)
    ds = wr.RefreshingWebDataset(web.at("shard-{000..003}.tar"), shardshuffle=False)  # 003 does not exist
    snap = ds.set_epoch(0)
    assert [s.url for s in snap.shards] == [web.at(f"shard-{i:03d}.tar") for i in range(3)]
    first = snap.shards[0]
    assert (first.etag, first.nsamples, first.name, first.version_id) == (web.etag_of("shard-000.tar"), 5,
                                                                          "shard-000.tar", None)
    remote = [plain(s) for s in ds]
    local = wr.RefreshingWebDataset([web.path(f"shard-{i:03d}.tar") for i in range(3)], shardshuffle=False)
    local.set_epoch(0)
    assert remote == [plain(s) for s in local]
    assert sorted(keys_of(remote)) == expected_keys(**{"shard-000": 5, "shard-001": 1, "shard-002": 9})
    ranged = [r for r in web.requests("GET") if r.range]
    assert ranged and all(r.status == 206 for r in ranged)


def test_a_list_of_urls_and_one_url(web):
    a, b = publish_shard(web, "a.tar", 3), publish_shard(web, "b.tar", 2)
    ds = wr.RefreshingWebDataset([b, a], shardshuffle=False)
    ds.set_epoch(0)
    assert keys_of(ds) == expected_keys(b=2) + expected_keys(a=3)
    ds = wr.RefreshingWebDataset(a + "?download=true")
    assert ds.set_epoch(0).shards[0].name == "a.tar" and sorted(keys_of(ds)) == expected_keys(a=3)


def test_urls_redirected_as_a_hub_redirects_to_its_cdn_are_read_pinned(web):
    os.mkdir(web.path("blobs"))
    publish_shard(web, "blobs/a.tar", 24, BIG, version="v1")
    web.redirects = {"/resolve/main/a.tar": "/blobs/a.tar"}
    ds = wr.RefreshingWebDataset(web.at("resolve/main/a.tar"))
    shard = ds.set_epoch(0).shards[0]
    assert (shard.name, shard.etag, shard.nsamples) == ("a.tar", web.etag_of("blobs/a.tar"), 24)
    assert {tagged(s) for s in ds} == {"v1"}
    ranged = [r for r in web.requests("GET") if r.range and r.path == "/blobs/a.tar"]
    assert ranged and all(r.status == 206 for r in ranged)


def test_manifest_with_etags_costs_one_request_per_epoch_and_lists_relative_and_absolute_urls(web):
    os.mkdir(web.path("sub"))
    publish_shard(web, "a.tar", 3)
    publish_shard(web, "sub/b.tar", 4)
    publish_shard(web, "c.tar", 2)
    entries = [manifest_entry(web, "a.tar", 3), manifest_entry(web, "sub/b.tar", 4),
               dict(manifest_entry(web, "c.tar", 2, with_etag=False), url=web.at("c.tar"))]
    ds = wr.RefreshingWebDataset(publish_manifest(web, entries), shardshuffle=False)
    snap = ds.set_epoch(0)
    assert [s.url for s in snap.shards] == [web.at("a.tar"), web.at("sub/b.tar"), web.at("c.tar")]
    # entries with size and ETag are taken as they are (reads are pinned to that ETag); c.tar's
    # entry names no version: HEADed, and indexed once (one GET)
    assert [r.path for r in web.requests("HEAD")] == ["/c.tar"]
    assert [r.path for r in web.requests("GET")] == ["/manifest.json", "/c.tar"]
    assert sorted(keys_of(ds)) == expected_keys(a=3, b=4, c=2)

    web.clear()
    assert ds.set_epoch(1).id == snap.id
    assert [(r.method, r.path, r.status) for r in web.requests()] == [("GET", "/manifest.json", 304),
                                                                        ("HEAD", "/c.tar", 200)]


def test_shard_published_with_a_new_manifest_between_epochs_is_read_the_next_epoch(web):
    publish_shard(web, "a.tar", 3)
    url = publish_manifest(web, [manifest_entry(web, "a.tar", 3)])
    ds = wr.RefreshingWebDataset(url)
    ds.set_epoch(0)
    assert sorted(keys_of(ds)) == expected_keys(a=3)
    publish_shard(web, "b.tar", 5)
    publish_manifest(web, [manifest_entry(web, "a.tar", 3), {"url": "b.tar"}])  # b.tar: HEADed and indexed
    snap = ds.set_epoch(1)
    assert [s.nsamples for s in snap.shards] == [3, 5]
    assert sorted(keys_of(ds)) == expected_keys(a=3, b=5)
    assert ds.stats(1).added == 1


@pytest.mark.parametrize("spec,what", [("/data/", "a directory"), ("/data/*.tar", "a glob"),
                                       ("/data/notes", "a directory")])
def test_directory_and_glob_urls_are_refused_saying_to_give_a_manifest_or_a_brace_list(web, spec, what):
    with pytest.raises(ValueError, match=r"HTTP has no listing.*give a manifest URL.*brace pattern"):
        wr.RefreshingWebDataset(web.url + spec)


def test_gs_az_and_mixed_lists_are_refused_saying_what_is_supported(web):
    with pytest.raises(NotImplementedError, match=r"gs://.*cannot be read consistently.*s3:// and https://"):
        wr.RefreshingWebDataset("gs://bucket/shards/")
    with pytest.raises(ValueError, match=r"mixes https:// and s3://"):
        wr.RefreshingWebDataset([web.at("a.tar"), "s3://bucket/b.tar"])


# --------------------------------------------------------------------------- servers that cannot pin


@pytest.mark.parametrize("switch,message", [
    ({"etags": "none"}, r"cannot be read consistently: the server sends no strong ETag \(none at all\)"),
    ({"etags": "weak"}, r"cannot be read consistently: the server sends no strong ETag \(only a weak one, W/"),
    ({"ranges": False}, r"cannot be read consistently: the server ignores byte ranges"),
])
def test_server_without_a_strong_etag_or_ranges_is_refused_naming_the_url(web, switch, message):
    publish_shard(web, "a.tar", 3)
    for name, value in switch.items():
        setattr(web, name, value)
    ds = wr.RefreshingWebDataset(web.at("a.tar"))
    with pytest.raises(UnpinnableError, match=rf"{web.at('a.tar')}: {message}"):
        ds.set_epoch(0)


def test_manifest_pin_on_a_server_that_ignores_ranges_is_refused_at_the_first_read(web):
    publish_shard(web, "a.tar", 3)
    ds = wr.RefreshingWebDataset(publish_manifest(web, [manifest_entry(web, "a.tar", 3)]))
    ds.set_epoch(0)
    web.ranges = False
    with pytest.raises(UnpinnableError, match=r"a\.tar: cannot be read consistently: the server ignores byte ranges"):
        list(ds)


# --------------------------------------------------------------------------- changes during an epoch


def _start_reading(web, name: str, **kw):
    """An epoch over one three-block shard, read to its first sample with no read-ahead and one
    block per GET, so the second block is requested only after the test changed the file."""
    url = publish_shard(web, name, 24, BIG, version="v1")
    source = wr.ObjectSource(url, storage_options={**FAST, "readahead": 0, "request_blocks": 1})
    ds = wr.RefreshingWebDataset(source, shardshuffle=False, **kw)
    assert ds.set_epoch(0).shards[0].size > 2 * BLOCK_SIZE
    it = iter(ds)
    return ds, it, [next(it)]


def test_replaced_during_epoch_is_reloaded_and_never_yields_a_torn_sample(web):
    ds, it, seen = _start_reading(web, "a.tar")
    publish_shard(web, "a.tar", 24, BIG, version="v2")
    seen += list(it)
    assert sorted(keys_of(seen)) == expected_keys(a=24)  # exactly once
    versions = [tagged(s) for s in seen]
    assert versions[0] == "v1" and versions[-1] == "v2" and versions == sorted(versions)
    assert ds.stats(0).replaced == 1
    assert any(r.status == 412 for r in web.requests("GET"))


def test_replaced_during_epoch_raise_names_the_url(web):
    ds, it, seen = _start_reading(web, "a.tar", on_change="raise")
    publish_shard(web, "a.tar", 24, BIG, version="v2")
    with pytest.raises(wr.ShardChangedError, match=rf"{web.at('a.tar')}.*replaced.*HTTP 412"):
        for sample in it:
            seen.append(sample)
    assert {tagged(s) for s in seen} == {"v1"} and 0 < len(seen) < 24


def test_server_that_ignores_if_match_is_still_caught_by_the_etag_it_sends(web):
    web.if_match = False
    ds, it, seen = _start_reading(web, "a.tar", on_change="raise")
    publish_shard(web, "a.tar", 24, BIG, version="v2")
    with pytest.raises(wr.ShardChangedError, match=rf"{web.at('a.tar')}.*replaced.*did not apply If-Match"):
        for sample in it:
            seen.append(sample)
    assert {tagged(s) for s in seen} == {"v1"}
    assert not any(r.status == 412 for r in web.requests())


def test_shard_deleted_during_epoch_is_counted_and_skipped(web):
    ds, it, seen = _start_reading(web, "a.tar")
    os.remove(web.path("a.tar"))
    seen += list(it)
    stats = ds.stats(0)
    assert 0 < len(seen) < 24 and (stats.deleted, stats.skipped) == (1, 24 - len(seen))
    with pytest.raises(wr.NoShardsError, match=r"a\.tar.*matches no shard"):  # the HEAD finds nothing
        ds.set_epoch(1)


def test_503s_are_retried_and_the_epoch_is_read_exactly_once(web):
    for i, n in enumerate([6, 3, 9]):
        publish_shard(web, f"s{i}.tar", n)
    source = wr.ObjectSource(web.at("s{0..2}.tar"), storage_options=FAST)
    ds = wr.RefreshingWebDataset(source)
    web.fail(503, times=2)  # HEADs
    ds.set_epoch(0)
    web.fail(503, times=3, ranged=True)
    assert sorted(keys_of(ds)) == expected_keys(s0=6, s1=3, s2=9)
    assert sum(r.status == 503 for r in web.requests()) == 5
    source = wr.ObjectSource(web.at("s0.tar"), storage_options={**FAST, "attempts": 2})
    ds = wr.RefreshingWebDataset(source, handler=wds.warn_and_continue)
    ds.set_epoch(0)
    web.fail(503, times=10, ranged=True)
    assert list(ds) == [] and ds.stats(0).corrupt == 1


# --------------------------------------------------------------------------- workers, headers


def test_dataloader_with_two_workers_reads_every_sample_once_each_epoch(web):
    for i, n in enumerate([7, 1, 12, 5]):
        publish_shard(web, f"s{i}.tar", n)
    ds = wr.RefreshingWebDataset(web.at("s{0..4}.tar"))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    ds.set_epoch(0)
    assert sorted(keys_of(loader)) == expected_keys(s0=7, s1=1, s2=12, s3=5)
    publish_shard(web, "s4.tar", 9)
    ds.set_epoch(1)
    keys = keys_of(loader)
    assert sorted(keys) == expected_keys(s0=7, s1=1, s2=12, s3=5, s4=9)
    assert ds.stats(1).consumers == 2 and ds.stats(1).yielded == len(keys)


@pytest.mark.timeout(180)
def test_headers_reach_spawned_workers_and_their_secret_is_never_shown(web, caplog):
    secret = "Bearer hf_SECRET-marker-d41d8cd98f00"
    web.required = {"Authorization": secret}
    publish_shard(web, "a.tar", 5)
    publish_shard(web, "b.tar", 2)
    with pytest.raises(ObjectReadError, match=r"a\.tar: HEAD failed: HTTP 401"):
        wr.RefreshingWebDataset(web.at("{a,b}.tar")).set_epoch(0)
    source = wr.ObjectSource(web.at("{a,b}.tar"), storage_options={**FAST, "attempts": 2,
                                                                   "headers": {"Authorization": secret}})
    ds = wr.RefreshingWebDataset(source)
    with caplog.at_level(logging.DEBUG):
        snap = ds.set_epoch(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
        assert sorted(keys_of(loader)) == expected_keys(a=5, b=2)
        web.fail(503, times=10**6, ranged=True)
        ds.set_epoch(1)
        with pytest.raises(ObjectReadError) as failure:
            list(ds)
    shown = [pickle.dumps(snap), pickle.dumps(ds.state_dict()), repr(source), repr(source.store),
             source.describe(), str(failure.value), caplog.text]
    for text in shown:
        text = text.decode("latin-1") if isinstance(text, bytes) else text
        assert "SECRET-marker" not in text
    assert "Authorization" in repr(source.store)  # the header's name, never its value

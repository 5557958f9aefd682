"""Where shards come from: directories, globs, brace patterns, manifests, lists; clear errors."""

import json
import os

import pytest
import webdataset as wds

import wdsrefresh as wr
from conftest import THIRD_PARTY_SHARDS, third_party_shard
from shardutil import write_shard


def urls(source):
    return [os.path.basename(s.url) for s in wr.RefreshingWebDataset(source).set_epoch(0).shards]


def test_directory_lists_shards_and_ignores_temporary_and_hidden_names(shard_dir):
    for name in ["a.tar", "b.tar.gz", "c.tgz"]:
        write_shard(shard_dir, name, 2)
    for name in [".hidden.tar", "x.tar.tmp", "y.tar.part", "z.tar~", "_tmp.w.tar", "notes.txt"]:
        with open(os.path.join(shard_dir, name), "wb") as f:
            f.write(b"junk")
    assert urls(shard_dir) == ["a.tar", "b.tar.gz", "c.tgz"]


def test_glob_brace_and_list_sources(shard_dir):
    for i in range(4):
        write_shard(shard_dir, f"s-{i}.tar", 1)
    assert urls(os.path.join(shard_dir, "s-[12].tar")) == ["s-1.tar", "s-2.tar"]
    # names of the brace pattern that do not exist yet are simply not in this epoch
    assert urls(os.path.join(shard_dir, "s-{0..9}.tar")) == ["s-0.tar", "s-1.tar", "s-2.tar", "s-3.tar"]
    both = [os.path.join(shard_dir, "s-0.tar"), os.path.join(shard_dir, "s-{2..3}.tar")]
    assert urls(both) == ["s-0.tar", "s-2.tar", "s-3.tar"]


def test_manifest_urls_resolve_against_its_directory(shard_dir):
    write_shard(shard_dir, "m0.tar", 3)
    write_shard(shard_dir, "m1.tar", 5)
    manifest = os.path.join(shard_dir, "index.json")
    with open(manifest, "w") as f:
        json.dump({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                   "shardlist": [{"url": "m1.tar", "nsamples": 5}, {"url": "m0.tar", "nsamples": 3}]}, f)
    snap = wr.RefreshingWebDataset(manifest).set_epoch(0)
    assert [(s.url, s.nsamples) for s in snap.shards] == [("m1.tar", 5), ("m0.tar", 3)]
    keys = [s["__key__"] for s in wr.RefreshingWebDataset(manifest, shardshuffle=False)]
    assert keys == [f"m1/{i:06d}" for i in range(5)] + [f"m0/{i:06d}" for i in range(3)]


def test_source_matching_nothing_names_the_source(tmp_path):
    with pytest.raises(wr.NoShardsError, match="nowhere"):
        wr.RefreshingWebDataset(str(tmp_path / "nowhere" / "*.tar")).set_epoch(0)


def test_junk_file_is_rejected_with_one_warning_naming_it_or_raises_under_on_invalid(shard_dir, caplog):
    write_shard(shard_dir, "good.tar", 3)
    bad = os.path.join(shard_dir, "bad.tar")
    with open(bad, "wb") as f:
        f.write(b"this is not a tar file at all" * 40)
    os.utime(bad, (1_600_000_000, 1_600_000_000))  # dropped a while ago: no writer is still at it
    with pytest.raises(wr.TarError, match="bad.tar"):
        wr.RefreshingWebDataset(shard_dir, on_invalid="raise").set_epoch(0)
    ds = wr.RefreshingWebDataset(shard_dir)  # a live job goes on without it
    for epoch in range(3):
        snap = ds.set_epoch(epoch)
        assert [os.path.basename(u) for u, _ in snap.rejected] == ["bad.tar"]
        assert len(list(ds)) == 3
    assert len([r for r in caplog.records if "bad.tar" in r.getMessage() and r.levelname == "WARNING"]) == 1
    ds.close()


@pytest.mark.parametrize("name", THIRD_PARTY_SHARDS)
def test_samples_equal_webdatasets_on_third_party_shards(name):
    path = third_party_shard(name)
    expected = list(wds.WebDataset(path, shardshuffle=False))
    actual = list(wr.RefreshingWebDataset(path, shardshuffle=False))
    assert [s["__key__"] for s in actual] == [s["__key__"] for s in expected]
    # __local_path__ is the resolved path we opened (the snapshot holds resolved paths)
    assert [os.path.realpath(s.pop("__local_path__")) for s in actual] == [
        os.path.realpath(s.pop("__local_path__")) for s in expected
    ]
    assert actual == expected


def packed_six_samples(shard_dir):
    """Two shards of three samples packed by `pack`: (their directory, its manifest's path, the manifest)."""
    from wdsrefresh.write.pack import pack_entries

    raw = os.path.join(shard_dir, "..", "raw")
    os.makedirs(raw)
    for i in range(6):
        with open(os.path.join(raw, f"k{i}.txt"), "wb") as f:
            f.write(b"x" * 10)
    out = os.path.join(shard_dir, "packed")
    pack_entries([raw], out, maxcount=3)
    manifest = os.path.join(out, "manifest.json")
    return out, manifest, json.load(open(manifest))


@pytest.mark.parametrize("watch", [True, False])
def test_directory_manifest_gives_counts_without_reading_the_shards(shard_dir, watch):
    out, manifest, doc = packed_six_samples(shard_dir)
    doc["shardlist"][0]["nsamples"] = 2  # a count only the manifest says: proof it was not re-read
    json.dump(doc, open(manifest, "w"))
    snap = wr.RefreshingWebDataset(out, watch=watch).set_epoch(0)
    by_name = {os.path.basename(s.url): s for s in snap.shards}
    first = doc["shardlist"][0]
    assert by_name[first["url"]].nsamples == 2 and by_name[first["url"]].digest == first["digest"]


def test_fragments_of_an_uncommitted_pack_count_like_the_manifest(shard_dir):
    out, manifest, doc = packed_six_samples(shard_dir)
    first, second = doc["shardlist"]
    second["nsamples"] = 2  # a count only the fragment says: proof it was used, not re-read
    os.makedirs(os.path.join(out, "manifest.d"), exist_ok=True)
    json.dump({**doc, "shardlist": [second]}, open(os.path.join(out, "manifest.d", "part-00ab-00001.json"), "w"))
    json.dump({**doc, "shardlist": [first]}, open(manifest, "w"))  # as if killed before its commit
    snap = wr.RefreshingWebDataset(out, watch=False).set_epoch(0)
    counts = {os.path.basename(s.url): s.nsamples for s in snap.shards}
    assert counts == {first["url"]: 3, second["url"]: 2}

"""Manifest entries are checked, apply only to the file version they describe, and can be rebuilt.

A directory's own manifest only saves reading the shards: a bad entry is ignored with a
warning and its shard indexed from the file, so counts always come from real files. A
manifest given as the source raises ManifestError naming the file, the entry and the field.
"""

import json
import logging
import os
import shutil

import pytest
from webdataset.handlers import warn_and_continue

import wdsrefresh as wr
from shardutil import write_shard
from wdsrefresh import cli
from wdsrefresh.format import manifest
from wdsrefresh.format.manifest import ManifestError
from wdsrefresh.format.tario import index_shard


def entry_json(directory, name, **fields):
    """What pack would write for ``name`` (count, size, mtime_ns, digests), with ``fields`` replaced."""
    path = os.path.join(directory, name)
    index = index_shard(path)
    st = os.stat(path)
    entry = {"url": name, "nsamples": index.nsamples, "filesize": st.st_size, "mtime_ns": st.st_mtime_ns,
             "digest": index.digest, "blocks": index.blocks.hex()}
    entry.update(fields)
    return entry


def write_manifest(path, shardlist, **top):
    with open(path, "w") as f:
        json.dump({"__kind__": "wids-shard-index-v1", "wids_version": 1, **top, "shardlist": shardlist}, f)
    return path


def by_name(snapshot):
    return {os.path.basename(s.url): s for s in snapshot.shards}


def warnings_about(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# ---- a directory's own manifest: bad entries are ignored, the files are indexed ------------


def test_directory_manifest_entry_without_filesize_never_drops_samples(shard_dir):
    write_shard(shard_dir, "a.tar", 3)
    write_manifest(os.path.join(shard_dir, "manifest.json"), [{"url": "a.tar", "nsamples": 1}])
    # verify="off" trusted such an entry blindly: 2 of the 3 samples were silently never read
    ds = wr.RefreshingWebDataset(shard_dir, verify="off", watch=False, shardshuffle=False)
    assert by_name(ds.set_epoch(0))["a.tar"].nsamples == 3
    assert [s["__key__"] for s in ds] == [f"a/{i:06d}" for i in range(3)]


BAD_ENTRIES = {
    "negative count": ({"nsamples": -4}, "nsamples: expected a non-negative integer, got -4"),
    "absurd count": ({"nsamples": 10**12}, "nsamples: 1000000000000 samples cannot fit in 10240 bytes"),
    "count as string": ({"nsamples": "12"}, "nsamples: expected a non-negative integer, got '12'"),
    "count as bool": ({"nsamples": True}, "nsamples: expected a non-negative integer, got True"),
    "negative size": ({"filesize": -1}, "filesize: expected a non-negative integer, got -1"),
    "mtime as float": ({"mtime_ns": 1.5e18}, "mtime_ns: expected an integer (nanoseconds), got 1.5e+18"),
    "digest not hex": ({"digest": "xxh3_128:" + "zz" * 16}, "digest: expected 32 hex digits after 'xxh3_128:'"),
    "digest too short": ({"digest": "xxh3_128:abcd"}, "digest: expected 32 hex digits after 'xxh3_128:'"),
    "digest unknown algo": ({"digest": "crc32:00000000"}, "digest: unsupported digest algorithm 'crc32'"),
    "digest without algo": ({"digest": "ab" * 16}, "digest: expected 'algo:hex'"),
    "blocks not hex": ({"blocks": "zz" * 8}, "blocks: expected hex digits, 16 per block"),
    "blocks cut": ({"blocks": "ab" * 7 + "a"}, "blocks: expected hex digits, 16 per block"),
    "blocks for another size": ({"blocks": "ab" * 16}, "blocks: 2 block digests for 10240 bytes, expected 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_bad_directory_manifest_entry_is_ignored_with_a_warning_and_the_file_indexed(shard_dir, caplog, case):
    fields, problem = BAD_ENTRIES[case]
    write_shard(shard_dir, "a.tar", 3)
    write_shard(shard_dir, "b.tar", 4)
    path = write_manifest(os.path.join(shard_dir, "manifest.json"), [
        entry_json(shard_dir, "a.tar", **fields),
        entry_json(shard_dir, "b.tar", nsamples=2),  # a count only the manifest says: proof it is still used
    ])
    # reading b.tar then meets 4 samples where its entry counts 2: a CountMismatch, for the handler
    ds = wr.RefreshingWebDataset(shard_dir, watch=False, shardshuffle=False, handler=warn_and_continue)
    shards = by_name(ds.set_epoch(0))
    assert (shards["a.tar"].nsamples, shards["b.tar"].nsamples) == (3, 2)
    assert [s["__key__"] for s in ds if s["__key__"].startswith("a/")] == [f"a/{i:06d}" for i in range(3)]
    [warning] = warnings_about(caplog, "shardlist[0]")
    assert warning.startswith(f"{path}: shardlist[0] ('a.tar'): {problem}")


@pytest.mark.parametrize("url", ["../escape.tar", "sub/../../escape.tar", "/abs/a.tar", "https://host/a.tar", ""])
def test_directory_manifest_urls_must_stay_inside_the_directory(tmp_path, caplog, url):
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(str(root), "a.tar", 3)
    write_shard(str(tmp_path), "escape.tar", 5)
    path = write_manifest(str(root / "manifest.json"), [{"url": url, "nsamples": 1, "filesize": 10240}])
    assert by_name(wr.RefreshingWebDataset(str(root), watch=False).set_epoch(0))["a.tar"].nsamples == 3
    [warning] = warnings_about(caplog, "shardlist[0]")
    where = f"shardlist[0] ({url!r})" if url else "shardlist[0]"
    expected = "url: expected a non-empty string" if not url else "url: expected a relative path inside the manifest's directory"
    assert warning.startswith(f"{path}: {where}: {expected}")


def test_file_listed_twice_in_directory_manifest_uses_neither_entry(shard_dir, caplog):
    write_shard(shard_dir, "a.tar", 3)
    path = write_manifest(os.path.join(shard_dir, "manifest.json"), [
        entry_json(shard_dir, "a.tar"), entry_json(shard_dir, "./a.tar", url="./a.tar", nsamples=1)])
    ds = wr.RefreshingWebDataset(shard_dir, watch=False, shardshuffle=False)
    assert by_name(ds.set_epoch(0))["a.tar"].nsamples == 3
    assert len(list(ds)) == 3
    [warning] = warnings_about(caplog, "shardlist[1]")
    assert warning.startswith(f"{path}: shardlist[1] ('./a.tar'): url: names the same file as shardlist[0]")


def test_bad_entry_is_warned_about_once_per_manifest_version(shard_dir, caplog):
    write_shard(shard_dir, "a.tar", 3)
    path = os.path.join(shard_dir, "manifest.json")
    write_manifest(path, [entry_json(shard_dir, "a.tar", nsamples=-4)])
    ds = wr.RefreshingWebDataset(shard_dir, watch=False)
    for epoch in range(3):
        assert ds.set_epoch(epoch).nsamples == 3
    assert len(warnings_about(caplog, "nsamples: expected")) == 1
    write_manifest(path, [entry_json(shard_dir, "a.tar", nsamples=-5)], name="a new version of the file")
    ds.set_epoch(3)
    assert len(warnings_about(caplog, "nsamples: expected")) == 2


# ---- a manifest given as the source: bad entries raise ---------------------------------------


def test_manifest_source_raises_naming_manifest_entry_and_field(shard_dir):
    for i in range(4):
        write_shard(shard_dir, f"shard-{i:06d}.tar", 2)
    entries = [entry_json(shard_dir, f"shard-{i:06d}.tar") for i in range(4)]
    entries[3]["nsamples"] = "12"
    path = write_manifest(os.path.join(shard_dir, "index.json"), entries)
    with pytest.raises(ManifestError) as info:
        wr.RefreshingWebDataset(path).set_epoch(0)
    assert str(info.value) == f"{path}: shardlist[3] ('shard-000003.tar'): nsamples: expected a non-negative integer, got '12'"


def test_manifest_source_listing_a_file_twice_raises_instead_of_yielding_it_twice(shard_dir):
    write_shard(shard_dir, "a.tar", 3)
    path = write_manifest(os.path.join(shard_dir, "index.json"), [
        {"url": "a.tar", "nsamples": 3}, {"url": os.path.join(shard_dir, "a.tar"), "nsamples": 3}])
    with pytest.raises(ManifestError, match=r"shardlist\[1\] .*: url: names the same file as shardlist\[0\]"):
        wr.RefreshingWebDataset(path).set_epoch(0)


def test_manifest_source_may_list_absolute_paths_and_urls(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_shard(str(elsewhere), "a.tar", 3)
    path = write_manifest(str(tmp_path / "index.json"), [
        {"url": str(elsewhere / "a.tar"), "nsamples": 3}, {"url": "https://host/b.tar", "nsamples": 2}])
    assert [e.url for e in manifest.load(path)] == [str(elsewhere / "a.tar"), "https://host/b.tar"]
    entries, errors = manifest.read(path, contained=True)  # what a directory's own manifest may not list
    assert entries == [] and [str(e).split(": ", 1)[1].split(" inside")[0] for e in errors] == [
        f"shardlist[0] ({str(elsewhere / 'a.tar')!r}): url: expected a relative path",
        "shardlist[1] ('https://host/b.tar'): url: expected a relative path"]


# ---- an entry applies only to the file version it describes ---------------------------------


def test_entry_for_a_file_replaced_by_one_of_same_size_and_other_mtime_is_not_used(shard_dir):
    path = write_shard(shard_dir, "a.tar", 3, prefix="old")
    write_manifest(os.path.join(shard_dir, "manifest.json"), [entry_json(shard_dir, "a.tar")])
    old = os.stat(path)
    write_shard(shard_dir, "a.tar", 3, prefix="new")  # same names and sizes, other bytes
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    assert os.path.getsize(path) == old.st_size
    ds = wr.RefreshingWebDataset(shard_dir, watch=False, shardshuffle=False, on_change="raise")
    assert by_name(ds.set_epoch(0))["a.tar"].digest == index_shard(path).digest
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"new/{i:06d}" for i in range(3)]
    assert all(s["bin"].startswith(b"new:") for s in samples)


def test_entry_still_applies_to_a_copy_that_keeps_size_and_mtime(tmp_path, shard_dir):
    write_shard(shard_dir, "a.tar", 3)
    write_manifest(os.path.join(shard_dir, "manifest.json"), [entry_json(shard_dir, "a.tar", nsamples=2)])
    copy = str(tmp_path / "copy")
    shutil.copytree(shard_dir, copy)  # copy2 keeps mtime_ns, as cp -p and rsync -t do
    assert by_name(wr.RefreshingWebDataset(copy, watch=False).set_epoch(0))["a.tar"].nsamples == 2


def test_mtime_ns_round_trips_through_save_and_load(tmp_path):
    path = str(tmp_path / "manifest.json")
    entry = manifest.ManifestEntry("a.tar", 3, 10240, "xxh3_128:" + "0" * 32, b"\1" * 8, 1700000000123456789)
    manifest.save(path, [entry])
    assert json.load(open(path))["shardlist"][0]["mtime_ns"] == 1700000000123456789
    assert manifest.load(path) == [entry]


# ---- the manifest format carries a version --------------------------------------------------


def test_saved_manifest_carries_its_format_version(tmp_path):
    path = str(tmp_path / "manifest.json")
    manifest.save(path, [manifest.ManifestEntry("a.tar", 1)])
    assert json.load(open(path))["wdsrefresh_version"] == manifest.VERSION == 1


def test_manifest_without_version_is_read_and_newer_version_refused(tmp_path):
    path = str(tmp_path / "manifest.json")
    write_manifest(path, [{"url": "a.tar", "nsamples": 1}])  # plain wids, or written before versions
    assert manifest.load(path) == [manifest.ManifestEntry("a.tar", 1)]
    write_manifest(path, [{"url": "a.tar", "nsamples": 1}], wdsrefresh_version=2)
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    assert str(info.value).startswith(f"{path}: written in manifest format version 2 by a newer wdsrefresh; "
                                      "this wdsrefresh reads versions up to 1")
    write_manifest(path, [], wdsrefresh_version="1")
    with pytest.raises(ManifestError, match="wdsrefresh_version: expected a positive integer, got '1'"):
        manifest.load(path)


def test_directory_manifest_of_a_newer_version_is_ignored_and_the_shards_indexed(shard_dir, caplog):
    write_shard(shard_dir, "a.tar", 3)
    write_manifest(os.path.join(shard_dir, "manifest.json"), [entry_json(shard_dir, "a.tar", nsamples=2)],
                   wdsrefresh_version=2)
    assert by_name(wr.RefreshingWebDataset(shard_dir, watch=False).set_epoch(0))["a.tar"].nsamples == 3
    assert warnings_about(caplog, "manifest format version 2")


# ---- wdsrefresh index ------------------------------------------------------------------------


def packed(tmp_path, nfiles=8, maxcount=3):
    from wdsrefresh.write.pack import pack_entries

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(nfiles):
        (raw / f"k{i}.txt").write_bytes(b"x" * (10 + i))
        (raw / f"k{i}.cls").write_bytes(str(i).encode())
    out = str(tmp_path / "out")
    pack_entries([str(raw)], out, maxcount=maxcount)
    return out


def test_index_rebuilds_the_manifest_pack_wrote(tmp_path, capsys):
    out = packed(tmp_path)
    path = os.path.join(out, "manifest.json")
    written = manifest.load(path)
    os.unlink(path)
    assert cli.main(["index", out]) == 0
    assert "indexed 3 shards (8 samples)" in capsys.readouterr().out
    rebuilt = manifest.load(path)
    for e in rebuilt:
        assert e.mtime_ns == os.stat(os.path.join(out, e.url)).st_mtime_ns
    without_mtime = sorted((e.url, e.nsamples, e.filesize, e.digest, e.blocks) for e in rebuilt)
    assert without_mtime == sorted((e.url, e.nsamples, e.filesize, e.digest, e.blocks) for e in written)
    assert json.load(open(path))["wdsrefresh_version"] == manifest.VERSION


def test_index_leaves_out_corrupt_and_incomplete_shards_and_exits_1(tmp_path, capsys, caplog):
    out = packed(tmp_path)
    with open(os.path.join(out, "bad.tar"), "wb") as f:
        f.write(b"this is not a tar file at all" * 40)
    whole = open(os.path.join(out, "shard-000000.tar"), "rb").read()
    with open(os.path.join(out, "cut.tar"), "wb") as f:
        f.write(whole[:1536])  # first header and data only: no end-of-archive marker
    assert cli.main(["index", out]) == 1
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line for line in printed.splitlines() if line.split() and line.split()[0].endswith(".tar")}
    assert "not a readable tar" in lines["bad.tar"] and "incomplete" in lines["cut.tar"]
    assert "left out 2 shards" in printed
    urls = [e.url for e in manifest.load(os.path.join(out, "manifest.json"))]
    assert urls == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert warnings_about(caplog, "bad.tar") and warnings_about(caplog, "cut.tar")


def test_index_of_a_directory_without_shards_fails_and_writes_nothing(tmp_path, capsys):
    assert cli.main(["index", str(tmp_path)]) == 1
    assert "no shard files" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "manifest.json")


def test_pack_and_ingest_record_each_shards_mtime_so_a_same_size_replacement_is_not_trusted(tmp_path):
    from wdsrefresh.write.ingest import IngestConfig, Ingester
    from wdsrefresh.write.pack import pack_entries

    raw, out = tmp_path / "raw", str(tmp_path / "out")
    raw.mkdir()
    for i in range(4):
        (raw / f"k{i}.txt").write_bytes(b"x" * 10)
    pack_entries([str(raw)], out, maxcount=2)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "z.txt").write_bytes(b"y" * 10)
    (inbox / "z.done").write_bytes(b"")
    with Ingester(IngestConfig(str(inbox), out, settle=0.1)) as ingester:
        ingester.run_once()
    entries = manifest.load(os.path.join(out, "manifest.json"))
    assert len(entries) == 3
    for e in entries:
        assert e.mtime_ns == os.stat(os.path.join(out, e.url)).st_mtime_ns

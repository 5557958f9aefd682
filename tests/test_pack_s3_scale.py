"""Packing at scale into an object store (moto's S3 server on 127.0.0.1): array tasks and Ray write the
objects and manifest entries of one `--jobs 1` pack; --shuffle, --label-from-dir, duplicate-key refusal
and wr.Writer work on `s3://` as on a directory, their records kept as objects in the prefix."""

from __future__ import annotations

import collections
import gzip
import json
import os
import subprocess
import sys

import pytest

import wdsrefresh as wr
from s3fixtures import moto_server, s3
from test_pack_options import class_tree, files_again, write_made_samples
from test_pack_s3 import get_json, keys, read_keys, shard_keys
from wdsrefresh.write.pack import DuplicateKeysError, PackError

FIXTURES = (moto_server, s3)  # pytest finds fixtures among the module's names
CLI = [sys.executable, "-m", "wdsrefresh.cli"]
OPTIONS = ["--maxcount", "3", "--shuffle", "5", "--label-from-dir"]


def object_bytes(bucket, key):
    return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()


def packed(bucket, prefix):
    """What a pack left under ``prefix``: shard bytes, classes.json, the manifest's entries less
    timestamps, and the names of the key records."""
    entries = [{k: v for k, v in e.items() if k != "mtime_ns"}
               for e in get_json(bucket, prefix + "manifest.json")["shardlist"]]
    shards = {name: object_bytes(bucket, prefix + name) for name in shard_keys(bucket, prefix)}
    records = sorted(k for k in keys(bucket, prefix) if k.startswith(".wdsrefresh/keys/"))
    return shards, object_bytes(bucket, prefix + "classes.json"), entries, records


def without_endpoint():
    """The environment of a subprocess that reaches the store only through --storage-option."""
    env = dict(os.environ)
    env.pop("AWS_ENDPOINT_URL", None)
    return env


def run(args, timeout=180):
    r = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, env=without_endpoint())
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def src(tmp_path):
    return class_tree(tmp_path / "src", per_class=3)  # 4 classes x 3 images: 4 shards of 3


def test_array_tasks_out_of_order_to_s3_write_the_objects_and_entries_of_one_jobs_1_pack(s3, src):
    assert wr.pack([src], s3.url("ref/"), maxcount=3, shuffle=5, label_from_dir=True).nsamples == 12
    reference = packed(s3, "ref/")
    option = ["--storage-option", f"endpoint_url={s3.endpoint}"]
    array = ["pack", src, "-o", s3.url("out/"), *OPTIONS, "--tasks", "2", *option]
    first = run(array + ["--task-index", "1", "--jobs", "2"])  # two spawned workers, options pickled to them
    assert "(task 1 of 2)" in first.stdout and "2 shards of the pack left to other tasks" in first.stdout
    assert shard_keys(s3, "out/") == ["shard-000001.tar", "shard-000003.tar"]
    assert "manifest.json" not in keys(s3, "out/")
    last = run(array + ["--task-index", "0"])
    assert "left to other tasks" not in last.stdout
    assert packed(s3, "out/") == reference
    assert not [k for k in keys(s3, "out/") if k.startswith("manifest.d/") or "plans/plan-" in k]
    assert read_keys(s3.url("out/")) == collections.Counter(read_keys(s3.url("ref/")))
    assert "SUPERSECRET" not in first.stderr + last.stderr


@pytest.mark.xdist_group("ray")  # one local Ray cluster at a time on this machine
def test_engine_ray_to_s3_writes_the_objects_of_engine_local(s3, src):
    import ray  # noqa: F401  (never skipped: ray is in the test extra)

    wr.pack([src], s3.url("ref/"), maxcount=3, shuffle=5, label_from_dir=True)
    r = run(["pack", src, "-o", s3.url("out/"), *OPTIONS, "--engine", "ray", "--jobs", "2",
             "--storage-option", f"endpoint_url={s3.endpoint}"], timeout=300)
    assert r.stdout.startswith("packed 12 samples into 4 shards in s3://")
    assert packed(s3, "out/") == packed(s3, "ref/")


def test_labels_and_duplicate_keys_on_s3_are_kept_as_objects_in_the_prefix(s3, src, tmp_path):
    url = s3.url("out/")
    wr.pack([src], url, maxcount=10, label_from_dir=True)
    doc = get_json(s3, "out/classes.json")
    assert doc["classes"] == ["Bee", "ant", "cat", "zebra"]
    samples = list(wr.RefreshingWebDataset(url, shardshuffle=False, watch=False))
    assert all(int(s["cls"]) == doc["classes"].index(s["__key__"].split("/")[0]) for s in samples)
    records = [k for k in keys(s3, "out/") if k.startswith(".wdsrefresh/keys/plan-")]
    assert len(records) == 1
    assert len(json.loads(gzip.decompress(object_bytes(s3, "out/" + records[0])))["tasks"]) == 2
    before = keys(s3, "out/")

    with pytest.raises(DuplicateKeysError, match=r"12 of the keys .* in its shards already, e\.g\. 'Bee/deep/img000' "
                                                 r"\(in shard-000000\.tar\)"):
        wr.pack([src], url, maxcount=5, label_from_dir=True)
    assert keys(s3, "out/") == before  # nothing written
    other = class_tree(tmp_path / "other", classes=("cat", "dog"), per_class=1, stem="other")
    with pytest.raises(PackError, match=r"classes\.json numbers 4 classes and lacks 1 .*'dog'"):
        wr.pack([other], url, label_from_dir=True)

    s3.put_shard("out/foreign-000000.tar", 3)  # another tool's shard: no key record, its headers are streamed
    write_made_samples(url)
    dup = files_again(tmp_path / "dup", "foreign-000000/000001.bin", "made/2.txt")
    with pytest.raises(DuplicateKeysError, match=r"2 of the keys .*'foreign-000000/000001' \(in foreign-000000\.tar\)"
                                                 r", 'made/2' \(in shard-000003\.tar\)"):
        wr.pack([dup], url)
    assert ".wdsrefresh/keys/shard-foreign-000000.tar.json.gz" in keys(s3, "out/")  # read once, recorded
    assert [e.url for e in wr.pack([dup], url, allow_duplicate_keys=True).entries] == ["shard-000004.tar"]


def test_writer_to_s3_publishes_whole_shards_listed_in_the_manifest(s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"endpoint_url": s3.endpoint}
    with wr.Writer(s3.url("w/"), maxcount=2, storage_options=options) as w:
        for i in range(5):
            w.write({"__key__": f"{i:04d}", "txt": f"sample {i}", "cls": i % 2})
            if i == 2:  # the first shard is published and listed (by its fragment) before close
                assert shard_keys(s3, "w/") == ["shard-000000.tar"]
                assert [k for k in keys(s3, "w/") if k.startswith("manifest.d/")]
    assert [e.url for e in w.published] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [e["url"] for e in get_json(s3, "w/manifest.json")["shardlist"]] == shard_keys(s3, "w/")
    assert not [k for k in keys(s3, "w/") if k.startswith("manifest.d/")]
    source = wr.make_source(s3.url("w/"), storage_options=options)
    samples = list(wr.RefreshingWebDataset(source, shardshuffle=False, watch=False))
    assert [(s["__key__"], s["txt"], s["cls"]) for s in samples] == \
        [(f"{i:04d}", f"sample {i}".encode(), str(i % 2).encode()) for i in range(5)]

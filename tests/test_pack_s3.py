"""pack, ingest, verify and ls into an object store (moto's S3 server on 127.0.0.1).

A reader listing the prefix at any moment sees only complete shards; manifest entries carry
size and ETag, so readers take counts and digests from them; kill -9 at any moment publishes
nothing partial and a rerun packs every input exactly once.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading

import pytest

import wdsrefresh as wr
from conftest import wait_for
from s3fixtures import fault_proxy, moto_server, s3, shard_bytes
from test_pack_crash import make_inputs
from wdsrefresh.cli import main
from wdsrefresh.storage.objects.blocks import index_object
from wdsrefresh.storage.objects.source import ObjectSource
from wdsrefresh.storage.objects.s3 import ObjectChangedError, Store
from wdsrefresh.write.destination import S3Destination
from wdsrefresh.write.ingest import IngestConfig, Ingester
from wdsrefresh.write.pack import PackError, collect, open_plan, pack_entries, plan_shards, run_task

FIXTURES = (fault_proxy, moto_server, s3)  # pytest finds fixtures among the module's names
CLI = [sys.executable, "-m", "wdsrefresh.cli"]
MiB = 1 << 20


def keys(bucket, prefix="out/"):
    """The keys of the objects under ``prefix``, relative to it."""
    pages = bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", ()))


def shard_keys(bucket, prefix="out/"):
    return [k for k in keys(bucket, prefix) if k.endswith(".tar") and "/" not in k]


def get_json(bucket, key):
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())


def samples_of(bucket, key):
    """The sample keys of one object, read whole (a test's own reading, not the library's)."""
    data = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # raises on a torn or truncated tar
        return [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".cls")]


def read_keys(url, storage_options=None):
    source = wr.make_source(url, storage_options=storage_options)
    ds = wr.RefreshingWebDataset(source, shardshuffle=False, watch=False)
    ds.set_epoch(0)
    return collections.Counter(s["__key__"] for s in ds)


def leftovers(bucket, prefix="out/"):
    """Fragments, unfinished plans and unfinished multipart uploads under the prefix."""
    found = [k for k in keys(bucket, prefix) if k.startswith("manifest.d/") or "plans/plan-" in k]  # not keys/plan-*: kept
    uploads = bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix=prefix).get("Uploads", [])
    return found + [u["Key"] for u in uploads]


def assert_packed_exactly_once(bucket, expected, prefix="out/"):
    counts = collections.Counter(k for name in shard_keys(bucket, prefix) for k in samples_of(bucket, prefix + name))
    assert set(counts) == expected and set(counts.values()) == {1}, counts
    manifest = get_json(bucket, prefix + "manifest.json")["shardlist"]
    assert sorted(e["url"] for e in manifest) == shard_keys(bucket, prefix)  # every shard listed, once
    for e in manifest:
        head = bucket.client.head_object(Bucket=bucket.name, Key=prefix + e["url"])
        assert (e["filesize"], e["etag"]) == (head["ContentLength"], head["ETag"])
    assert leftovers(bucket, prefix) == []


@pytest.fixture
def src(tmp_path):
    path = str(tmp_path / "src")
    return path, make_inputs(path, 12, 20_000)


# ---------------------------------------------------------------------------- pack


def test_pack_to_s3_publishes_shards_with_size_and_etag_and_readers_read_exactly_the_samples(s3, src, capsys):
    path, expected = src
    assert main(["pack", path, "-o", s3.url("out/"), "--maxcount", "5", "--jobs", "2"]) == 0
    assert "packed 12 samples into 3 shards in s3://" in capsys.readouterr().out
    assert shard_keys(s3) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert_packed_exactly_once(s3, expected)
    assert read_keys(s3.url("out/")) == collections.Counter(expected)
    assert main(["pack", path, "-o", s3.url("out/"), "--maxcount", "5"]) == 0  # the same pack: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert len(shard_keys(s3)) == 3


def test_a_second_pack_into_the_prefix_numbers_after_the_first(s3, src, tmp_path):
    path, expected = src
    other = str(tmp_path / "other")
    more = {f"x/{k}" for k in make_inputs(os.path.join(other, "x"), 3, 100, seed=1)}
    pack_entries([path], s3.url("out/"), maxcount=5)
    entries = pack_entries([other], s3.url("out"), maxcount=2)  # no trailing '/': the same prefix
    assert [e.url for e in entries] == ["shard-000003.tar", "shard-000004.tar"]
    assert_packed_exactly_once(s3, expected | more)


def test_readers_take_counts_and_digests_from_fragments_and_manifest_without_reading_objects(
        s3, src, fault_proxy):
    path, expected = src
    url = s3.url("out/")
    samples = collect([path])
    groups = plan_shards(samples, 5, 10**9)
    with open_plan(url, [path], groups, "shard", 5, 10**9) as plan:
        for task in plan.tasks:
            run_task(plan.out, plan.hash, task)  # published with fragments, not committed
    assert "manifest.json" not in keys(s3) and len([k for k in keys(s3) if k.startswith("manifest.d/")]) == 3
    options = {"endpoint_url": fault_proxy.url}
    source = ObjectSource(url, storage_options=options)
    infos = [c.info for c in source.candidates()]
    assert [i.nsamples for i in infos] == [5, 5, 2] and all(i.digest and i.blocks for i in infos)
    assert not [r for r in fault_proxy.requests("GET") if r.range]  # no object was read to index it
    pack_entries([path], url, maxcount=5)  # the same plan: committed now
    assert "manifest.d" not in " ".join(keys(s3))
    fault_proxy.clear()
    source = ObjectSource(url, storage_options=options)
    assert [c.info.nsamples for c in source.candidates()] == [5, 5, 2]
    assert not [r for r in fault_proxy.requests("GET") if r.range]
    assert not fault_proxy.requests("GET", "manifest.d")  # every object described by manifest.json
    assert read_keys(url, storage_options=options) == collections.Counter(expected)


def test_rerun_aborts_the_multipart_uploads_a_killed_run_left_and_its_temporaries(s3, src, tmp_path, monkeypatch):
    path, expected = src
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    groups = plan_shards(collect([path]), 5, 10**9)
    with open_plan(s3.url("out/"), [path], groups, "shard", 5, 10**9) as plan:
        run_task(plan.out, plan.hash, plan.tasks[0])
        s3.client.create_multipart_upload(Bucket=s3.name, Key="out/" + plan.tasks[1].shard)  # a killed upload
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        tmp = plan.dest.temporary(plan.hash, 2).rsplit(".", 3)[0] + f".{dead}.tar.tmp"
        open(tmp, "wb").close()  # a killed task's local temporary
    assert leftovers(s3) != []
    assert pack_entries([path], s3.url("out/"), maxcount=5)[0].url == "shard-000000.tar"
    assert_packed_exactly_once(s3, expected)
    assert os.listdir(tmp_path / "tmp") == []


def test_shard_above_the_threshold_is_uploaded_in_parts_and_read_back(s3, tmp_path):
    path = str(tmp_path / "big")
    os.makedirs(path)
    with open(os.path.join(path, "a.bin"), "wb") as f:
        f.write(random.Random(0).randbytes(12 * MiB))
    dest = S3Destination(s3.url("out/"), multipart_threshold=5 * MiB, part_size=5 * MiB)
    [entry] = pack_entries([path], dest)
    assert entry.etag.strip('"').endswith("-3")  # three parts: an ETag that is no MD5
    assert main(["verify", s3.url("out/")]) == 0
    [sample] = wr.RefreshingWebDataset(s3.url("out/"), shardshuffle=False, watch=False)
    assert sample["__key__"] == "a" and len(sample["bin"]) == 12 * MiB


def test_publishing_never_replaces_an_object_and_a_stale_counter_write_is_refused(s3, tmp_path):
    dest = S3Destination(s3.url("out/"))
    s3.put("out/shard-000000.tar", shard_bytes("x", 2))
    before = s3.client.head_object(Bucket=s3.name, Key="out/shard-000000.tar")["ETag"]
    tmp = str(tmp_path / "t.tar")
    with open(tmp, "wb") as f:
        f.write(shard_bytes("y", 3))
    from wdsrefresh.format.manifest import ManifestEntry

    assert dest.publish(tmp, ManifestEntry("shard-000000.tar", 3, os.path.getsize(tmp))) is None
    assert s3.client.head_object(Bucket=s3.name, Key="out/shard-000000.tar")["ETag"] == before
    assert not os.path.exists(tmp)
    assert dest.reserve_names("shard", 2) == ["shard-000001.tar", "shard-000002.tar"]  # after the object there
    stale = s3.client.head_object(Bucket=s3.name, Key="out/.wdsrefresh/numbers.json")["ETag"]
    assert dest.reserve_names("shard", 1) == ["shard-000003.tar"]
    with pytest.raises(ObjectChangedError):  # what a writer that read the counter before that gets
        dest._put_json(".wdsrefresh/numbers.json", {"next": {"shard": 3}}, if_match=stale)


def test_a_pack_into_a_prefix_with_an_unfinished_pack_takes_numbers_after_its_reservation(s3, src, tmp_path):
    path, expected = src
    other = str(tmp_path / "other")
    more = {f"x/{k}" for k in make_inputs(os.path.join(other, "x"), 3, 100, seed=1)}
    groups = plan_shards(collect([path]), 1, 10**9)
    with open_plan(s3.url("out/"), [path], groups, "shard", 1, 10**9) as plan:
        run_task(plan.out, plan.hash, plan.tasks[0])  # then killed: 11 of its 12 names reserved, not used yet
    entries = pack_entries([other], s3.url("out/"), maxcount=1)
    assert [e.url for e in entries] == ["shard-000012.tar", "shard-000013.tar", "shard-000014.tar"]
    pack_entries([path], s3.url("out/"), maxcount=1)  # finishes the first pack under the names it reserved
    assert_packed_exactly_once(s3, expected | more)


def test_a_shard_under_a_reserved_name_is_kept_only_if_it_holds_the_planned_bytes(s3, src):
    path, expected = src
    groups = plan_shards(collect([path]), 5, 10**9)
    with open_plan(s3.url("out/"), [path], groups, "shard", 5, 10**9) as plan:
        run_task(plan.out, plan.hash, plan.tasks[1])
    key = "out/" + plan.tasks[1].shard
    planned = s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read()
    s3.delete(f"out/manifest.d/part-{plan.hash[:16]}-00001.json")  # the state a kill before the fragment leaves
    s3.put(key, shard_bytes("s", 5, size=3000))  # and something else under the name: 5 samples too
    with pytest.raises(PackError, match="shard-000001.tar: reserved for 5 samples .* holds something else"):
        pack_entries([path], s3.url("out/"), maxcount=5)
    s3.put(key, planned)
    pack_entries([path], s3.url("out/"), maxcount=5)
    assert_packed_exactly_once(s3, expected)


# ---------------------------------------------------------------------------- kill -9


def check_consistent(bucket):
    """What a reader may see after a kill: every shard object a complete tar, every fragment's
    entry the exact description of its object."""
    store = Store()
    for name in shard_keys(bucket):
        stat = store.head(bucket.url(f"out/{name}"))
        assert index_object(store, stat).complete, name
    for key in [k for k in keys(bucket) if k.startswith("manifest.d/")]:
        for e in get_json(bucket, f"out/{key}")["shardlist"]:
            head = bucket.client.head_object(Bucket=bucket.name, Key=f"out/{e['url']}")
            assert (e["filesize"], e["etag"]) == (head["ContentLength"], head["ETag"])


def progress(bucket):
    found = keys(bucket)
    return (len([k for k in found if k.endswith(".tar")]), len([k for k in found if k.startswith("manifest.d/")]),
            "manifest.json" in found)


@pytest.mark.parametrize("seed", [1, 2, "commit"])
def test_kill_9_at_random_moments_then_rerun_packs_every_input_once(s3, tmp_path, procs, seed, monkeypatch):
    path = str(tmp_path / "src")
    expected = make_inputs(path, 16, 6 * MiB // 16)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the pack's local temporaries: checked below
    os.makedirs(tmp_path / "tmp")
    rng = random.Random(seed)
    command = CLI + ["pack", path, "-o", s3.url("out/"), "--maxcount", "1"]
    interrupted = 0
    for _ in range(1 if seed == "commit" else 3):
        before = progress(s3)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        if seed == "commit":  # right after the manifest landed, before the fragments and plan go
            wait_for(lambda: progress(s3)[2] or proc.poll() is not None, 60, "the manifest")
        elif rng.random() < 0.8:
            wait_for(lambda: progress(s3) != before or proc.poll() is not None, 60, "progress")
            threading.Event().wait(rng.uniform(0, 0.3))
        else:
            threading.Event().wait(rng.uniform(0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        interrupted += any("/plan-" in k for k in keys(s3))
        check_consistent(s3)
    assert interrupted, "every run finished before it was killed"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert_packed_exactly_once(s3, expected)
    assert os.listdir(tmp_path / "tmp") == []  # the killed runs' temporaries were swept
    assert read_keys(s3.url("out/")) == collections.Counter(expected)


# ---------------------------------------------------------------------------- ingest


def drop(inbox, n, start=0, size=1000):
    names = set()
    for i in range(start, start + n):
        for ext, data in (("bin", os.urandom(size)), ("cls", b"%d" % i)):
            with open(os.path.join(inbox, f"k{i:03d}.{ext}"), "wb") as f:
                f.write(data)
        open(os.path.join(inbox, f"k{i:03d}.done"), "w").close()
        names.add(f"k{i:03d}")
    return names


def test_ingest_to_s3_uploads_then_removes_inputs_and_compacts_the_manifest(s3, tmp_path, capsys):
    inbox = str(tmp_path / "inbox")
    os.makedirs(inbox)
    expected = drop(inbox, 7)
    assert main(["ingest", inbox, "-o", s3.url("out/"), "--once", "--maxcount", "3", "--settle", "0.1"]) == 0
    assert capsys.readouterr().out.count("published s3://") == 3
    assert [n for n in os.listdir(inbox) if not n.startswith(".")] == []  # inputs removed, markers too
    assert_packed_exactly_once(s3, expected)
    assert os.listdir(os.path.join(inbox, ".wdsrefresh", os.listdir(os.path.join(inbox, ".wdsrefresh"))[0])) == []
    expected |= drop(inbox, 2, start=7)
    assert main(["ingest", inbox, "-o", s3.url("out/"), "--once", "--settle", "0.1"]) == 0
    assert_packed_exactly_once(s3, expected)
    assert shard_keys(s3)[-1] == "shard-000003.tar"


def test_ingest_to_s3_killed_at_random_moments_then_restarted_ingests_every_input_once(s3, tmp_path, procs):
    inbox, journal = str(tmp_path / "inbox"), str(tmp_path / "journal")
    os.makedirs(inbox)
    expected = drop(inbox, 24, size=200_000)
    command = CLI + ["ingest", inbox, "-o", s3.url("out/"), "--once", "--maxcount", "1", "--settle", "0.1",
                     "--journal-dir", journal]
    rng = random.Random(5)
    for _ in range(2):
        before = shard_keys(s3)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_for(lambda: shard_keys(s3) != before or proc.poll() is not None, 60, "a shard")
        threading.Event().wait(rng.uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        check_consistent(s3)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [n for n in os.listdir(inbox) if not n.startswith(".")] == []
    assert_packed_exactly_once(s3, expected)
    assert os.listdir(journal) == []


def test_ingest_python_api_takes_storage_options(s3, tmp_path, monkeypatch):
    inbox = str(tmp_path / "inbox")
    os.makedirs(inbox)
    expected = drop(inbox, 2)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = IngestConfig(inbox, s3.url("out/"), settle=0.1, storage_options={"endpoint_url": s3.endpoint})
    with Ingester(config) as ingester:
        ingester.run_once()
    assert_packed_exactly_once(s3, expected)


# ---------------------------------------------------------------------------- verify, ls, options


def test_verify_and_ls_take_s3_urls(s3, src, capsys):
    path, _ = src
    url = s3.url("out/")
    pack_entries([path], url, maxcount=5)
    assert main(["verify", url]) == 0
    assert "verified: 3 shards, 12 samples" in capsys.readouterr().out
    assert main(["ls", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SHARD", "SAMPLES", "BYTES", "DIGEST", "AGE"]
    sizes = {k: s3.client.head_object(Bucket=s3.name, Key=f"out/{k}")["ContentLength"] for k in shard_keys(s3)}
    assert [line.split()[:3] for line in lines[2:]] == [[k, n, str(sizes[k])] for k, n in
                                                       zip(sorted(sizes), ["5", "5", "2"])]
    s3.put("out/shard-000001.tar", shard_bytes("z", 5))  # replaced behind the manifest's back
    s3.put("out/extra.tar", shard_bytes("e", 1))
    assert main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar  etag" in out and "shard-000001.tar  digest" in out and "extra.tar" in out
    assert main(["verify", s3.url("out/shard-000000.tar")]) == 0  # one shard
    assert "verified: 1 shard, 5 samples" in capsys.readouterr().out


def test_storage_options_reach_the_store_and_values_are_never_printed(s3, src, monkeypatch, capsys):
    path, expected = src
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert main(["pack", path, "-o", s3.url("out/"), "--storage-option", f"endpoint_url={s3.endpoint}"]) == 0
    assert_packed_exactly_once(s3, expected)
    capsys.readouterr()
    assert main(["ls", s3.url("out/"), "--storage-option", "endpoint_url=http://127.0.0.1:9",
                 "--storage-option", "secret=SUPERSECRET-1", "--storage-option", "attempts=1"]) == 1
    assert main(["pack", path, "-o", s3.url("out/"), "--storage-option", "sekret=SUPERSECRET-2"]) == 1
    err = capsys.readouterr().err
    assert "ls: error: s3://" in err and "unknown option(s) sekret" in err
    assert main(["pack", path, "-o", "s3://no-such-bucket-here/x/", "--storage-option",
                 f"endpoint_url={s3.endpoint}"]) == 1
    assert "s3://no-such-bucket-here/x/: no such bucket (no-such-bucket-here); create it first" in \
        capsys.readouterr().err
    assert "SUPERSECRET" not in err


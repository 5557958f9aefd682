"""The persistent index cache: a restarted job reuses what it indexed, never for another file version."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from shardutil import write_shard

import wdsrefresh as wr
from wdsrefresh.storage.local.index_cache import IndexCache, default_directory
from wdsrefresh.core.options import Readiness
from wdsrefresh.storage.resolver import Resolver
from wdsrefresh.storage.backend import make_source
from wdsrefresh.storage.local.sources import DirectorySource


def _counts(directory: str, cache: str, watch: bool = False) -> dict[str, int]:
    with wr.RefreshingWebDataset(directory, index_cache=cache, watch=watch, state_dir=None) as ds:
        return {os.path.basename(s.url): s.nsamples for s in ds.set_epoch(0).shards}


def _cache_file(cache: str) -> str:
    root = os.path.join(cache, "index-v1")
    (name,) = [n for n in os.listdir(root) if n.endswith(".json")]
    return os.path.join(root, name)


def _edit_entries(cache: str, edit) -> None:
    path = _cache_file(cache)
    with open(path) as f:
        doc = json.load(f)
    edit(doc["entries"])
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("watch", [False, True])
def test_a_restart_takes_counts_and_digests_from_the_cache(shard_dir, tmp_path, watch):
    cache = str(tmp_path / "cache")
    write_shard(shard_dir, "a.tar", 5)
    write_shard(shard_dir, "b.tar", 7)
    assert _counts(shard_dir, cache, watch) == {"a.tar": 5, "b.tar": 7}

    def forge(entries):  # an entry for this very file version stands in for reading it
        entries["a.tar"][6] = 4
    _edit_entries(cache, forge)
    assert _counts(shard_dir, cache, watch) == {"a.tar": 4, "b.tar": 7}


def test_an_entry_never_serves_another_version_of_the_file(shard_dir, tmp_path):
    cache = str(tmp_path / "cache")
    write_shard(shard_dir, "a.tar", 5)
    _counts(shard_dir, cache)
    _edit_entries(cache, lambda entries: entries["a.tar"].__setitem__(6, 4))
    write_shard(shard_dir, "a.tar", 6)  # replaced by rename: another inode, size, ctime
    assert _counts(shard_dir, cache) == {"a.tar": 6}
    path = os.path.join(shard_dir, "a.tar")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, inode and mtime: the ctime moved
    _edit_entries(cache, lambda entries: entries["a.tar"].__setitem__(6, 1))
    assert _counts(shard_dir, cache) == {"a.tar": 6}


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage",
    b"[]",
    json.dumps({"format": "wdsrefresh-index-cache", "version": 1, "directory": "/elsewhere", "entries": {}}).encode(),
])
def test_an_unreadable_cache_file_is_a_miss(shard_dir, tmp_path, content):
    cache = str(tmp_path / "cache")
    write_shard(shard_dir, "a.tar", 5)
    _counts(shard_dir, cache)
    with open(_cache_file(cache), "wb") as f:
        f.write(content)
    assert _counts(shard_dir, cache) == {"a.tar": 5}
    assert _counts(shard_dir, cache) == {"a.tar": 5}  # and it was written again, whole


@pytest.mark.parametrize("field, value", [
    (0, "1"), (2, -1), (5, 0), (6, -3), (6, 10**9), (6, True), (7, "xxh3_128:zz"), (7, None), (8, "00"),
    (8, "zz" * 8), (8, 12),
])
def test_a_hostile_entry_is_a_miss(shard_dir, tmp_path, field, value):
    cache = str(tmp_path / "cache")
    write_shard(shard_dir, "a.tar", 5)
    _counts(shard_dir, cache)
    _edit_entries(cache, lambda entries: entries["a.tar"].__setitem__(field, value))
    assert _counts(shard_dir, cache) == {"a.tar": 5}


def test_an_entry_of_a_wrong_shape_is_a_miss(shard_dir, tmp_path):
    cache = str(tmp_path / "cache")
    write_shard(shard_dir, "a.tar", 5)
    _counts(shard_dir, cache)
    for bad in ([], [1, 2], {"a": 1}, "x", None, [0] * 9):
        _edit_entries(cache, lambda entries: entries.__setitem__("a.tar", bad))
        assert _counts(shard_dir, cache) == {"a.tar": 5}


def _fill(shard_dir: str, cache: str, name: str, started) -> None:
    """A job reading only ``name`` of the directory, indexing a new version of it again and again."""
    resolver = Resolver(make_source(os.path.join(shard_dir, name[0] + "*.tar")), Readiness(index_cache=cache,
                                                                                           settle=0))
    resolver.cache._entries(os.path.realpath(shard_dir))  # both jobs load the cache before either writes
    started.wait(timeout=60)
    for _ in range(20):
        os.utime(os.path.join(shard_dir, name))
        resolver.resolve(0)


def test_concurrent_jobs_keep_each_others_entries(shard_dir, tmp_path, procs):
    cache = str(tmp_path / "cache")
    write_shard(shard_dir, "x.tar", 3)
    write_shard(shard_dir, "y.tar", 4)
    context = multiprocessing.get_context("fork")
    started = context.Barrier(2)
    jobs = [context.Process(target=_fill, args=(shard_dir, cache, name, started)) for name in ("x.tar", "y.tar")]
    procs.extend(jobs)
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
        assert job.exitcode == 0
    with open(_cache_file(cache)) as f:
        entries = json.load(f)["entries"]
    assert sorted(entries) == ["x.tar", "y.tar"]


def test_the_cache_stays_under_its_limit(tmp_path):
    cache = str(tmp_path / "cache")
    dirs = []
    for i in range(4):
        d = str(tmp_path / f"d{i}")
        os.makedirs(d)
        write_shard(d, "a.tar", 3)
        dirs.append(d)
    index = IndexCache(cache, limit=1)  # room for none but the newest file... which is over it too
    sizes = []
    for d in dirs:
        resolver = Resolver(DirectorySource(d), Readiness(index_cache=cache))
        resolver.cache = index
        resolver.resolve(0)
        sizes.append(len(os.listdir(os.path.join(cache, "index-v1"))))
    assert sizes == [0, 0, 0, 0]  # every file is over a 1-byte limit: none is kept, nor its lock file


def test_the_default_directory_is_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_directory() == os.path.join(str(tmp_path), "wdsrefresh")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_directory() == os.path.join(os.path.expanduser("~"), ".cache", "wdsrefresh")


def test_index_cache_false_writes_nothing(shard_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    write_shard(shard_dir, "a.tar", 5)
    _counts(shard_dir, False)
    assert not os.path.exists(tmp_path / "home-cache")
    _counts(shard_dir, True)
    assert os.listdir(tmp_path / "home-cache" / "wdsrefresh" / "index-v1")

"""Objects published during an epoch are indexed in the background, so the next set_epoch
reads none of them: only the listing (moto on 127.0.0.1, requests seen by the fault proxy)."""

from __future__ import annotations

import gc
import threading

import pytest

import wdsrefresh as wr
from conftest import wait_for
from s3fixtures import fault_proxy, moto_server, s3  # noqa: F401 - fixtures
from test_s3 import expected_keys, keys_of, via
from wdsrefresh.storage.objects.ahead import THREAD_NAME


def ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def dataset(s3, proxy, interval: float):
    source = wr.make_source(s3.url("d/"), storage_options=via(s3, proxy, index_interval=interval))
    return source, wr.RefreshingWebDataset(source, shardshuffle=False)


def ranged_reads(proxy) -> set[str]:
    return {r.path for r in proxy.requests("GET") if r.range}


def test_objects_published_during_an_epoch_are_indexed_before_the_next_set_epoch(s3, fault_proxy):
    s3.put_shard("d/a.tar", 3)
    source, ds = dataset(s3, fault_proxy, interval=0.05)
    ds.set_epoch(0)
    s3.put_shard("d/b.tar", 4)
    s3.put_shard("d/c.tar", 2)
    s3.put_shard("d/_tmp.e.tar", 2)
    new = [s3.url("d/b.tar"), s3.url("d/c.tar")]
    wait_for(lambda: source.indexed_ahead == new, timeout=30, what="b.tar and c.tar indexed in the background")
    fault_proxy.clear()
    snapshot = ds.set_epoch(1)
    assert ranged_reads(fault_proxy) == set(), "set_epoch read objects the background had indexed"
    assert [(s.name, s.nsamples) for s in snapshot.shards] == [("a.tar", 3), ("b.tar", 4), ("c.tar", 2)]
    assert sorted(keys_of(ds)) == expected_keys(a=3, b=4, c=2)
    assert source.indexed_ahead == []


def test_an_object_replaced_after_it_was_indexed_ahead_joins_as_its_new_version(s3, fault_proxy):
    s3.put_shard("d/a.tar", 3)
    source, ds = dataset(s3, fault_proxy, interval=0.05)
    ds.set_epoch(0)
    s3.put_shard("d/b.tar", 4)
    wait_for(lambda: source.indexed_ahead == [s3.url("d/b.tar")], timeout=30, what="b.tar indexed in the background")
    source.ahead.stop(wait=30)  # no further pass: the replacement must be caught by set_epoch's own listing
    s3.put_shard("d/b.tar", 6, version="v2")
    snapshot = ds.set_epoch(1)
    assert [(s.name, s.nsamples) for s in snapshot.shards] == [("a.tar", 3), ("b.tar", 6)]
    samples = [s for s in ds if s["__key__"].startswith("b/")]
    assert len(samples) == 6 and {s["ver"] for s in samples} == {b"v2"}


def test_interval_zero_runs_no_thread_and_a_negative_one_is_refused(s3, fault_proxy):
    s3.put_shard("d/a.tar", 3)
    threads_before = set(ahead_threads())
    _, ds = dataset(s3, fault_proxy, interval=0)
    ds.set_epoch(0)
    assert set(ahead_threads()) - threads_before == set()  # (an earlier test's may have ended meanwhile)
    with pytest.raises(ValueError, match="index_interval"):
        dataset(s3, fault_proxy, interval=-1)


@pytest.mark.parametrize("how", ["dropped", "closed"])
def test_the_thread_ends_once_the_dataset_is_dropped_or_closed(s3, fault_proxy, how):
    s3.put_shard("d/a.tar", 3)
    threads_before = set(ahead_threads())
    source, ds = dataset(s3, fault_proxy, interval=0.05)
    ds.set_epoch(0)
    mine = set(ahead_threads()) - threads_before
    assert len(mine) == 1
    if how == "closed":
        ds.close()
    else:
        del source, ds
        gc.collect()
    wait_for(lambda: not any(t.is_alive() for t in mine), timeout=10, what="the background thread to end")

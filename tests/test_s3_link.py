"""Object reads across a shaped link (tools/netshaper.py in front of moto on 127.0.0.1): several
GETs of one consumer in flight, a connection cut in one of them, and the consumer's memory
budget, each counted at the proxy."""

from __future__ import annotations

import io
import tarfile

import pytest

import wdsrefresh as wr
from conftest import wait_for
from s3fixtures import link, moto_server, s3, shard_bytes  # noqa: F401 - fixtures
from wdsrefresh.format.digest import BLOCK_SIZE

MiB = 1 << 20


def options(shaper, **more) -> dict:
    return {"endpoint_url": shaper.url, "backoff": 0.01, "max_backoff": 0.05, **more}


def put_shards(bucket, names: str, n: int, size: int) -> dict[str, bytes]:
    shards = {name: shard_bytes(name, n, size, version="v1") for name in names}
    for name, data in shards.items():
        bucket.put(f"l/{name}.tar", data)
    return shards


def ranged(shaper) -> list:
    return [r for r in shaper.requests("GET") if r.range]


@pytest.mark.timeout(120)
def test_epoch_with_four_gets_in_flight_and_one_cut_yields_exactly_the_snapshot(s3, link):
    shards = put_shards(s3, "abcd", 5, 2 * MiB)  # 10 MiB each: three blocks
    ds = wr.RefreshingWebDataset(s3.url("l/"), shardshuffle=False, storage_options=options(link))
    snapshot = ds.set_epoch(0)
    link.set(conn_rate=8e6)  # half a second a block: GETs started together overlap at the proxy
    link.reset()
    cut = []

    def cut_the_third_get(method, path, headers, index) -> str | None:
        if "Range" in headers and not cut and len(ranged(link)) == 3:  # this request is the third GET
            cut.append(path)
            return "cut-body"
        return None

    link.fault = cut_the_third_get
    samples = list(ds)
    assert cut and ranged(link)[0].fault is None and ranged(link)[2].fault == "cut-body"
    assert link.peak["127.0.0.1"] >= 4  # one consumer (no DataLoader workers): its GETs, at once
    keys = sorted(s["__key__"] for s in samples)
    assert keys == sorted(f"{name}/{i:06d}" for name in shards for i in range(5))
    assert len(samples) == sum(shard.nsamples for shard in snapshot.shards)
    assert all(s["bin"].startswith(b"[v1]") for s in samples)


def sample_ends(data: bytes) -> dict[str, int]:
    """Each sample's key -> the byte offset in the object after its last member."""
    ends: dict[str, int] = {}
    for member in tarfile.open(fileobj=io.BytesIO(data)):
        ends[member.name.split(".")[0]] = member.offset_data + -(-member.size // 512) * 512
    return ends


@pytest.mark.timeout(120)
def test_bytes_sent_ahead_of_the_reader_stay_within_its_memory_budget(s3, link):
    budget = 2 * BLOCK_SIZE
    shards = put_shards(s3, "abc", 6, 2 * MiB)  # 12 MiB each
    ds = wr.RefreshingWebDataset(s3.url("l/"), shardshuffle=False,
                                 storage_options=options(link, memory_budget=budget))
    ds.set_epoch(0)
    link.reset()
    before = {name: sum(len(shards[n]) for n in sorted(shards) if n < name) for name in shards}
    ends = {key: before[name] + end for name, data in shards.items() for key, end in sample_ends(data).items()}
    ahead = []
    for sample in ds:
        wait_for(lambda: link.busy() == 0, timeout=30, what="the GETs in flight to end")
        position = ends[sample["__key__"]]  # the reader has parsed at least this far
        ahead.append(link.sent_to("/l/") - position)
    requests = ranged(link)
    largest = max(int(r.range.split("-")[1]) + 1 - int(r.range.split("=")[1].split("-")[0]) for r in requests)
    assert max(ahead) <= budget + largest, f"{max(ahead)} bytes sent ahead of the reader; budget {budget}"
    assert max(ahead) > BLOCK_SIZE  # the reader did read ahead: the bound is not met by reading nothing
    assert link.sent_to("/l/") == sum(len(d) for d in shards.values())  # and every byte was sent once

"""A mix under torch.distributed (the issue's acceptance): 2 gloo ranks x 2 DataLoader workers,
three sources (a growing directory, a fixed one, an s3:// prefix on the loopback server with
objects added and replaced), exact counts per source every epoch, the rotation, new data read
the epoch after it lands, a mid-epoch checkpoint resumed on 1 rank x 3 workers."""

from __future__ import annotations

import collections
import os
import pickle
import sys

import pytest

from s3fixtures import REGION, aws_environment, moto_server, shard_bytes  # noqa: F401 - fixtures
from shardutil import write_shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import ddp_check  # noqa: E402

WEIGHTS = {"fresh": 0.2, "base": 0.5, "remote": 0.3}
EPOCH_SIZE = 101  # 100 on 2 ranks: fresh 20, base 50, remote 30
CHECKPOINT_EPOCH, BATCHES_BEFORE = 3, 5
BASE = {f"base{i}/{j:06d}" for i in range(6) for j in range(20)}


def make_sources(fresh: str, base: str, bucket: str) -> dict:
    return {"fresh": fresh, "base": {"source": base, "verify": "strict"}, "remote": f"s3://{bucket}/remote/"}


def land(epoch: int, fresh: str, bucket: str) -> None:
    """What producers do before ``epoch`` (from 1 on): a new local shard, a new object, a
    replaced object (same keys, new bytes)."""
    import boto3

    write_shard(fresh, f"fresh{epoch + 1}.tar", 10)
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key=f"remote/r{epoch + 2}.tar", Body=shard_bytes(f"r{epoch + 2}", 10))
    client.put_object(Bucket=bucket, Key=f"remote/r{epoch - 1}.tar",
                      Body=shard_bytes(f"r{epoch - 1}", 10, version=f"v{epoch}"))


def rows(batch):
    return [[s["__key__"], s["__source__"], s.get("ver", b"").decode(), bool(s.get("__padded__"))] for s in batch]


def record(epoch, mix, got) -> dict:
    return {"epoch": epoch, "mix": mix.id, "counts": mix.counts, "rows": got}


def read_mix(group, *, fresh: str, base: str, bucket: str, out: str) -> list[dict]:
    """A step on each rank: epochs 0..3, stopping after BATCHES_BEFORE batches of epoch 3 with
    the loader's state saved (the job dies there)."""
    import torch.distributed as dist
    from torchdata.stateful_dataloader import StatefulDataLoader

    import wdsrefresh as wr

    ds = wr.RefreshingWebDataset(make_sources(fresh, base, bucket), weights=WEIGHTS, epoch_size=EPOCH_SIZE)
    loader = StatefulDataLoader(ds, batch_size=4, collate_fn=rows, num_workers=2, worker_init_fn=ddp_check._quiet,
                                multiprocessing_context=ddp_check.worker_context("forkserver"))
    records = []
    for epoch in range(CHECKPOINT_EPOCH + 1):
        if epoch and group.rank == 0:
            land(epoch, fresh, bucket)
        mix = ds.set_epoch(epoch)
        if epoch < CHECKPOINT_EPOCH:
            got = [r for batch in loader for r in batch]
        else:
            it, got = iter(loader), []
            for _ in range(BATCHES_BEFORE):
                got.extend(next(it))
            with open(os.path.join(out, f"state{group.rank}.pkl"), "wb") as f:
                pickle.dump(loader.state_dict(), f)
        records.append(record(epoch, mix, got))
        dist.barrier()  # every rank done with the epoch before the producers change anything
    ds.close()
    return records


@pytest.fixture(scope="module")
def run(tmp_path_factory, module_procs, moto_server):  # noqa: F811 - fixture
    """Every rank's records of epochs 0..3 (3 cut at the checkpoint), then epoch 3's rest and
    epoch 4 read by a restarted job of 1 rank x 3 workers from both ranks' states."""
    import boto3
    from torchdata.stateful_dataloader import StatefulDataLoader

    import wdsrefresh as wr

    mp = pytest.MonkeyPatch()  # the module's environment: dummy credentials, the loopback endpoint
    aws_environment(mp, moto_server)
    tmp = tmp_path_factory.mktemp("mix")
    fresh, base, out = tmp / "fresh", tmp / "base", tmp / "out"
    for d in (fresh, base, out):
        d.mkdir()
    for i in range(2):
        write_shard(str(fresh), f"fresh{i}.tar", 10)
    for i in range(6):
        write_shard(str(base), f"base{i}.tar", 20)
    bucket = "mix-distributed"
    client = boto3.client("s3", region_name=REGION)
    client.create_bucket(Bucket=bucket)
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"remote/r{i}.tar", Body=shard_bytes(f"r{i}", 10))
    step = (read_mix, {"fresh": str(fresh), "base": str(base), "bucket": bucket, "out": str(out)})
    try:
        (per_rank,) = ddp_check.run_steps([step], world_size=2, out=str(out), procs=module_procs, timeout=300)
        states = [pickle.load(open(out / f"state{r}.pkl", "rb")) for r in range(2)]
        ds = wr.RefreshingWebDataset(make_sources(str(fresh), str(base), bucket), weights=WEIGHTS,
                                     epoch_size=EPOCH_SIZE)
        ds.load_state_dict(states)  # before the loader: another layout
        mix = ds.set_epoch(CHECKPOINT_EPOCH)
        loader = StatefulDataLoader(ds, batch_size=4, collate_fn=rows, num_workers=3)
        rest = record(CHECKPOINT_EPOCH, mix, [r for batch in loader for r in batch])
        land(CHECKPOINT_EPOCH + 1, str(fresh), bucket)
        mix = ds.set_epoch(CHECKPOINT_EPOCH + 1)
        after = record(CHECKPOINT_EPOCH + 1, mix, [r for batch in loader for r in batch])
        ds.close()
    finally:
        mp.undo()
    return per_rank, rest, after


def real(epoch_records) -> list:
    return [r for rec in epoch_records for r in rec["rows"] if not r[3]]


def by_source(rows_) -> collections.Counter:
    return collections.Counter(source for _, source, _, _ in rows_)


def epochs(run):
    """Per epoch 0..4: the real rows read (all ranks; epoch 3 before and after the restart), and its counts."""
    per_rank, rest, after = run
    out = []
    for e in range(CHECKPOINT_EPOCH + 1):
        records = [per_rank[r][e] for r in range(2)]
        assert len({rec["mix"] for rec in records}) == 1, f"epoch {e}: ranks read different mixes"
        if e == CHECKPOINT_EPOCH:
            assert rest["mix"] == records[0]["mix"]  # the restart finished the saved mix
            records.append(rest)
        out.append((real(records), records[0]["counts"]))
    out.append((real([after]), after["counts"]))
    return out


@pytest.mark.timeout(400)
def test_each_epoch_reads_exactly_each_sources_count_summed_over_ranks_and_workers(run):
    for e, (got, counts) in enumerate(epochs(run)):
        assert by_source(got) == counts, f"epoch {e}"
        expected = {"fresh": 20, "base": 50, "remote": 30} if e < 4 else {"fresh": 20, "base": 51, "remote": 30}
        assert counts == expected, f"epoch {e}"  # 1 rank in epoch 4: 101 samples, no rounding
        assert all(key.startswith({"fresh": "fresh", "base": "base", "remote": "r"}[s]) for key, s, _, _ in got)


@pytest.mark.timeout(400)
def test_every_rank_yields_as_many_samples_and_batches(run):
    per_rank, _, _ = run
    for e in range(CHECKPOINT_EPOCH):
        assert len(per_rank[0][e]["rows"]) == len(per_rank[1][e]["rows"]) == 50, f"epoch {e}"
    assert len(per_rank[0][CHECKPOINT_EPOCH]["rows"]) == len(per_rank[1][CHECKPOINT_EPOCH]["rows"]) == 4 * BATCHES_BEFORE


@pytest.mark.timeout(400)
def test_the_fixed_source_rotates_each_sample_once_before_twice_across_the_restart(run):
    reads: collections.Counter = collections.Counter()
    for e, (got, _) in enumerate(epochs(run)):
        base = [key for key, s, _, _ in got if s == "base"]
        assert len(set(base)) == len(base), f"epoch {e}: a sample of base read twice in one epoch"
        once = {k for k in BASE if reads[k] == min(reads[k] for k in BASE)}
        reads.update(base)
        assert max(reads[k] for k in BASE) - min(reads[k] for k in BASE) <= 1, f"epoch {e}"
        if len(once) <= len(base):  # the least read come first, the restart included
            assert once <= set(base), f"epoch {e}"


@pytest.mark.timeout(400)
def test_new_local_shards_and_new_or_replaced_objects_are_read_the_epoch_after_they_land(run):
    for e, (got, _) in enumerate(epochs(run)):
        if e == 0:
            continue
        keys = {key for key, _, _, _ in got}
        assert {f"fresh{e + 1}/{j:06d}" for j in range(10)} <= keys, f"epoch {e}: the new local shard"
        assert {f"r{e + 2}/{j:06d}" for j in range(10)} <= keys, f"epoch {e}: the new object"
        replaced = {(key, ver) for key, s, ver, _ in got if key.startswith(f"r{e - 1}/")}
        assert replaced == {(f"r{e - 1}/{j:06d}", f"v{e}") for j in range(10)}, f"epoch {e}: the replaced object"

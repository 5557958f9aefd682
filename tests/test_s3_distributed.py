"""Invariants 1, 2, 3 on s3://: real gloo ranks x DataLoader workers while a writer uploads,
replaces and deletes objects in the bucket (moto on 127.0.0.1)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import sys

import pytest

from s3fixtures import moto_server, s3, shard_bytes  # noqa: F401 - fixtures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import ddp_check  # noqa: E402


def s3_writer(endpoint: str, bucket: str, prefix: str, stop, seed: int, keep: int = 30,
              interval: float = 0.3) -> None:
    """Uploads a shard of 1..40 samples, replaces one (same keys and count, new bytes), uploads a
    temporary key, or deletes the oldest beyond ``keep``, every ``interval`` s on average."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    rng = random.Random(seed)
    live: dict[str, int] = {}
    n = version = 0
    while not stop.is_set():
        action = rng.random()
        if action < 0.45 or not live:
            name, count = f"w{n:05d}", rng.randint(1, 40)
            n += 1
            client.put_object(Bucket=bucket, Key=f"{prefix}{name}.tar", Body=shard_bytes(name, count))
            live[name] = count
        elif action < 0.8:
            name = rng.choice(sorted(live))
            version += 1
            body = shard_bytes(name, live[name], version=f"r{version}")
            client.put_object(Bucket=bucket, Key=f"{prefix}{name}.tar", Body=body)
        elif action < 0.9:
            client.put_object(Bucket=bucket, Key=f"{prefix}_tmp.w{n:05d}.tar", Body=b"never listed")
        for name in sorted(live)[:-keep]:
            client.delete_object(Bucket=bucket, Key=f"{prefix}{name}.tar")
            del live[name]
        stop.wait(rng.uniform(0.5, 1.5) * interval)


@pytest.mark.timeout(400)
def test_every_sample_once_equal_per_rank_on_s3_while_a_writer_uploads_replaces_deletes(s3, tmp_path, procs):
    for i in range(4):
        s3.put_shard(f"shards/seed{i}.tar", 10 + 3 * i)
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    writer = ctx.Process(target=s3_writer, args=(s3.endpoint, s3.name, "shards/", stop, 1), daemon=True)
    writer.start()
    procs.append(writer)
    ranks: list = []  # run() kills what it is given when done: never the writer, which must see stop first
    try:
        records = ddp_check.run(s3.url("shards/"), str(out), world_size=2, num_workers=2, persistent=False,
                                epochs=4, batch_size=4, with_writer=False, procs=ranks, timeout=300)
    finally:
        procs.extend(ranks)
        stop.set()
        writer.join(timeout=30)
    totals = ddp_check.check(records, world_size=2)
    assert totals["epochs"] == 4 and totals["yielded"] > 0
    shards = [{name for name, _ in r["shards"]} for r in records[0]]
    assert any(a != b for a, b in zip(shards, shards[1:])), "the writer's uploads never reached a snapshot"
    assert not any(name.startswith("_tmp") for epoch in shards for name in epoch)

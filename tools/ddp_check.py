"""Checks the split invariants with real torch.distributed ranks while a writer changes the directory.

Each rank (a spawned process in a gloo group on 127.0.0.1) reads every epoch through a
DataLoader, records the keys it yielded and its batch count; a writer process meanwhile adds
shards of 1..50 samples and deletes old ones. ``check`` then verifies, per epoch: one
snapshot for all ranks, no key twice, every key from the snapshot, every sample of the
snapshot yielded or counted (left out, skipped), equal samples and batches per rank.

    python tools/ddp_check.py --epochs 50 --world-size 2 --workers 2   # the stress run
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from shardutil import write_shard  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def writer(directory: str, stop, seed: int, keep: int = 40, interval: float = 0.25) -> None:
    """Adds a shard of 1..50 samples every ``interval`` s (on average) and deletes the oldest beyond ``keep``.

    Deletions land mid-epoch now and then, so the counted skip-and-pad path is exercised too.
    """
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        write_shard(directory, f"w{n:05d}.tar", rng.randint(1, 50))
        n += 1
        names = sorted(f for f in os.listdir(directory) if f.startswith("w") and f.endswith(".tar"))
        for old in names[:-keep]:
            os.unlink(os.path.join(directory, old))
        stop.wait(rng.uniform(0.5, 1.5) * interval)


def _keys(batch):
    return [(s["__key__"], bool(s.get("__padded__"))) for s in batch]


def rank_main(rank, world_size, port, directory, out, num_workers, persistent, epochs, batch_size, seed):
    import torch
    import torch.distributed as dist

    import wdsrefresh as wr
    from wdsrefresh.split import shard_order

    logging.getLogger("wdsrefresh").setLevel(logging.ERROR)  # deletions are counted; their warnings would flood
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    ds = wr.RefreshingWebDataset(directory, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=_keys, num_workers=num_workers,
                                         persistent_workers=persistent and num_workers > 0)
    records = []
    for epoch in range(epochs):
        snap = ds.set_epoch(epoch)
        batches = [b for b in loader]
        stats = ds.stats(epoch)
        records.append({
            "epoch": epoch, "snapshot": snap.id,
            "shards": [[os.path.basename(s.url), s.nsamples] for s in snap.shards],
            "order": [snap.shards[i].url for i in shard_order(snap, seed, epoch)],
            "keys": [k for b in batches for k, padded in b if not padded],
            "padded": sum(padded for b in batches for _, padded in b),
            "batches": len(batches), "left_out": stats.left_out, "skipped": stats.skipped,
            "deleted": stats.deleted, "replaced": stats.replaced,
        })
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.destroy_process_group()


def run(directory, out, *, world_size=2, num_workers=2, persistent=False, epochs=5, batch_size=4,
        seed=0, with_writer=True, timeout=300, procs=None):
    """Runs the ranks (and the writer); returns the per-rank records. Kills everything on timeout."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    started = [] if procs is None else procs
    if with_writer:
        w = ctx.Process(target=writer, args=(directory, stop, seed), daemon=True)
        w.start()
        started.append(w)
    port = free_port()
    ranks = [ctx.Process(target=rank_main, args=(r, world_size, port, directory, out, num_workers, persistent,
                                                 epochs, batch_size, seed)) for r in range(world_size)]
    for p in ranks:
        p.start()
        started.append(p)
    deadline = time.monotonic() + timeout
    for p in ranks:
        p.join(timeout=max(1, deadline - time.monotonic()))
    stop.set()
    for p in started:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    codes = [p.exitcode for p in ranks]
    if codes != [0] * world_size:
        raise RuntimeError(f"ranks exited with {codes} (None: hung and killed after {timeout}s)")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world_size)]


def check(per_rank: list[list[dict]], world_size: int) -> dict:
    """Raises AssertionError on the first broken invariant; returns totals."""
    totals = Counter()
    orders = []
    for epoch_records in zip(*per_rank):
        first = epoch_records[0]
        e = first["epoch"]
        assert len({r["snapshot"] for r in epoch_records}) == 1, f"epoch {e}: ranks read different snapshots"
        assert len({json.dumps(r["order"]) for r in epoch_records}) == 1, f"epoch {e}: shard order differs"
        counts = [len(r["keys"]) + r["padded"] for r in epoch_records]
        assert len(set(counts)) == 1, f"epoch {e}: samples per rank differ: {counts}"
        batches = [r["batches"] for r in epoch_records]
        assert len(set(batches)) == 1, f"epoch {e}: batches per rank differ: {batches}"
        keys = [k for r in epoch_records for k in r["keys"]]
        dup = [k for k, c in Counter(keys).items() if c > 1]
        assert not dup, f"epoch {e}: keys yielded twice: {dup[:5]}"
        expected = {f"{name.split('.')[0]}/{i:06d}" for name, n in first["shards"] for i in range(n)}
        stray = set(keys) - expected
        assert not stray, f"epoch {e}: keys not in the snapshot: {sorted(stray)[:5]}"
        left_out = first["left_out"]
        skipped = sum(r["skipped"] for r in epoch_records)
        assert left_out < world_size, f"epoch {e}: {left_out} left out with {world_size} ranks"
        assert len(expected) - len(keys) == left_out + skipped, (
            f"epoch {e}: {len(expected)} in snapshot, {len(keys)} yielded, {left_out} left out, {skipped} skipped"
        )
        orders.append(first["order"])
        totals.update(epochs=1, samples=len(expected), yielded=len(keys), left_out=left_out, skipped=skipped,
                      padded=sum(r["padded"] for r in epoch_records),
                      deleted=sum(r["deleted"] for r in epoch_records))
    if len(orders) > 1:
        assert any(a != b for a, b in zip(orders, orders[1:])), "shard order never changed between epochs"
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory, out = os.path.join(tmp, "shards"), os.path.join(tmp, "out")
        os.makedirs(directory)
        os.makedirs(out)
        for i in range(5):
            write_shard(directory, f"seed{i}.tar", 10 + i)
        start = time.time()
        records = run(directory, out, world_size=args.world_size, num_workers=args.workers,
                      persistent=args.persistent, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                      timeout=max(300, args.epochs * 20))
        totals = check(records, args.world_size)
    print(f"{args.epochs} epochs, {args.world_size} ranks x {args.workers} workers"
          f"{' (persistent)' if args.persistent else ''} in {time.time() - start:.0f}s: all invariants held")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))


if __name__ == "__main__":
    main()

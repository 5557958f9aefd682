"""Checks the split invariants with real torch.distributed ranks while a writer changes the directory.

Each rank (a spawned process in a gloo group on 127.0.0.1) reads every epoch through a
DataLoader, records the keys it yielded and its batch count; a writer process meanwhile adds
shards of 1..50 samples and deletes old ones. ``check`` then verifies, per epoch: one
snapshot for all ranks, no key twice, every key from the snapshot, every sample of the
snapshot yielded or counted (left out, skipped), equal samples and batches per rank; and it
reports the padded share: how much of what the ranks delivered was padding for samples of
shards deleted mid-epoch (a few percent; most of each epoch must be real samples).

One group can run several steps in sequence (``run_steps``): starting ranks and their worker
processes costs seconds, reading an epoch a fraction of one.

    python tools/ddp_check.py --epochs 50 --world-size 2 --workers 2   # the stress run
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from shardutil import write_shard  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def writer(directory: str, stop, snapshot_taken, seed: int, keep: int = 40, interval: float = 1.0) -> None:
    """Writes ``keep`` shards of 1..50 samples at once, then adds one and deletes the oldest beyond
    ``keep`` each time an epoch's snapshot is taken and every ``interval`` s (on average) besides.

    The change right after each snapshot deletes a shard of it before its reader gets to it
    (a DataLoader worker takes longer to start than the writer to wake), so every epoch runs
    the counted skip-and-pad path on about one shard in ``keep``; the timed changes also land
    while snapshots resolve. Faster deletions would make much of each epoch padding.
    """
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        write_shard(directory, f"w{n:05d}.tar", rng.randint(1, 50))
        n += 1
        names = sorted(f for f in os.listdir(directory) if f.startswith("w") and f.endswith(".tar"))
        for old in names[:-keep]:
            os.unlink(os.path.join(directory, old))
        if n >= keep and snapshot_taken.wait(rng.uniform(0.5, 1.5) * interval):
            snapshot_taken.clear()


@dataclass(frozen=True)
class Rank:
    """What a step knows of the group it runs in."""

    rank: int
    world_size: int
    snapshot_taken: tuple = ()  # one event per writer

    def took_snapshot(self) -> None:
        """Tells the writers that this epoch's snapshot is fixed, so they change the directory now."""
        if self.rank == 0:
            for event in self.snapshot_taken:
                event.set()


def _keys(batch):
    return [(s["__key__"], bool(s.get("__padded__"))) for s in batch]


def _quiet(worker_id: int) -> None:
    """Deletions are counted; the warnings of each worker would flood (forkserver and spawn
    workers do not inherit the rank's logging settings)."""
    logging.getLogger("wdsrefresh").setLevel(logging.ERROR)


def worker_context(start_method: str):
    """The multiprocessing context for DataLoader workers.

    "spawn" and "forkserver" workers get a pickled copy of the dataset, "fork" workers inherit
    the rank's. A forkserver imports torch and the dataset's modules once, so each worker it
    forks starts without importing torch again (seconds per worker). It is started here, before
    any snapshot, so its start-up does not stretch the first epoch (and the writer's deletions
    in it).
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        import wdsrefresh as wr

        ctx.set_forkserver_preload(["torch", "torch.utils.data", wr.RefreshingWebDataset.__module__,
                                    _keys.__module__])
        first = ctx.Process(target=os.getpid)  # starts once the server has imported them
        first.start()
        first.join(timeout=120)
    return ctx


def read_epochs(group: Rank, directory: str, *, num_workers: int = 2, persistent: bool = False, epochs: int = 5,
                batch_size: int = 4, seed: int = 0, start_method: str = "forkserver") -> list[dict]:
    """A step: reads ``epochs`` epochs of ``directory`` through a DataLoader; one record per epoch."""
    import torch

    import wdsrefresh as wr
    from wdsrefresh.epoch.split import shard_order

    ds = wr.RefreshingWebDataset(directory, seed=seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, collate_fn=_keys, num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0, worker_init_fn=_quiet,
        multiprocessing_context=worker_context(start_method) if num_workers > 0 else None,
    )
    records = []
    try:
        for epoch in range(epochs):
            start = time.monotonic()
            snap = ds.set_epoch(epoch)
            group.took_snapshot()
            batches = [b for b in loader]
            stats = ds.stats(epoch)
            records.append({
                "epoch": epoch, "snapshot": snap.id,
                "shards": [[os.path.basename(s.url), s.nsamples] for s in snap.shards],
                "order": [snap.shards[i].url for i in shard_order(snap, seed, epoch)],
                "keys": [k for b in batches for k, padded in b if not padded],
                "padded": sum(padded for b in batches for _, padded in b),
                "batches": len(batches), "left_out": stats.left_out, "skipped": stats.skipped,
                "deleted": stats.deleted, "replaced": stats.replaced, "seconds": time.monotonic() - start,
            })
    finally:
        ds.close()
    return records


def _rank_main(group: Rank, port: int, out: str, steps: list) -> None:
    """One rank: joins the group, runs each step ``(function, kwargs)`` in order, writes their results."""
    rank, world_size = group.rank, group.world_size
    os.setpgrp()  # its own process group, so whoever started it can kill it with its workers
    import torch.distributed as dist

    _quiet(-1)
    results = []
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        for function, kwargs in steps:
            results.append(function(group, **kwargs))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(f"step {len(results)}: {traceback.format_exc()}")
        raise
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results are written; tearing down an interpreter that imported torch costs seconds


def kill(p) -> None:
    """Kills a process started here and, if it leads one, its process group (its DataLoader workers)."""
    try:  # the group first: until p is reaped, no other process can have its number
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # ChildProcessError once reaped
        os.killpg(p.pid, signal.SIGKILL)  # ProcessLookupError unless p called setpgrp()
    except (ChildProcessError, ProcessLookupError, PermissionError):
        pass
    if p.is_alive():
        p.kill()
    p.join(timeout=10)


def run_steps(steps: list, *, world_size: int, out: str, writer_dirs=(), seed: int = 0, timeout: float = 300,
              procs: list | None = None) -> list[list]:
    """Runs ``steps`` in one group of ``world_size`` spawned ranks, a writer changing each of
    ``writer_dirs`` meanwhile; returns ``results[step][rank]``.

    Every process is killed after ``timeout`` seconds or on any error; a rank's failure is
    raised with its traceback. ``procs`` collects the processes for a test fixture's teardown.
    """
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    snapshot_taken = tuple(ctx.Event() for _ in writer_dirs)
    started = [] if procs is None else procs
    ranks = []
    try:
        for i, directory in enumerate(writer_dirs):
            w = ctx.Process(target=writer, args=(directory, stop, snapshot_taken[i], seed + i), daemon=True)
            w.start()
            started.append(w)
        port = free_port()
        for r in range(world_size):
            p = ctx.Process(target=_rank_main, args=(Rank(r, world_size, snapshot_taken), port, out, steps))
            p.start()
            started.append(p)
            ranks.append(p)
        deadline = time.monotonic() + timeout
        running = [p.sentinel for p in ranks]
        while running and time.monotonic() < deadline:  # sentinels, not join(): kill() wants them unreaped
            for ended in mp.connection.wait(running, timeout=max(0.1, deadline - time.monotonic())):
                running.remove(ended)
    finally:
        stop.set()
        for event in snapshot_taken:
            event.set()  # wakes the writers
        for p in started:
            kill(p)
    codes = [p.exitcode for p in ranks]
    if codes != [0] * world_size:
        errors = [os.path.join(out, f"rank{r}.error") for r in range(world_size)]
        details = "\n".join(f"rank {r}: {_read(e)}" for r, e in enumerate(errors) if os.path.exists(e))
        raise RuntimeError(f"ranks exited with {codes} (-9: hung and killed after {timeout}s)\n{details}")
    per_rank = [json.loads(_read(os.path.join(out, f"rank{r}.json"))) for r in range(world_size)]
    return [list(step) for step in zip(*per_rank)]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def run(directory, out, *, world_size=2, num_workers=2, persistent=False, epochs=5, batch_size=4,
        seed=0, with_writer=True, start_method="forkserver", timeout=300, procs=None):
    """Reads ``epochs`` epochs in a new group (with a writer); returns the per-rank records."""
    step = (read_epochs, {"directory": directory, "num_workers": num_workers, "persistent": persistent,
                          "epochs": epochs, "batch_size": batch_size, "seed": seed, "start_method": start_method})
    (records,) = run_steps([step], world_size=world_size, out=out, writer_dirs=[directory] if with_writer else (),
                           seed=seed, timeout=timeout, procs=procs)
    return records


def padded_share(padded: int, yielded: int) -> float:
    """The share of what the loaders delivered that was padding: padded / (yielded + padded)."""
    return padded / (yielded + padded) if yielded + padded else 0.0


def check(per_rank: list[list[dict]], world_size: int) -> dict:
    """Raises AssertionError on the first broken invariant; returns totals.

    Besides the counts summed over epochs and ranks, ``padded_share`` and
    ``padded_share_by_epoch`` say how much of what the ranks delivered was padding.
    """
    totals = Counter()
    orders = []
    shares = []
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
        padded = sum(r["padded"] for r in epoch_records)
        shares.append(padded_share(padded, len(keys)))
        totals.update(epochs=1, samples=len(expected), yielded=len(keys), left_out=left_out, skipped=skipped,
                      padded=padded, deleted=sum(r["deleted"] for r in epoch_records))
    if len(orders) > 1:
        assert any(a != b for a, b in zip(orders, orders[1:])), "shard order never changed between epochs"
    return dict(totals, padded_share=padded_share(totals["padded"], totals["yielded"]),
                padded_share_by_epoch=shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--start-method", default="forkserver", choices=["fork", "forkserver", "spawn"],
                        help="how DataLoader workers start (default: forkserver)")
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
                      start_method=args.start_method, timeout=max(300, args.epochs * 20))
        totals = check(records, args.world_size)
    shares = totals.pop("padded_share_by_epoch")
    print(f"{args.epochs} epochs, {args.world_size} ranks x {args.workers} {args.start_method} workers"
          f"{' (persistent)' if args.persistent else ''} in {time.time() - start:.0f}s: all invariants held")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()) if k != "padded_share"))
    print(f"  padded share {totals['padded_share']:.1%} of the samples delivered"
          f" (per epoch: min {min(shares):.1%}, median {sorted(shares)[len(shares) // 2]:.1%}, max {max(shares):.1%})")
    print("  by epoch: " + " ".join(f"{share:.0%}" for share in shares))


if __name__ == "__main__":
    main()

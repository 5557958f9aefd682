"""A small run to watch: 2 gloo ranks x 2 DataLoader workers train while a producer changes the shards.

Writes ``OUT/stats.jsonl`` (``stats_dir=``) and, with ``--plot``, the figure of
``wdsrefresh stats OUT --plot FILE`` (docs/img/watch-demo.png comes from here):

    python tools/watch_demo.py --out /tmp/watch --plot docs/img/watch-demo.png

The producer adds a shard of 100..400 samples every ``--every`` seconds, replaces one now and
then and deletes the oldest beyond 10; each training step takes ``--step`` seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ddp_check import free_port  # noqa: E402
from shardutil import write_shard  # noqa: E402


def producer(directory: str, start, stop, every: float) -> None:
    rng = random.Random(0)
    number = 4
    start.wait()
    while not stop.is_set():
        time.sleep(every)
        write_shard(directory, f"shard-{number:04d}.tar", rng.randint(100, 400), size=1024)
        number += 1
        names = sorted(n for n in os.listdir(directory) if n.endswith(".tar"))
        if number % 5 == 0:  # re-pack one under the same name
            victim = rng.choice(names)
            write_shard(directory, victim, rng.randint(100, 400), size=1024, prefix=f"re{number}")
        for old in names[:-10]:
            os.unlink(os.path.join(directory, old))


def rank_main(rank: int, port: int, directory: str, out: str, epochs: int, step: float, start) -> None:
    import torch
    import torch.distributed as dist

    import wdsrefresh as wr

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with wr.RefreshingWebDataset(directory, stats_dir=out) as ds:
        pipeline = ds.to_tuple("__key__", "bin").batched(32)
        # a spawned rank makes spawn its default start method: fork the workers, as a launcher's rank would
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2, persistent_workers=True,
                                             multiprocessing_context="fork")
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            start.set()  # the producer starts with the first epoch
            for _batch in wr.timed(loader):
                time.sleep(step * (1 + rank))  # rank 1 computes slower: it waits less for data
            if rank == 0:
                s = ds.stats(epoch)
                print(f"epoch {epoch}: {s.shards} shards, {s.samples} samples (+{s.added} ~{s.changed} -{s.removed})",
                      flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="stats directory (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--every", type=float, default=0.4, help="seconds between new shards")
    parser.add_argument("--step", type=float, default=0.004, help="seconds per training step on rank 0")
    parser.add_argument("--plot", help="write the figure here")
    parser.add_argument("--dpi", type=int, default=80, help="the figure's dots per inch (default: %(default)s)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="watch-demo-")
    directory = os.path.join(work, "shards")
    os.makedirs(directory)
    out = args.out or os.path.join(work, "stats")
    for i in range(4):
        write_shard(directory, f"shard-{i:04d}.tar", 300, size=1024)
    ctx = mp.get_context("spawn")
    start, stop = ctx.Event(), ctx.Event()
    feeder = ctx.Process(target=producer, args=(directory, start, stop, args.every))
    feeder.start()
    port = free_port()
    ranks = [ctx.Process(target=rank_main, args=(r, port, directory, out, args.epochs, args.step, start)) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join()
    stop.set()
    feeder.join()
    print(f"stats: {out}/stats.jsonl")
    if args.plot:
        from wdsrefresh.cli import main as cli

        cli(["stats", out, "--plot", args.plot, "--dpi", str(args.dpi),
             "--title", "tools/watch_demo.py: 2 ranks x 2 workers, a producer adding, replacing, deleting"])


if __name__ == "__main__":
    main()

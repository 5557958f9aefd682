"""Checkpoint sizes and the per-step cost of StatefulDataLoader's state capture.

    python tools/bench_state.py [--sizes 1000,10000,100000] [--shards 400] [--rounds 5]

Part 1 (synthetic snapshots of N shards, names like ``part3/shard-000001.tar``, 1-3 blocks each):
the pickled size of worker 0's state (which carries the snapshot), of another worker's (which
names it), bytes per shard against the tests' bound (<= 120 per shard + 8 per block; docs/resume.md
gives the measured 114), and the time torchdata's worker spends per step on our state
(``_IncrementalState.generate_delta`` on an unchanged snapshot, the code StatefulDataLoader runs
at every step by default).

Part 2 (real shards, 2 DataLoader workers): batches/s with a state captured at every step
against one every 10**9 steps, interleaved over rounds; the ratio is the per-step cost.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from wdsrefresh.epoch.resume import SavedPosition, make_state, snapshot_doc  # noqa: E402
from wdsrefresh.core.snapshot import ShardInfo, Snapshot, snapshot_id  # noqa: E402

BLOCK = 4 << 20
FINGERPRINT = {"source": "directory '/data/shards'", "seed": 0, "shardshuffle": True, "partial": False}
STATS = {"yielded": 1234, "quota": 5000, "skipped": 0, "padded": 0}


def synthetic_snapshot(n: int) -> Snapshot:
    rng = random.Random(n)
    shards = []
    for i in range(n):
        size = rng.randrange(BLOCK // 2, 3 * BLOCK)
        name = f"part{i % 7}/shard-{i:06d}.tar"
        shards.append(ShardInfo(url="/data/shards/" + name, path="/data/shards/" + name, size=size,
                                mtime_ns=rng.randrange(1 << 62), inode=rng.randrange(1 << 40), device=2049,
                                nsamples=rng.randrange(1, 10_000), digest=f"xxh3_128:{rng.randrange(1 << 128):032x}",
                                blocks=rng.randbytes(8 * -(-size // BLOCK)), name=name))
    shards = tuple(shards)
    return Snapshot(0, shards, snapshot_id(shards))


def sizes_row(n: int) -> None:
    from torchdata.stateful_dataloader.incremental_state import _IncrementalState

    snap = synthetic_snapshot(n)
    nblocks = sum(len(s.blocks) // 8 for s in snap.shards)
    started = time.perf_counter()
    carried = snapshot_doc(snap)
    encode_s = time.perf_counter() - started

    def state(worker: int, doc: dict) -> dict:
        return make_state(FINGERPRINT, 0, doc, 1, 2, [SavedPosition(0, worker, 3, 5, STATS).as_dict()])

    carrier = len(pickle.dumps(state(0, carried)))
    other = len(pickle.dumps(state(1, snapshot_doc(snap, carry=False))))
    per_shard = (carrier - other - 8 * nblocks) / n
    tracker = _IncrementalState(state(0, carried))
    steps = 200
    started = time.perf_counter()
    for _ in range(steps):
        tracker.generate_delta(state(0, carried))
    step_us = (time.perf_counter() - started) / steps * 1e6
    print(f"{n:>8} shards  worker 0 state {carrier / 1e6:8.2f} MB  ({per_shard:5.1f} B/shard + 8 B x {nblocks} "
          f"blocks; bound 120)  other worker {other:>5} B  encode {encode_s * 1e3:7.1f} ms  "
          f"per-step delta {step_us:7.1f} us")


def loader_rows(nshards: int, rounds: int) -> None:
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    import wdsrefresh as wr
    from shardutil import write_shard

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        for i in range(nshards):
            write_shard(d, f"s{i:05d}.tar", 8)
        rates: dict[int, list[float]] = {1: [], 10**9: []}
        for _ in range(rounds):
            for every in rates:
                ds = wr.RefreshingWebDataset(d, watch=False, settle=0).to_tuple("__key__").batched(8)
                loader = StatefulDataLoader(ds, batch_size=None, num_workers=2, snapshot_every_n_steps=every)
                started = time.perf_counter()
                batches = sum(1 for _ in loader)
                rates[every].append(batches / (time.perf_counter() - started))
                ds.close()
        each, rarely = statistics.median(rates[1]), statistics.median(rates[10**9])
        print(f"StatefulDataLoader, 2 workers, {nshards} shards, batches of 8: state every step {each:7.0f} "
              f"batches/s, every 10**9 steps {rarely:7.0f} batches/s: ratio {each / rarely:.2f} "
              f"(median of {rounds} interleaved rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="snapshot sizes for part 1 (comma-separated)")
    parser.add_argument("--shards", type=int, default=400, help="real shards of 8 samples for part 2")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for part 2")
    args = parser.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        sizes_row(n)
    loader_rows(args.shards, args.rounds)


if __name__ == "__main__":
    main()

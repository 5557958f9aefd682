"""Torture: a writer appends, replaces, rewrites in place, deletes and truncates shards while a
DataLoader with 2 workers reads epoch after epoch. Every payload byte of a shard version is
that version's letter, so a torn sample (bytes of two versions, or of a half-written file)
shows at once.

    python tools/torture.py --epochs 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import string
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from shardutil import tar_bytes  # noqa: E402

SAMPLES, PAYLOAD = 40, 20_000  # ~1.7 MB shards


def shard_bytes(name: str, version: str) -> bytes:
    v = version.encode()
    return tar_bytes([{"__key__": f"{name}/{i:06d}", "bin": v * PAYLOAD, "cls": v} for i in range(SAMPLES)])


def writer(directory: str, stop, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        names = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".tar") and not f.startswith("_"))
        op = rng.choice(["append", "append", "replace", "rewrite", "delete", "truncate"]) if names else "append"
        if op == "append" or len(names) < 3:
            name, op = f"t{n:04d}", "append"
            n += 1
        else:
            name = rng.choice(names)
        path = os.path.join(directory, name + ".tar")
        data = shard_bytes(name, rng.choice(string.ascii_uppercase))
        try:
            if op in ("append", "replace"):
                tmp = os.path.join(directory, f"_tmp.{name}.tar")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            elif op == "rewrite":
                with open(path, "r+b") as f:
                    for i in range(0, len(data), 65536):
                        f.write(data[i:i + 65536])
            elif op == "delete":
                os.unlink(path)
            elif op == "truncate":
                os.truncate(path, os.path.getsize(path) // 2)
        except FileNotFoundError:
            pass
        stop.wait(rng.uniform(0.005, 0.05))


def _consistent(sample) -> bool:
    return len(set(sample["bin"])) == 1 and bytes(sample["cls"]) == sample["bin"][:1]


def run(directory: str, epochs: int, seed: int = 0, verify: str = "inline", on_change: str = "reload") -> dict:
    import torch

    import wdsrefresh as wr
    from webdataset.handlers import warn_and_continue

    for i in range(4):
        with open(os.path.join(directory, f"first{i}.tar"), "wb") as f:
            f.write(shard_bytes(f"first{i}", "A"))
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    w = ctx.Process(target=writer, args=(directory, stop, seed), daemon=True)
    w.start()
    totals = Counter()
    try:
        ds = wr.RefreshingWebDataset(directory, verify=verify, on_change=on_change, handler=warn_and_continue)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            keys = Counter()
            for sample in loader:
                keys[sample["__key__"]] += 1
                totals["yielded"] += 1
                totals["torn"] += not _consistent(sample)
            totals["duplicates"] += sum(c - 1 for c in keys.values())
            stats = ds.stats(epoch)
            totals.update(replaced=stats.replaced, deleted=stats.deleted, corrupt=stats.corrupt,
                          skipped=stats.skipped, epochs=1)
    finally:
        stop.set()
        w.join(timeout=10)
        if w.is_alive():
            w.kill()
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", default="inline", choices=["inline", "strict"])
    parser.add_argument("--on-change", default="reload", choices=["reload", "skip"])
    args = parser.parse_args()
    import logging
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as directory:
        start = time.time()
        totals = run(directory, args.epochs, args.seed, args.verify, args.on_change)
    print(f"{totals.get('epochs', 0)} epochs in {time.time() - start:.0f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    sys.exit(1 if totals.get("torn") or totals.get("duplicates") else 0)


if __name__ == "__main__":
    main()

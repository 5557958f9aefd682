"""A small training loop for the kill test: reads shards with a StatefulDataLoader, logs every
sample it consumes, and checkpoints every ``--every`` batches (atomically). Restarted with the
same arguments, it resumes from the last checkpoint.

The log holds one line per consumed sample: ``<epoch> <key>``. A checkpoint records the log's
byte length at that moment, so a restart first truncates the log there: what remains is what
the checkpoint covers, and the samples consumed after it are consumed again.

``--pause-at N``: after the N-th batch of this run, print "paused" and block on stdin, so a test
can kill the process at a known point (mid-epoch, with a checkpoint behind it).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import wdsrefresh as wr


def keys(batch: list[dict]) -> list[str]:
    return [sample["__key__"] for sample in batch]


def save(path: str, state: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--set-epoch", action="store_true")
    ap.add_argument("--pause-at", type=int, default=0)
    args = ap.parse_args()

    ds = wr.RefreshingWebDataset(args.shards, watch=False, state_dir=args.state_dir)
    loader = StatefulDataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=list)
    start = 0
    if os.path.exists(args.checkpoint):
        checkpoint = torch.load(args.checkpoint, weights_only=False)
        loader.load_state_dict(checkpoint["loader"])
        start = checkpoint["epoch"]
        with open(args.log, "r+b") as f:
            f.truncate(checkpoint["log_bytes"])
    log = open(args.log, "ab")
    batches = 0
    for epoch in range(start, args.epochs):
        if args.set_epoch:
            ds.set_epoch(epoch)
        for batch in loader:
            log.write("".join(f"{epoch} {k}\n" for k in keys(batch)).encode())
            log.flush()
            batches += 1
            if batches % args.every == 0:
                save(args.checkpoint, {"loader": loader.state_dict(), "epoch": epoch, "log_bytes": log.tell()})
            if batches == args.pause_at:
                print("paused", flush=True)
                sys.stdin.read()
    log.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

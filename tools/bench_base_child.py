"""One reader of ``tools/bench.py --base``, run in a process of its own with one tree of
wdsrefresh first on ``PYTHONPATH`` (HEAD's, or the base commit's worktree):

    python bench_base_child.py KIND DIR [--workers N --batch B --members bin,cls]   (DIR: or an s3:// prefix)

prints ``ready <the wdsrefresh file imported>``, then answers each ``prepare`` line on stdin
with ``ok`` once the next pass is prepared (untimed: the next epoch's ``set_epoch``), and each
``pass`` line with the number of samples (or, for the resolution kinds, shards) it yielded. KIND:

- ``inline``, ``off``: ``RefreshingWebDataset(DIR, shardshuffle=False, verify=KIND)``, as
  bench.py's ``Refreshing`` (a pass reads the epoch ``prepare`` set);
  with ``--workers N`` through a DataLoader with N persistent workers and ``.batched(B)``;
- ``tensors``: ``inline`` batched with ``wr.collate_tensors`` (only with ``--workers``);
- ``rescan``, ``watched``: one ``set_epoch`` on DIR's unchanged shards, rescanned (``watch=False``)
  or answered by the watched index.

``--cpu``: each answer also gives the CPU seconds the pass took, of this process and of its
DataLoader workers (``/proc/PID/stat``, in clock ticks), which load from other jobs on the
machine barely changes.

Only the public API is used, so the same file drives any commit's tree. This module imports
nothing of the project at its top but through ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def dataset(kind: str, directory: str, state_dir: str):
    import wdsrefresh as wr

    verify = "off" if kind == "off" else "inline"
    if "://" in directory:  # objects (bench.py --remote --base): listed, never watched
        return wr.RefreshingWebDataset(directory, shardshuffle=False, verify=verify, state_dir=state_dir)
    # settle=0: the shards were written whole (maybe just now, in place): read them at once
    return wr.RefreshingWebDataset(directory, shardshuffle=False, verify=verify, watch=kind == "watched",
                                   state_dir=state_dir, settle=0)


def passes_of(kind: str, directory: str, workers: int, batch: int, members: list[str]):
    """(prepare, one_pass, its DataLoader or None) of the reader KIND."""
    import torch.utils.data

    import wdsrefresh as wr

    ds = dataset(kind, directory, tempfile.mkdtemp(prefix="wdsrefresh-bench-base-"))
    epochs = iter(range(1 << 30))
    if kind in ("rescan", "watched"):
        return (lambda: None), (lambda: len(ds.set_epoch(next(epochs)).shards)), None

    def prepare() -> None:
        ds.set_epoch(next(epochs))

    if not workers:
        return prepare, (lambda: sum(1 for _ in ds)), None
    pipeline = ds.to_tuple(*members)
    pipeline = pipeline.batched(batch, collation_fn=wr.collate_tensors) if kind == "tensors" else pipeline.batched(batch)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=True)
    return prepare, (lambda: sum(len(b[0]) for b in loader)), loader


def cpu_seconds(loader) -> float:
    """CPU seconds of this process and of ``loader``'s worker processes so far."""
    total = time.process_time()
    workers = getattr(getattr(loader, "_iterator", None), "_workers", ())
    for worker in workers:
        with open(f"/proc/{worker.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("inline", "off", "tensors", "rescan", "watched"))
    parser.add_argument("directory")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--members", default="bin,cls")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    prepare, one_pass, loader = passes_of(args.kind, args.directory, args.workers, args.batch,
                                          args.members.split(","))
    import wdsrefresh

    print("ready", wdsrefresh.__file__, flush=True)
    for line in sys.stdin:
        if line.strip() == "prepare":
            prepare()
            print("ok", flush=True)
        elif line.strip() == "pass" and args.cpu:
            before = cpu_seconds(loader)
            count = one_pass()
            print(count, cpu_seconds(loader) - before, flush=True)
        elif line.strip() == "pass":
            print(one_pass(), flush=True)
        else:
            raise SystemExit(f"bench_base_child: expected 'prepare' or 'pass' on stdin, got {line!r}")


if __name__ == "__main__":
    main()

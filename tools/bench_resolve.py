"""Time to resolve the next epoch after 10 shards land, with the watched index and with a rescan.

    python tools/bench_resolve.py                 # 1k and 10k shards
    python tools/bench_resolve.py --large         # also 100k shards (about a minute to generate)
    python tools/bench_resolve.py --sizes 500     # any sizes

For each directory size it prints, in milliseconds (median of --reps runs):
  resolve   the snapshot alone: DirectoryIndex.snapshot() vs Resolver.resolve() (a rescan);
            "watch/now" right after the renames, "watch/bg" once the background indexer caught up
  set_epoch RefreshingWebDataset.set_epoch(), which also loads the previous snapshot and writes
            the new one to the state directory (pickle), with watch=True vs watch=False
Shards are tiny (one 16-byte sample) so the numbers are per-file costs, not bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import wdsrefresh as wr  # noqa: E402
from wdsrefresh.probe import Readiness  # noqa: E402
from wdsrefresh.resolver import Resolver  # noqa: E402
from wdsrefresh.sources import DirectorySource  # noqa: E402
from wdsrefresh.index import DirectoryIndex  # noqa: E402


def tiny_tar(key: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(f"{key}.bin")
        info.size = 16
        info.mtime = 1700000000
        tar.addfile(info, io.BytesIO(b"x" * 16))
    return buf.getvalue()[: 512 + 512 + 1024]  # header, data, end-of-archive (no record padding)


def populate(directory: str, n: int) -> None:
    data = tiny_tar("sample")
    for i in range(n):
        with open(os.path.join(directory, f"shard-{i:07d}.tar"), "wb") as f:
            f.write(data)


def drop(directory: str, names: list[str]) -> None:
    data = tiny_tar("new")
    for name in names:
        tmp = os.path.join(directory, f"_tmp.{name}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, name))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def bench(n: int, reps: int, base: str | None) -> dict:
    directory = tempfile.mkdtemp(prefix=f"bench-resolve-{n}-", dir=base)
    try:
        t = time.perf_counter()
        populate(directory, n)
        gen = time.perf_counter() - t
        source = DirectorySource(directory)
        counter = iter(range(10**9))
        fresh = lambda: [f"new-{next(counter):07d}.tar" for _ in range(10)]  # noqa: E731

        resolver = Resolver(source, Readiness(settle=0))  # files written whole: index them
        t = time.perf_counter()
        snap = resolver.resolve(0)
        first_rescan = time.perf_counter() - t
        index = DirectoryIndex(source, rules=Readiness(settle=0))
        t = time.perf_counter()
        snap_w = index.snapshot(0)
        first_watch = time.perf_counter() - t
        assert snap_w.id == snap.id, "watched index and rescan disagree"

        rescan, watch_now, watch_bg = [], [], []
        for epoch in range(1, reps + 1):
            drop(directory, fresh())
            t = time.perf_counter()
            snap_w = index.snapshot(epoch)
            watch_now.append(time.perf_counter() - t)
            t = time.perf_counter()
            snap = resolver.resolve(epoch)
            rescan.append(time.perf_counter() - t)
            assert snap_w.id == snap.id and len(snap.shards) == n + 10 * epoch
        for epoch in range(reps + 1, 2 * reps + 1):
            drop(directory, fresh())
            deadline = time.monotonic() + 10
            while index.counts()[0] < n + 10 * epoch and time.monotonic() < deadline:
                time.sleep(0.005)
            t = time.perf_counter()
            snap_w = index.snapshot(epoch)
            watch_bg.append(time.perf_counter() - t)
            assert len(snap_w.shards) == n + 10 * epoch
        index.close()

        set_epoch = {}
        for watch in (True, False):
            ds = wr.RefreshingWebDataset(directory, watch=watch, settle=0)  # files written whole: index them
            ds.set_epoch(0)
            times = []
            for epoch in range(1, reps + 1):
                drop(directory, fresh())
                t = time.perf_counter()
                ds.set_epoch(epoch)
                times.append(time.perf_counter() - t)
            set_epoch[watch] = statistics.median(times)
            ds.close()
        med = statistics.median
        return {
            "n": n, "generate": gen, "first_rescan": first_rescan, "first_watch": first_watch,
            "rescan": med(rescan), "watch_now": med(watch_now), "watch_bg": med(watch_bg),
            "set_epoch_watch": set_epoch[True], "set_epoch_rescan": set_epoch[False],
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--large", action="store_true", help="also 100k shards")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to create the shard directories (default: $TMPDIR)")
    args = parser.parse_args()
    sizes = args.sizes + ([100000] if args.large else [])
    print("resolve the next epoch after adding 10 shards (ms, median of %d)" % args.reps)
    print(f"{'shards':>8} {'rescan':>9} {'watch/now':>9} {'watch/bg':>9} | {'set_epoch':>9} {'set_epoch':>9} "
          f"| {'first':>9} {'first':>9}")
    print(f"{'':>8} {'':>9} {'':>9} {'':>9} | {'watch':>9} {'rescan':>9} | {'rescan':>9} {'watch':>9}")
    for n in sizes:
        r = bench(n, args.reps, args.dir)
        print(f"{n:>8} {ms(r['rescan'])} {ms(r['watch_now'])} {ms(r['watch_bg'])} | "
              f"{ms(r['set_epoch_watch'])} {ms(r['set_epoch_rescan'])} | {ms(r['first_rescan'])} "
              f"{ms(r['first_watch'])}   (generated in {r['generate']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

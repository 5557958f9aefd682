"""Snapshot resolution at scale: first index, restarts, and the next epoch after shards land.

    python tools/bench_resolve.py                  # 1k and 10k shards
    python tools/bench_resolve.py --large          # also 100k shards (about a minute to generate)
    python tools/bench_resolve.py --sizes 1000000  # any sizes; 1M writes 1M files (4 GB on disk)

Two tables. The first, per directory size (seconds; the issue 17 targets are at 100k):
  read files      open, read and close every shard, no parsing (warm page cache): the floor
  first/files     the first set_epoch of a new dataset on a directory without a manifest
                  (every shard indexed; index cache off)
  first/manifest  the same on a directory whose manifest.json lists every shard
  restart         the first set_epoch of a new dataset (a restarted job) on unchanged shards
                  without a manifest, with the persistent index cache a first job filled
  unchanged       set_epoch with the watcher when nothing changed (median of --reps)
  epoch start     a consumer in a fresh (spawned) process: from iter(ds) to its first sample,
                  the snapshot loaded and its share computed, as a DataLoader worker does
  memory          the peak resident size of this process after the size (MB)
The second, in milliseconds (median of --reps runs), the next epoch after 10 shards were added:
  resolve   the snapshot alone: DirectoryIndex.snapshot() vs Resolver.resolve() (a rescan);
            "watch/now" right after the renames, "watch/bg" once the background indexer caught up
  set_epoch RefreshingWebDataset.set_epoch(), which also loads the previous snapshot and writes
            the new one to the state directory, with watch=True vs watch=False
Shards are tiny (one 16-byte sample) so the numbers are per-file costs, not bytes.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import wdsrefresh as wr  # noqa: E402
from wdsrefresh.core.options import Readiness  # noqa: E402
from wdsrefresh.storage.resolver import Resolver  # noqa: E402
from wdsrefresh.storage.local.sources import DirectorySource  # noqa: E402
from wdsrefresh.format import manifest  # noqa: E402
from wdsrefresh.format.tario import index_shard  # noqa: E402
from wdsrefresh.storage.local.directory import DirectoryIndex  # noqa: E402

SCALE_FORMAT = 1


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


# --------------------------------------------------------------------------- scale


def ensure_scale_dirs(root: str, n: int) -> tuple[str, str]:
    """Two directories of the same ``n`` one-sample shards (hard links), made once under ``root``:
    one without a manifest, one whose manifest.json lists every shard."""
    plain, listed = os.path.join(root, f"tiny-{n}"), os.path.join(root, f"tiny-{n}-manifest")
    marker = os.path.join(listed, ".complete")
    if os.path.exists(marker) and open(marker).read() == str(SCALE_FORMAT):
        return plain, listed
    for d in (plain, listed):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    print(f"generating {n:,} shards in {plain} and {listed} ...", file=sys.stderr, flush=True)
    populate(plain, n)
    first = os.path.join(plain, "shard-0000000.tar")
    index = index_shard(first)
    entries = []
    for name in sorted(os.listdir(plain)):
        os.link(os.path.join(plain, name), os.path.join(listed, name))
        st = os.stat(os.path.join(listed, name))
        entries.append(manifest.ManifestEntry(name, index.nsamples, st.st_size, index.digest, index.blocks,
                                              st.st_mtime_ns))
    manifest.save(os.path.join(listed, manifest.DEFAULT_NAME), entries)
    with open(marker, "w") as f:
        f.write(str(SCALE_FORMAT))
    return plain, listed


def read_files(directory: str) -> float:
    """Seconds to open, read and close every shard of ``directory`` (no parsing)."""
    names = sorted(os.listdir(directory))
    t = time.perf_counter()
    for name in names:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        while os.read(fd, 1 << 20):
            pass
        os.close(fd)
    return time.perf_counter() - t


def _dataset(directory: str, state_root: str, index_cache) -> wr.RefreshingWebDataset:
    # settle=0: the shards were written whole, maybe seconds ago
    return wr.RefreshingWebDataset(directory, watch=True, settle=0, shardshuffle=False, index_cache=index_cache,
                                   state_dir=tempfile.mkdtemp(dir=state_root))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def first_set_epoch(directory: str, state_root: str, index_cache,
                    cpu: dict | None = None, key: str = "") -> tuple[float, wr.RefreshingWebDataset]:
    """Seconds the first set_epoch of a new dataset takes (and the CPU seconds in ``cpu[key]``)."""
    ds = _dataset(directory, state_root, index_cache)
    t, c = time.perf_counter(), _cpu_seconds()
    ds.set_epoch(0)
    if cpu is not None:
        cpu[key] = _cpu_seconds() - c  # this process alone: what other load on the machine cannot inflate much
    return time.perf_counter() - t, ds


def _first_sample_seconds(ds, queue) -> None:
    started = time.perf_counter()
    next(iter(ds))
    queue.put(time.perf_counter() - started)


def epoch_start(ds) -> float:
    """Seconds from iter(ds) to the first sample in a spawned process, as in a DataLoader worker."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_first_sample_seconds, args=(ds, queue))
    child.start()
    try:
        return queue.get(timeout=600)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def scale_figures(root: str, n: int, state_root: str, reps: int = 3) -> dict:
    """The issue 17 scale figures on ``n`` one-sample shards (seconds), see the module doc."""
    plain, listed = ensure_scale_dirs(str(root), n)
    figures: dict = {"shards": n}
    figures["read_files"] = min(read_files(plain) for _ in range(2))  # the second: warm page cache
    print(f"  {n:,} shards: read in {figures['read_files']:.2f} s; indexing ...", file=sys.stderr, flush=True)
    cpu: dict = {}
    for key, directory in (("first_files", plain), ("first_manifest", listed)):
        seconds, ds = first_set_epoch(directory, state_root, False, cpu, key)
        ds.close()
        figures[key] = seconds
    cache = tempfile.mkdtemp(prefix="index-cache-", dir=state_root)
    _, ds = first_set_epoch(plain, state_root, index_cache=cache)  # the first job fills the cache
    ds.close()
    figures["restart"], ds = first_set_epoch(plain, state_root, cache, cpu, "restart")
    try:
        unchanged = []
        for epoch in range(1, reps + 1):
            t = time.perf_counter()
            ds.set_epoch(epoch)
            unchanged.append(time.perf_counter() - t)
        figures["set_epoch_unchanged"] = statistics.median(unchanged)
        starts = []
        for epoch in range(reps + 1, 2 * reps + 1):  # each consumer reads a published epoch, as workers do
            ds.set_epoch(epoch)
            starts.append(epoch_start(ds))
        figures["epoch_start"] = statistics.median(starts)
    finally:
        ds.close()
    figures["memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures.update((f"{key}_cpu", seconds) for key, seconds in cpu.items())
    print(f"  {n:,} shards: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float)),
          file=sys.stderr, flush=True)
    return figures


def print_scale(sizes: list[int], root: str, reps: int) -> None:
    print("scale: seconds (memory: peak resident MB of this process; cpu: CPU seconds of this process)")
    columns = ("read_files", "first_files", "first_manifest", "restart", "set_epoch_unchanged", "epoch_start",
               "first_files_cpu", "first_manifest_cpu", "restart_cpu")
    heads = ("read files", "first/files", "first/manif.", "restart", "unchanged", "epoch start", "cpu files",
             "cpu manif.", "cpu restart")
    print(f"{'shards':>8} " + " ".join(f"{h:>12}" for h in heads) + f" {'memory':>8}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-state-") as state_root:
        for n in sizes:
            f = scale_figures(root, n, state_root, reps)
            print(f"{n:>8} " + " ".join(f"{f[c]:>12.3f}" for c in columns) + f" {f['memory_mb']:>8.0f}", flush=True)


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
    parser.add_argument("--data", default="bench_data",
                        help="where the scale table's directories are generated once and reused (default: %(default)s)")
    parser.add_argument("--no-growth", action="store_true", help="only the scale table")
    args = parser.parse_args()
    sizes = args.sizes + ([100000] if args.large else [])
    print_scale(sizes, args.data, min(args.reps, 3))
    if args.no_growth:
        return
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

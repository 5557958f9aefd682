#!/usr/bin/env python
"""Read speed of wdsrefresh against webdataset 1.0.2, on the same shards, in the same run.

Generates shards once into a directory (default ./bench_data, reused when present):

- ``small-pax``:   1 KiB samples (a 1 KiB ``bin`` and a 1-byte ``cls`` member) written by
                   ``webdataset.TarWriter`` with its default float mtime, which puts a PAX
                   header before every member;
- ``small-plain``: the same samples with an integer mtime: plain ustar headers, as the packer
                   writes them;
- ``large``:       256 KiB samples, plain headers.

For each set it times ``webdataset.WebDataset(urls, shardshuffle=False)`` and
``wdsrefresh.RefreshingWebDataset(dir, shardshuffle=False, verify=...)`` for ``verify`` in
``inline`` and ``off``: in one process, and through a torch DataLoader with 2 workers and
batching. The snapshot is resolved (``set_epoch``) before the clock starts; resolution is
measured on its own, on directories of 1k, 10k (and optionally 100k) one-sample shards: cold
(every shard indexed and digested) and warm (the next epoch, nothing changed).

The readers take turns: after one untimed warm-up pass each (page cache warm, the
DataLoader's persistent workers started), each round gives every reader in turn at least
``--min-time`` seconds of passes, and a reader's rate is its median over ``--repeat`` rounds,
so load from other processes falls on all readers alike. MB/s counts payload bytes (the members' contents), the same
number for every reader. For the 256 KiB set it also prints what ``os.pread`` alone reaches
over the same files: no reader that copies the bytes out of the page cache can beat it.

    .venv/bin/python tools/bench.py            # full run, a few minutes
    .venv/bin/python tools/bench.py --quick    # smaller sets, under a minute
    .venv/bin/python tools/bench.py --remote   # the same shards from an S3 server on 127.0.0.1
    .venv/bin/python tools/bench.py --pack     # packing speed: pack --jobs 1/2 vs ShardWriter
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402

import wdsrefresh as wr  # noqa: E402

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardSet:
    name: str
    describe: str
    payload: int  # bytes of the "bin" member
    pax: bool
    shards: int
    samples_per_shard: int

    def directory(self, root: Path) -> Path:
        return root / f"{self.name}-{self.shards}x{self.samples_per_shard}"

    @property
    def samples(self) -> int:
        return self.shards * self.samples_per_shard

    @property
    def payload_bytes(self) -> int:
        return self.samples * (self.payload + 1)


def shard_sets(quick: bool) -> list[ShardSet]:
    """About 190 MB in all (30 MB with --quick)."""
    shards, small, large = (2, 1500, 16) if quick else (4, 5000, 48)
    return [
        ShardSet("small-pax", "1 KiB, PAX headers", 1024, True, shards, small),
        ShardSet("small-plain", "1 KiB, plain headers", 1024, False, shards, small),
        ShardSet("large", "256 KiB, plain headers", 256 << 10, False, shards, large),
    ]


# --------------------------------------------------------------------------- generation


def _payload(i: int, size: int) -> bytes:
    seed = f"{i:08d}".encode()
    return (seed * (size // len(seed) + 1))[:size]


def write_shard(path: Path, first: int, count: int, size: int, pax: bool) -> None:
    """One shard through webdataset's TarWriter; a float mtime makes it write PAX headers."""
    tmp = path.with_name("_tmp." + path.name)
    mtime = None if pax else 1_700_000_000
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=mtime) as writer:
        for i in range(first, first + count):
            writer.write({"__key__": f"s{i:09d}", "bin": _payload(i, size), "cls": str(i % 10).encode()})
    os.replace(tmp, path)


def ensure_set(root: Path, spec: ShardSet) -> list[str]:
    """The shard paths of ``spec``, generated unless a complete earlier generation is there."""
    directory = spec.directory(root)
    marker = directory / ".complete"
    paths = [directory / f"shard-{i:05d}.tar" for i in range(spec.shards)]
    if not (marker.exists() and json.loads(marker.read_text()) == FORMAT_VERSION):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        print(f"generating {directory} ...", file=sys.stderr, flush=True)
        for i, path in enumerate(paths):
            write_shard(path, i * spec.samples_per_shard, spec.samples_per_shard, spec.payload, spec.pax)
        marker.write_text(json.dumps(FORMAT_VERSION))
    return [str(p) for p in paths]


def tiny_shard_bytes() -> bytes:
    """A one-sample tar cut right after its end-of-archive marker (2 KiB, no record padding)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("s000000000.cls")
        info.size = 1
        info.mtime = 1_700_000_000
        tar.addfile(info, io.BytesIO(b"1"))
    return buf.getvalue()[: 512 * 4]


def ensure_tiny(root: Path, count: int) -> Path:
    directory = root / f"tiny-{count}"
    marker = directory / ".complete"
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        print(f"generating {directory} ...", file=sys.stderr, flush=True)
        data = tiny_shard_bytes()
        for i in range(count):
            with open(directory / f"t-{i:06d}.tar", "wb") as f:
                f.write(data)
        marker.write_text(json.dumps(FORMAT_VERSION))
    return directory


# --------------------------------------------------------------------------- readers


class Refreshing:
    """RefreshingWebDataset; each pass's snapshot is resolved (set_epoch) before the clock starts."""

    def __init__(self, directory: str, verify: str, state_dir: str):
        # settle=0: the shards were written whole (maybe just now, in place): read them at once
        self.ds = wr.RefreshingWebDataset(directory, shardshuffle=False, verify=verify, watch=False,
                                          state_dir=state_dir, settle=0)
        self.epoch = 0

    def prepare(self) -> None:
        self.ds.set_epoch(self.epoch)
        self.epoch += 1


class Plain:
    """webdataset.WebDataset over the same shards."""

    def __init__(self, urls: list[str]):
        self.ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)

    def prepare(self) -> None:
        pass


class ReaderAlone:
    """wdsrefresh's tar reader without the dataset layer: open_shard(...).samples() per shard,
    checked against the block digests (verify inline), samples dropped as they come."""

    def __init__(self, urls: list[str]):
        from wdsrefresh.format.tario import Expected, index_shard, open_shard

        self.open_shard = open_shard
        self.shards = []
        for url in urls:
            st = os.stat(url)
            index = index_shard(url)
            self.shards.append((url, Expected(st.st_size, st.st_mtime_ns, st.st_ino, index.digest, index.blocks)))
        self.ds = self

    def prepare(self) -> None:
        pass

    def __iter__(self):
        for url, expected in self.shards:
            reader, fd = self.open_shard(url, url, expected)
            try:
                yield from reader.samples()
            finally:
                os.close(fd)


def one_process(reader):
    def one_pass() -> int:
        n = 0
        for _ in reader.ds:
            n += 1
        return n

    return one_pass, lambda: None


def data_loader(reader, workers: int, batch: int):
    """A DataLoader with persistent workers, so passes after the first time reading, not forking."""
    import torch.utils.data

    loader = torch.utils.data.DataLoader(reader.ds.to_tuple("bin", "cls").batched(batch), batch_size=None,
                                         num_workers=workers, persistent_workers=True)

    def one_pass() -> int:
        return sum(len(b[0]) for b in loader)

    def close() -> None:
        loader._iterator = None  # lets the persistent workers exit

    return one_pass, close


def interleaved_rates(readers, expected: int, rounds: int, round_time: float) -> list[tuple[float, int]]:
    """Samples per second of each reader: the median over ``rounds`` rounds.

    After one untimed warm-up pass each (page cache, worker start), every round gives each
    reader in turn at least ``round_time`` seconds of passes, so load from other processes on
    the machine falls on all readers alike rather than on whichever ran at the wrong moment.
    """
    per_round: list[list[float]] = [[] for _ in readers]
    passes = [0] * len(readers)
    for round_no in range(rounds + 1):
        for i, (reader, one_pass) in enumerate(readers):
            count_total, seconds = 0, 0.0
            while True:
                reader.prepare()
                gc.collect()
                t0 = time.perf_counter()
                count = one_pass()
                seconds += time.perf_counter() - t0
                if count != expected:
                    raise SystemExit(f"a pass yielded {count} samples, expected {expected}")
                count_total += count
                if round_no == 0 or seconds >= round_time:
                    break
            if round_no:
                per_round[i].append(count_total / seconds)
                passes[i] += count_total // expected
    return [(statistics.median(rates), n) for rates, n in zip(per_round, passes)]


@dataclass
class Row:
    shard_set: str
    mode: str
    reader: str
    rate: float
    passes: int
    mbps: float


def bench_set(root: Path, spec: ShardSet, args, state_root: str) -> list[Row]:
    urls = ensure_set(root, spec)
    directory = str(spec.directory(root))
    modes = [("1 proc", one_process)]
    if args.workers > 0:
        modes.append((f"loader {args.workers}w b{args.batch}",
                      lambda reader: data_loader(reader, args.workers, args.batch)))
    rows = []
    for mode, wrap in modes:
        readers = [("webdataset", Plain(urls))]
        readers += [(f"wdsrefresh {verify}", Refreshing(directory, verify, tempfile.mkdtemp(dir=state_root)))
                    for verify in ("inline", "off")]
        if mode == "1 proc":
            readers.append(("(tario alone, inline)", ReaderAlone(urls)))
        wrapped = [wrap(reader) for _, reader in readers]
        try:
            rates = interleaved_rates([(reader, one_pass) for (_, reader), (one_pass, _) in zip(readers, wrapped)],
                                      spec.samples, args.repeat, args.min_time)
        finally:
            for _, close in wrapped:
                close()
        for (name, _), (rate, passes) in zip(readers, rates):
            rows.append(Row(spec.name, mode, name, rate, passes, rate * spec.payload_bytes / spec.samples / 1e6))
            print(f"  {spec.name:12s} {mode:16s} {name:22s} {rate:12,.0f} samples/s ({passes} passes)",
                  file=sys.stderr, flush=True)
    return rows


def bench_resolution(root: Path, sizes: list[int], state_root: str) -> list[tuple[int, float, float]]:
    results = []
    for count in sizes:
        directory = ensure_tiny(root, count)
        ds = wr.RefreshingWebDataset(str(directory), shardshuffle=False, verify="inline", watch=False,
                                     state_dir=tempfile.mkdtemp(dir=state_root), settle=0)
        t0 = time.perf_counter()
        snap = ds.set_epoch(0)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds.set_epoch(1)
        warm = time.perf_counter() - t0
        if len(snap.shards) != count:
            raise SystemExit(f"resolution of {directory}: {len(snap.shards)} shards, expected {count}")
        results.append((count, cold, warm))
        print(f"  resolve {count:>7,} shards: cold {cold:.2f} s, warm {warm:.2f} s", file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------- report


def pread_ceiling(root: Path, spec: ShardSet) -> float:
    """MB/s of payload that os.pread alone reaches over the shards (256 KiB reads, no parsing)."""
    paths = ensure_set(root, spec)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            offset = 0
            while data := os.pread(fd, 256 << 10, offset):
                offset += len(data)
            os.close(fd)
        best = min(best, time.perf_counter() - t0)
    return spec.payload_bytes / best / 1e6


def report(rows: list[Row], specs: list[ShardSet], resolution, ceilings: dict[str, float], args) -> str:
    import platform

    import torch

    lines = [
        f"wdsrefresh {wr.__version__} vs webdataset {wds.__version__}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; readers interleaved, median of "
        f"{args.repeat} rounds, warm page cache{'; --quick' if args.quick else ''}",
        "",
        "| shards | mode | reader | samples/s | MB/s | x webdataset |",
        "|---|---|---|---:|---:|---:|",
    ]
    base = {(r.shard_set, r.mode): r for r in rows if r.reader == "webdataset"}
    described = {s.name: f"{s.describe} ({s.shards}x{s.samples_per_shard})" for s in specs}
    for r in rows:
        ratio = r.rate / base[(r.shard_set, r.mode)].rate
        lines.append(f"| {described[r.shard_set]} | {r.mode} | {r.reader} | {r.rate:,.0f} | {r.mbps:,.0f} | "
                     f"{ratio:.1f}x |")
    lines += ["", "| shards | mode | inline digest overhead vs verify=off |", "|---|---|---:|"]
    by_key = {(r.shard_set, r.mode, r.reader): r for r in rows}
    for name, mode in base:
        inline, off = by_key[(name, mode, "wdsrefresh inline")], by_key[(name, mode, "wdsrefresh off")]
        lines.append(f"| {described[name]} | {mode} | {off.rate / inline.rate - 1:+.1%} |")
    if ceilings:
        lines += ["", "| shards | os.pread alone, no parsing (the ceiling of any reader here) |", "|---|---:|"]
        lines += [f"| {described[name]} | {mbps:,.0f} MB/s |" for name, mbps in ceilings.items()]
    if resolution:
        lines += ["", "| one-sample shards in the directory | first set_epoch (stat, index, digest each) "
                  "| next set_epoch (nothing changed) |", "|---:|---:|---:|"]
        lines += [f"| {count:,} | {cold:.2f} s | {warm:.2f} s |" for count, cold, warm in resolution]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="bench_data",
                        help="where shards are generated, and reused on later runs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller shard sets, shorter timing, resolution of 1k shards only (under 60 s)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed rounds; each reader's rate is its median over them (default: 5; quick: 3)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds each reader reads in each round, at least one pass (default: 0.3; quick: 0.1)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers; 0 skips the DataLoader runs (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="batch size in the DataLoader runs (default: %(default)s)")
    parser.add_argument("--sets", default=None, help="a comma-separated subset of: small-pax,small-plain,large")
    parser.add_argument("--resolve-sizes", default=None,
                        help="shard counts to time snapshot resolution on, e.g. 1000,10000,100000 (100k writes "
                             "100k files, about 400 MB on disk); empty to skip (default: 1000,10000; quick: 1000)")
    parser.add_argument("--remote", action="store_true",
                        help="read from an S3 server on 127.0.0.1 instead (tools/bench_remote.py; boto3, moto[server])")
    parser.add_argument("--pack", action="store_true",
                        help="time packing instead: wdsrefresh pack --jobs 1 and 2 against webdataset's ShardWriter "
                             "on the same input files (tools/bench_pack.py)")
    args = parser.parse_args(argv)
    if args.min_time is None:
        args.min_time = 0.1 if args.quick else 0.3
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.remote:
        from bench_remote import run_remote

        return run_remote(args)
    if args.pack:
        from bench_pack import run_pack_bench

        return run_pack_bench(args)
    if args.resolve_sizes is None:
        args.resolve_sizes = "1000" if args.quick else "1000,10000"
    sizes = [int(s) for s in args.resolve_sizes.split(",") if s.strip()]
    specs = shard_sets(args.quick)
    if args.sets:
        wanted = set(args.sets.split(","))
        specs = [s for s in specs if s.name in wanted]

    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wdsrefresh-bench-") as state_root:
        rows = []
        for spec in specs:
            rows += bench_set(root, spec, args, state_root)
        ceilings = {spec.name: pread_ceiling(root, spec) for spec in specs if spec.name == "large"}
        resolution = bench_resolution(root, sizes, state_root) if sizes else []
    print(report(rows, specs, resolution, ceilings, args))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Read speed of wdsrefresh against webdataset 1.0.2 and against the floors, in one run.

Generates shards once into a directory (default ./bench_data, reused when present):

- ``small-pax``:   1 KiB samples of 3 members, like image + label + metadata (a 1 KiB ``jpg``,
                   a 1-byte ``cls``, a ~60-byte ``json``), written by ``webdataset.TarWriter``
                   with its default float mtime, which puts a PAX header before every member;
- ``small-plain``: the same samples with an integer mtime: plain ustar headers, as the packer
                   writes them;
- ``large``:       256 KiB samples (a 256 KiB ``bin`` and a 1-byte ``cls``), plain headers.

For each set it times, in one process: ``webdataset.WebDataset(urls, shardshuffle=False)``,
``wdsrefresh.RefreshingWebDataset(dir, shardshuffle=False, verify=...)`` for ``verify`` in
``inline`` and ``off``, tario's reader alone, and two floors: the "bare walker" (a minimal
pure-Python loop over the same bytes that walks tar headers and slices payloads to ``bytes``:
what any pure-Python reader must at least do) and ``os.pread`` of the files in 1 MiB reads
(no parsing at all). Through a torch DataLoader with 2 workers and batches of 64 it times
webdataset's default collation and wdsrefresh's, plain and with ``wr.collate_tensors``.

Scale (``--scale``, default 100000 one-sample shards, generated once): ``set_epoch`` with the
watcher when nothing changed, a worker's epoch start, the first index with and without a
manifest (against reading the files), and the first ``set_epoch`` of a restart on unchanged
shards (the persistent index cache). ``tools/bench_resolve.py`` prints more of these.

The readers take turns: after one untimed warm-up pass each (page cache warm, the
DataLoader's persistent workers started), each round gives every reader in turn, the floors
included, at least ``--min-time`` seconds of passes, and a reader's rate is its median over
``--repeat`` rounds, so load from other processes falls on all readers alike. MB/s counts
payload bytes (the members' contents), the same number for every reader. The TARGETS table
at the end states each target of issue 17 as a ratio measured in this run, PASS or MISS, and
issue 25's: the same 1 KiB plain samples read as a mix of two sources (the shards halved,
each sample once) against one source.

    .venv/bin/python tools/bench.py              # full run, about 8 minutes here
    .venv/bin/python tools/bench.py --quick      # smaller sets, 10k-shard scale, about 2 minutes
    .venv/bin/python tools/bench.py --scale 1000000   # the scale rows at 1M shards (slow: 4 GB of files)
    .venv/bin/python tools/bench.py --remote     # the same shards from an S3 server on 127.0.0.1
    .venv/bin/python tools/bench.py --pack       # packing speed: pack --jobs 1/2 vs ShardWriter
    .venv/bin/python tools/bench.py --peers      # LitData on the same samples (its own venv, made once)
    .venv/bin/python tools/bench.py --base main  # HEAD / main, paired per row (main's worktree, made once)
    .venv/bin/python tools/bench.py --base main --aa   # main against itself: the noise of those ratios
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
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import webdataset as wds  # noqa: E402

import wdsrefresh as wr  # noqa: E402

FORMAT_VERSION = 2


@dataclass(frozen=True)
class ShardSet:
    name: str
    describe: str
    members: tuple[tuple[str, int], ...]  # (extension, payload bytes) of each sample
    pax: bool
    shards: int
    samples_per_shard: int

    def directory(self, root: Path) -> Path:
        return root / f"{self.name}-{self.shards}x{self.samples_per_shard}"

    @property
    def samples(self) -> int:
        return self.shards * self.samples_per_shard

    @property
    def extensions(self) -> tuple[str, ...]:
        return tuple(ext for ext, _ in self.members)

    @property
    def payload_bytes(self) -> int:
        return self.samples * sum(size for _, size in self.members)


SMALL_MEMBERS = (("jpg", 1024), ("cls", 1), ("json", 60))
LARGE_MEMBERS = (("bin", 256 << 10), ("cls", 1))


def shard_sets(quick: bool) -> list[ShardSet]:
    """About 200 MB in all (60 MB with --quick)."""
    shards, small, large = (2, 1500, 16) if quick else (4, 2500, 48)
    return [
        ShardSet("small-pax", "1 KiB x3 members, PAX", SMALL_MEMBERS, True, shards, small),
        ShardSet("small-plain", "1 KiB x3 members, plain", SMALL_MEMBERS, False, shards, small),
        ShardSet("large", "256 KiB, plain", LARGE_MEMBERS, False, shards, large),
    ]


# --------------------------------------------------------------------------- generation


def _payload(i: int, size: int) -> bytes:
    seed = f"{i:08d}".encode()
    return (seed * (size // len(seed) + 1))[:size]


def _sample(i: int, members: tuple[tuple[str, int], ...]) -> dict:
    sample = {"__key__": f"s{i:09d}"}
    for ext, size in members:
        if ext == "cls":
            sample[ext] = str(i % 10).encode()[:size]
        elif ext == "json":
            sample[ext] = json.dumps({"id": i, "w": 640, "h": 480, "src": "bench"}).encode().ljust(size)[:size]
        else:
            sample[ext] = _payload(i, size)
    return sample


def write_shard(path: Path, first: int, count: int, spec: ShardSet) -> None:
    """One shard through webdataset's TarWriter; a float mtime makes it write PAX headers."""
    tmp = path.with_name("_tmp." + path.name)
    mtime = None if spec.pax else 1_700_000_000
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=mtime) as writer:
        for i in range(first, first + count):
            writer.write(_sample(i, spec.members))
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
            write_shard(path, i * spec.samples_per_shard, spec.samples_per_shard, spec)
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


# --------------------------------------------------------------------------- readers


class Refreshing:
    """RefreshingWebDataset; each pass's snapshot is resolved (set_epoch) before the clock starts."""

    def __init__(self, directory, verify: str, state_dir: str, **options):
        # settle=0: the shards were written whole (maybe just now, in place): read them at once
        self.ds = wr.RefreshingWebDataset(directory, shardshuffle=False, verify=verify, watch=False,
                                          state_dir=state_dir, settle=0, **options)
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


BARE_CHUNK = 1 << 20
_REGULAR_TYPES = (48, 0)  # b"0", and b"\0" of old tars


def bare_walk(path: str) -> Iterator[dict]:
    """The floor of any pure-Python tar reader: walks the headers of the file in 1 MiB reads,
    slices each payload to ``bytes`` (a payload past the chunk is read on its own) and groups
    members by key into webdataset-like dicts. Checks nothing: no checksum, no bounds, no digest."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf, base, p = b"", 0, 0
        key = sample = None
        while True:
            if p + 512 > len(buf):
                base += p
                buf, p = os.pread(fd, BARE_CHUNK, base), 0
            if len(buf) < 512 or buf[p] == 0:
                break
            size = int(buf[p + 124 : p + 135], 8)
            kind = buf[p + 156]
            start = p + 512
            p = start + ((size + 511) & -512)
            if kind not in _REGULAR_TYPES:  # PAX headers and the like: skipped
                continue
            z = buf.find(b"\0", start - 512, start - 412)
            member_key, _, ext = buf[start - 512 : z if z >= 0 else start - 412].partition(b".")
            data = buf[start : start + size] if start + size <= len(buf) else os.pread(fd, size, base + start)
            if member_key != key:
                if sample is not None:
                    yield sample
                key = member_key
                sample = {"__key__": member_key.decode(), "__url__": path}
            sample[ext.decode()] = data
        if sample is not None:
            yield sample
    finally:
        os.close(fd)


class BareWalker:
    """``bare_walk`` over every shard: the floor rows' reader."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.ds = self

    def prepare(self) -> None:
        pass

    def __iter__(self):
        for url in self.urls:
            yield from bare_walk(url)


class PreadFloor:
    """``os.pread`` of the shards in 1 MiB reads, no parsing; a pass counts the set's samples."""

    def __init__(self, urls: list[str], samples: int):
        self.urls = urls
        self.samples = samples

    def prepare(self) -> None:
        pass

    def one_pass(self) -> int:
        for path in self.urls:
            fd = os.open(path, os.O_RDONLY)
            offset = 0
            while data := os.pread(fd, BARE_CHUNK, offset):
                offset += len(data)
            os.close(fd)
        return self.samples


def one_process(reader):
    """(one_pass, close) of a reader in this process; a reader with its own ``one_pass`` (a floor,
    or a peer in another process: see bench_peers.py) runs its passes itself."""
    if hasattr(reader, "one_pass"):
        return reader.one_pass, getattr(reader, "close", lambda: None)

    def one_pass() -> int:
        n = 0
        for _ in reader.ds:
            n += 1
        return n

    return one_pass, lambda: None


def data_loader(reader, workers: int, batch: int, members: tuple[str, ...] = ("bin", "cls"), collate=None):
    """A DataLoader with persistent workers, so passes after the first time reading, not forking.
    ``collate``: the ``.batched()`` collation (default: the pipeline's own, webdataset's)."""
    import torch.utils.data

    pipeline = reader.ds.to_tuple(*members)
    pipeline = pipeline.batched(batch) if collate is None else pipeline.batched(batch, collation_fn=collate)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=True)

    def one_pass() -> int:
        return sum(len(b[0]) for b in loader)

    def close() -> None:
        loader._iterator = None  # lets the persistent workers exit

    return one_pass, close


def interleaved_rates(readers, expected_all: int, rounds: int, round_time: float,
                      per_round: list[list[float]] | None = None) -> list[tuple[float, int]]:
    """Samples per second of each reader: the median over ``rounds`` rounds (each round's rates
    are appended to ``per_round``, one list per reader, when given).

    After one untimed warm-up pass each (page cache, worker start), every round gives each
    reader in turn at least ``round_time`` seconds of passes, so load from other processes on
    the machine falls on all readers alike rather than on whichever ran at the wrong moment.
    """
    if per_round is None:
        per_round = []
    per_round[:] = [[] for _ in readers]
    passes = [0] * len(readers)
    for round_no in range(rounds + 1):
        for i, (reader, one_pass) in enumerate(readers):
            expected = getattr(reader, "expected", expected_all)  # a reader of a subset says how many
            count_total, seconds = 0, 0.0
            while True:
                reader.prepare()
                gc.collect()
                t0 = time.perf_counter()
                count = one_pass()
                elapsed = time.perf_counter() - t0
                # a reader that times its own passes (CPU seconds: bench_base.py --cpu) says so
                seconds += getattr(reader, "pass_seconds", None) or elapsed
                if count != expected:
                    raise SystemExit(f"a pass yielded {count} samples, expected {expected}")
                count_total += count
                if round_no == 0 or seconds >= round_time:
                    break
            if round_no:
                per_round[i].append(count_total / seconds)
                passes[i] += count_total // expected
    return [(statistics.median(rates), n) for rates, n in zip(per_round, passes)]


def rounds_of(readers: list[tuple[str, object]], expected: int, args) -> tuple[list, list[list[float]]]:
    """``interleaved_rates`` of named readers that run their own passes (``one_pass``), with
    ``args.repeat`` rounds of ``args.min_time``, and each round's rates; every reader is closed
    after."""
    per_round: list[list[float]] = []
    try:
        rates = interleaved_rates([(r, r.one_pass) for _, r in readers], expected, args.repeat, args.min_time,
                                  per_round)
    finally:
        for _, r in readers:
            getattr(r, "close", lambda: None)()
    return rates, per_round


@dataclass
class Row:
    shard_set: str
    mode: str
    reader: str
    rate: float  # the median of the rounds' rates
    passes: int
    mbps: float
    rounds: list[float]  # each round's rate, in round order: ratios are taken round by round


ONE_PROC = "1 proc"
WEBDATASET, INLINE, OFF = "webdataset", "wdsrefresh inline", "wdsrefresh off"
TENSORS = "wdsrefresh inline, collate_tensors"
CEILING, CEILING_TENSORS = "transport ceiling (ready-made batches)", "transport ceiling, collate_tensors"
CEILING_TORCH = "transport ceiling, unpacked (torch's own)"
ALONE, BARE, PREAD = "(tario alone, inline)", "bare walker (floor)", "os.pread 1 MiB (floor)"
MIXED = "wdsrefresh inline, mix of 2 sources"
MIXED_SET = "small-plain"  # the set a mix of two sources (its shards halved) is timed on


def sample_tuple(members: tuple[tuple[str, int], ...], i: int) -> tuple:
    """Sample ``i`` of a set as ``.to_tuple(*extensions)`` gives it."""
    sample = _sample(i, members)
    return tuple(sample[ext] for ext, _ in members)


def ceilings(spec: ShardSet, args) -> list[tuple]:
    """The transport ceiling rows (bench_transport.py), one per collation timed through workers."""
    from functools import partial

    from bench_transport import TransportCeiling

    make = partial(sample_tuple, spec.members)
    return [(CEILING, TransportCeiling(make, spec.samples, args.workers, args.batch), None),
            (CEILING_TORCH, TransportCeiling(make, spec.samples, args.workers, args.batch, packed=False), None),
            (CEILING_TENSORS, TransportCeiling(make, spec.samples, args.workers, args.batch, wr.collate_tensors),
             None)]


def readers_for(mode: str, spec: ShardSet, urls: list[str], directory: str, state_root: str, args) -> list[tuple]:
    """(name, reader, collate) of every reader timed in ``mode``."""
    def refreshing(verify: str, source=directory) -> Refreshing:
        return Refreshing(source, verify, tempfile.mkdtemp(dir=state_root))

    # the same samples as two named sources, each sample once (interleaved by the mix's schedule)
    mixed = [(MIXED, refreshing("inline", {"a": urls[:len(urls) // 2], "b": urls[len(urls) // 2:]}), None)] \
        if spec.name == MIXED_SET and len(urls) > 1 else []
    if mode == ONE_PROC:
        return [(WEBDATASET, Plain(urls), None), (INLINE, refreshing("inline"), None),
                (OFF, refreshing("off"), None), (ALONE, ReaderAlone(urls), None),
                (BARE, BareWalker(urls), None), (PREAD, PreadFloor(urls, spec.samples), None)] + mixed
    return [(WEBDATASET, Plain(urls), None), (INLINE, refreshing("inline"), None),
            (TENSORS, refreshing("inline"), wr.collate_tensors)] + mixed + (ceilings(spec, args) if args.ceilings else [])


def bench_set(root: Path, spec: ShardSet, args, state_root: str, choose=readers_for) -> list[Row]:
    """The rows of every reader ``choose`` (like ``readers_for``) names, modes in turn."""
    urls = ensure_set(root, spec)
    directory = str(spec.directory(root))
    modes = [ONE_PROC] + ([f"loader {args.workers}w b{args.batch}"] if args.workers > 0 else [])
    rows = []
    for mode in modes:
        readers = choose(mode, spec, urls, directory, state_root, args)
        wrapped = [one_process(reader) if mode == ONE_PROC or hasattr(reader, "one_pass")
                   else data_loader(reader, args.workers, args.batch, spec.extensions, collate)
                   for _, reader, collate in readers]
        per_round: list[list[float]] = []
        try:
            rates = interleaved_rates([(reader, one_pass) for (_, reader, _), (one_pass, _) in zip(readers, wrapped)],
                                      spec.samples, args.repeat, args.min_time, per_round)
        finally:
            for _, close in wrapped:
                close()
        for (name, _, _), (rate, passes), rounds in zip(readers, rates, per_round):
            rows.append(Row(spec.name, mode, name, rate, passes, rate * spec.payload_bytes / spec.samples / 1e6,
                            rounds))
            print(f"  {spec.name:12s} {mode:16s} {name:36s} {rate:12,.0f} samples/s ({passes} passes)",
                  file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One target of issue 17: ``value`` (a ratio, or seconds) against ``limit``."""

    what: str
    value: float
    limit: float
    at_least: bool  # True: value >= limit passes; False: value <= limit passes
    unit: str = "x"  # "x" a ratio, "%" a cost, "s" seconds

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def shown(self, value: float) -> str:
        if self.unit == "%":
            return f"{value:+.1%}"
        if self.unit == "s":
            return f"{value * 1000:,.0f} ms" if value < 1 else f"{value:.2f} s"
        return f"{value:.2f}x"


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of the rounds' ratios a / b: both readers ran in the same round, under the same load."""
    return statistics.median(x / y for x, y in zip(a, b))


def read_targets(rows: list[Row], workers_mode: str | None) -> list[Target]:
    rounds = {(r.shard_set, r.mode, r.reader): r.rounds for r in rows}
    sets = {r.shard_set for r in rows}
    targets = []

    def ratio(name, mode, a, b):
        return paired_ratio(rounds[(name, mode, a)], rounds[(name, mode, b)])

    for name, label in (("small-pax", "1 KiB x3, PAX"), ("small-plain", "1 KiB x3, plain")):
        if name not in sets:
            continue
        targets += [
            Target(f"{label}, 1 proc: inline / bare walker", ratio(name, ONE_PROC, INLINE, BARE), 0.90, True),
            Target(f"{label}, 1 proc: inline / webdataset", ratio(name, ONE_PROC, INLINE, WEBDATASET), 20, True),
            Target(f"{label}, 1 proc: inline cost (off / inline - 1)", ratio(name, ONE_PROC, OFF, INLINE) - 1,
                   0.05, False, "%"),
        ]
        if workers_mode:
            targets.append(Target(f"{label}, {workers_mode}: inline / webdataset",
                                  ratio(name, workers_mode, INLINE, WEBDATASET), 8, True))
        if name == MIXED_SET:  # issue 25: a mix costs no more than 10% of one source's speed
            for mode in [ONE_PROC] + ([workers_mode] if workers_mode else []):
                targets.append(Target(f"{label}, {mode}: mix of 2 sources / one source",
                                      ratio(name, mode, MIXED, INLINE), 0.90, True))
    if "large" in sets:
        label = "256 KiB"
        targets += [
            Target(f"{label}, 1 proc: inline cost (off / inline - 1)", ratio("large", ONE_PROC, OFF, INLINE) - 1,
                   0.25, False, "%"),
            Target(f"{label}, 1 proc: inline / webdataset", ratio("large", ONE_PROC, INLINE, WEBDATASET), 3, True),
            Target(f"{label}, 1 proc: off / bare walker", ratio("large", ONE_PROC, OFF, BARE), 0.95, True),
        ]
        if workers_mode:
            targets.append(Target(f"{label}, {workers_mode}: collate_tensors / webdataset default",
                                  ratio("large", workers_mode, TENSORS, WEBDATASET), 2.5, True))
    return targets


def transport_targets(rows: list[Row], workers_mode: str | None, litdata: str | None = None) -> list[Target]:
    """The targets of issue 26 that this run's rows measure (``litdata``: the LitData loader's
    reader name, in a ``--peers`` run)."""
    rounds = {(r.shard_set, r.mode, r.reader): r.rounds for r in rows}
    targets = []

    def add(what, name, mode, a, b, limit):
        if (name, mode, a) in rounds and (name, mode, b) in rounds:
            targets.append(Target(what, paired_ratio(rounds[(name, mode, a)], rounds[(name, mode, b)]), limit, True))

    for name, label in (("small-pax", "1 KiB x3, PAX"), ("small-plain", "1 KiB x3, plain")):
        add(f"{label}, 1 proc: inline / bare walker", name, ONE_PROC, INLINE, BARE, 0.95)
        if workers_mode and litdata:
            add(f"{label}, {workers_mode}: inline / litdata's loader", name, workers_mode, INLINE, litdata, 1.2)
    if workers_mode:
        for reader, what in ((TENSORS, "collate_tensors"), (INLINE, "default collation")):
            add(f"256 KiB, {workers_mode}: {what} / webdataset's loader", "large", workers_mode, reader, WEBDATASET,
                2.5)
            if litdata:
                add(f"256 KiB, {workers_mode}: {what} / litdata's loader", "large", workers_mode, reader, litdata, 1.5)
    return targets


def targets_table(title: str, targets: list[Target]) -> list[str]:
    lines = ["", title, "", "| target | measured | limit | |", "|---|---:|---:|---|"]
    for t in targets:
        limit = ("\u2265 " if t.at_least else "\u2264 ") + t.shown(t.limit)
        lines.append(f"| {t.what} | {t.shown(t.value)} | {limit} | {'PASS' if t.passed else 'MISS'} |")
    return lines




def scale_targets(scale: dict) -> list[Target]:
    n = f"{scale['shards']:,} shards"
    return [
        Target(f"{n}: set_epoch, watcher, nothing changed", scale["set_epoch_unchanged"], 0.100, False, "s"),
        Target(f"{n}: a worker's epoch start (snapshot loaded, share computed)", scale["epoch_start"], 0.050,
               False, "s"),
        Target(f"{n}: first index from a manifest", scale["first_manifest"], 2.0, False, "s"),
        Target(f"{n}: first index without one / reading the files", scale["first_files"] / scale["read_files"],
               2.0, False),
        Target(f"{n}: first set_epoch of a restart, no manifest (index cache)", scale["restart"], 2.0, False, "s"),
    ]


# --------------------------------------------------------------------------- report


def report(rows: list[Row], specs: list[ShardSet], targets: list[Target], scale: dict | None, args) -> str:
    import platform

    import torch

    lines = [
        f"wdsrefresh {wr.__version__} vs webdataset {wds.__version__}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; readers and floors interleaved, median of "
        f"{args.repeat} rounds (targets: median of the rounds' paired ratios), warm page cache"
        f"{'; --quick' if args.quick else ''}; load average at the end: {os.getloadavg()[0]:.1f}",
        "",
        "| shards | mode | reader | samples/s | MB/s | x webdataset | x bare walker |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    base = {(r.shard_set, r.mode): r for r in rows if r.reader == WEBDATASET}
    bare = {r.shard_set: r for r in rows if r.reader == BARE}
    described = {s.name: f"{s.describe} ({s.shards}x{s.samples_per_shard})" for s in specs}
    for r in rows:
        ratio = r.rate / base[(r.shard_set, r.mode)].rate
        floor = f"{r.rate / bare[r.shard_set].rate:.2f}" if r.mode == ONE_PROC and r.shard_set in bare else ""
        lines.append(f"| {described[r.shard_set]} | {r.mode} | {r.reader} | {r.rate:,.0f} | {r.mbps:,.0f} | "
                     f"{ratio:.1f}x | {floor} |")
    if scale:
        lines += ["", f"Scale, {scale['shards']:,} one-sample shards (seconds): " + ", ".join(
            f"{k} {v:.3f}" for k, v in scale.items() if isinstance(v, float))]
    lines += targets_table("TARGETS", targets)
    workers_mode = f"loader {args.workers}w b{args.batch}" if args.workers > 0 else None
    lines += targets_table("TARGETS (through DataLoader workers)", transport_targets(rows, workers_mode))
    return "\n".join(lines + crossing_costs(rows, specs))


def crossing_costs(rows: list[Row], specs: list[ShardSet]) -> list[str]:
    """Lines saying what crossing the worker pipe costs per sample with each collation: the inverse
    of its transport ceiling's rate (the main process's time per sample when workers only send)."""
    ceilings = [r for r in rows if r.reader.startswith("transport ceiling")]
    if not ceilings:
        return []
    described = {s.name: f"{s.describe} ({s.shards}x{s.samples_per_shard})" for s in specs}
    lines = ["", "Crossing the worker pipe (1 / transport ceiling), us per sample:", ""]
    for r in ceilings:
        lines.append(f"- {described[r.shard_set]}, {r.mode}, {r.reader}: {1e6 / r.rate:.2f} us")
    return lines


def chosen_sets(args) -> list[ShardSet]:
    """The shard sets of ``--quick`` and ``--sets``."""
    specs = shard_sets(args.quick)
    if args.sets:
        wanted = set(args.sets.split(","))
        specs = [s for s in specs if s.name in wanted]
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="bench_data",
                        help="where shards are generated, and reused on later runs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller shard sets, shorter timing, scale rows at 10k shards (about 2 minutes)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed rounds; each reader's rate is its median over them (default: 5; quick: 3)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds each reader reads in each round, at least one pass (default: 0.3; quick: 0.1)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers; 0 skips the DataLoader runs (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="batch size in the DataLoader runs (default: %(default)s)")
    parser.add_argument("--sets", default=None, help="a comma-separated subset of: small-pax,small-plain,large")
    parser.add_argument("--scale", type=int, default=None,
                        help="one-sample shards for the scale rows; 0 skips them (default: 100000, about 400 MB of "
                             "files generated once; quick: 10000)")
    parser.add_argument("--remote", action="store_true",
                        help="read from an S3 server on 127.0.0.1 instead (tools/bench_remote.py; boto3, moto[server])")
    parser.add_argument("--resolve-sizes", default=None,
                        help="with --remote: comma-separated object counts for the snapshot-resolution rows; "
                             "empty skips them (default: 10000; quick: 2000)")
    parser.add_argument("--link-sets", default=None,
                        help="with --remote: the shaped link's sets, of small-plain,large-objects ('none' skips the "
                             "shaped link; tools/bench_link.py)")
    parser.add_argument("--link-delay", type=float, default=0.025,
                        help="with --remote: the shaped link's first-byte delay per request, seconds (default: "
                             "%(default)s, +/- 5 ms)")
    parser.add_argument("--conn-rate", type=float, default=16e6,
                        help="with --remote: bytes/s per connection on the shaped link (default: 16e6)")
    parser.add_argument("--link-rate", type=float, default=160e6,
                        help="with --remote: bytes/s of the whole shaped link (default: 160e6); refused above 80%% of "
                             "the proxy's unshaped ceiling, measured first")
    parser.add_argument("--link-options", default=None,
                        help="with --remote: storage_options (JSON) of a second wdsrefresh row on the shaped link")
    parser.add_argument("--growth", type=int, default=None,
                        help="with --remote: objects of the shaped growth row (default: 10000; quick: 2000; 0 skips it)")
    parser.add_argument("--no-peers", action="store_true",
                        help="with --remote: no LitData, webdataset or Mosaic rows on the shaped link (no peers venv)")
    parser.add_argument("--pack", action="store_true",
                        help="time packing instead: wdsrefresh pack --jobs 1 and 2 against webdataset's ShardWriter "
                             "on the same input files (tools/bench_pack.py)")
    parser.add_argument("--peers", action="store_true",
                        help="instead: webdataset and wdsrefresh next to litdata.StreamingDataset on the same "
                             "samples in LitData's own format, run from a separate venv made once under --data "
                             "(tools/bench_peers.py); a table of ratios and the targets through DataLoader workers, PASS/MISS")
    parser.add_argument("--base", default=None, metavar="COMMIT",
                        help="instead: HEAD against COMMIT (a git worktree made once under --data), every reader "
                             "in a process of its own, interleaved; paired ratios HEAD / base per row "
                             "(tools/bench_base.py)")
    parser.add_argument("--aa", action="store_true", help="with --base: COMMIT against itself (the noise)")
    parser.add_argument("--cpu", action="store_true",
                        help="with --base: rates by the CPU seconds of each pass (reader and its workers), which "
                             "other jobs' load changes least, instead of the wall clock")
    args = parser.parse_args(argv)
    if args.base and (args.peers or args.pack):
        parser.error("--base pairs the rows of make bench (or, with --remote, the unshaped rows) against a commit; "
                     "it does not combine with --peers or --pack: run them one after the other")
    args.ceilings = True
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
    if args.peers:
        from bench_peers import run_peers

        return run_peers(args)
    if args.scale is None:
        args.scale = 10_000 if args.quick else 100_000
    if args.base:
        from bench_base import run_base

        return run_base(args)
    specs = chosen_sets(args)
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    workers_mode = f"loader {args.workers}w b{args.batch}" if args.workers > 0 else None
    with tempfile.TemporaryDirectory(prefix="wdsrefresh-bench-") as state_root:
        rows = []
        for spec in specs:
            rows += bench_set(root, spec, args, state_root)
        targets = read_targets(rows, workers_mode)
        scale = None
        if args.scale:
            from bench_resolve import scale_figures

            scale = scale_figures(root, args.scale, state_root)
            targets += scale_targets(scale)
    print(report(rows, specs, targets, scale, args))


if __name__ == "__main__":
    main()

"""``tools/bench.py --pack``: packing speed of ``wdsrefresh pack`` against webdataset's ``ShardWriter``.

The same input trees (generated once under ``--data``, reused) are packed, in one run, by:

- ``wdsrefresh pack --jobs 1`` and ``--jobs 2``: the command, as users run it (its time includes
  starting Python, and with ``--jobs 2`` its two worker processes): collect, plan, write each
  shard (digests while writing), fsync, rename, fragment, commit;
- ``wr.pack(jobs=1)``: the same in this process, without the command's start-up (Python, imports);
- ``webdataset ShardWriter``: the loop a webdataset user writes: walk the tree, group files into
  samples by key, read each file, ``ShardWriter.write({"__key__": ..., ext: bytes})`` (its
  defaults: float mtimes, so a PAX header before every member; no fsync);
- ``ShardWriter + fsync``: the same, then each shard fsynced, as ``pack`` does before it
  publishes a shard: the same durability, so the difference is the rest of the work.

Each packer writes into a fresh directory; packers take turns (one untimed warm-up pass each,
then ``--repeat`` rounds), a packer's rate is its median over the rounds. files/s counts input
files, MB/s their bytes; the ratio is against ShardWriter. The machine's page cache holds the
inputs after the warm-up, so this compares CPU cost, not disk speed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from wdsrefresh.format import manifest

REPO = str(Path(__file__).resolve().parents[1])
FORMAT_VERSION = 1


@dataclass(frozen=True)
class InputSet:
    name: str
    describe: str
    payload: int  # bytes of each sample's "bin" file (plus a 1-byte "cls")
    samples: int
    maxcount: int

    def directory(self, root: Path) -> Path:
        return root / f"pack-{self.name}-{self.samples}"

    @property
    def files(self) -> int:
        return 2 * self.samples

    @property
    def payload_bytes(self) -> int:
        return self.samples * (self.payload + 1)


def input_sets(quick: bool) -> list[InputSet]:
    small, large = (3000, 120) if quick else (10000, 400)
    return [
        InputSet("small", "1 KiB + 1 B files", 1024, small, 1000),
        InputSet("large", "256 KiB + 1 B files", 256 << 10, large, 50),
    ]


def ensure_inputs(root: Path, spec: InputSet) -> str:
    """A tree of ``spec.samples`` samples in 10 folders, generated unless already there."""
    directory = spec.directory(root)
    marker = directory / ".complete"
    if not (marker.exists() and json.loads(marker.read_text()) == FORMAT_VERSION):
        shutil.rmtree(directory, ignore_errors=True)
        print(f"generating {directory} ...", file=sys.stderr, flush=True)
        for i in range(spec.samples):
            folder = directory / f"d{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            seed = f"{i:08d}".encode()
            (folder / f"s{i:07d}.bin").write_bytes((seed * (spec.payload // 8 + 1))[: spec.payload])
            (folder / f"s{i:07d}.cls").write_bytes(str(i % 10).encode())
        marker.write_text(json.dumps(FORMAT_VERSION))
    return str(directory)


def pack_with_wdsrefresh(jobs: int):
    def run(src: str, out: str, spec: InputSet) -> int:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, "-m", "wdsrefresh.cli", "pack", src, "-o", out, "--maxcount",
                        str(spec.maxcount), "--jobs", str(jobs)], check=True, env=env, stdout=subprocess.DEVNULL)
        return sum(e.nsamples for e in manifest.load(os.path.join(out, "manifest.json")))

    return run


def pack_with_shardwriter(src: str, out: str, spec: InputSet) -> int:
    """What a webdataset user writes: group the tree's files by key, one write per sample."""
    samples: dict[str, dict[str, str]] = {}
    for folder, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(folder, name), src)
            key, _, ext = rel.partition(".")
            samples.setdefault(key, {})[ext] = os.path.join(folder, name)
    os.makedirs(out)
    with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=spec.maxcount, verbose=0) as sink:
        for key in sorted(samples):
            sample = {"__key__": key}
            for ext, path in samples[key].items():
                with open(path, "rb") as f:
                    sample[ext] = f.read()
            sink.write(sample)
    return len(samples)


def pack_in_process(src: str, out: str, spec: InputSet) -> int:
    import wdsrefresh as wr

    return wr.pack([src], out, maxcount=spec.maxcount, jobs=1).nsamples


def pack_with_shardwriter_fsynced(src: str, out: str, spec: InputSet) -> int:
    count = pack_with_shardwriter(src, out, spec)
    for name in sorted(os.listdir(out)):
        fd = os.open(os.path.join(out, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return count


PACKERS = [
    ("webdataset ShardWriter", pack_with_shardwriter),
    ("ShardWriter + fsync", pack_with_shardwriter_fsynced),
    ("wr.pack(jobs=1)", pack_in_process),
    ("wdsrefresh pack --jobs 1", pack_with_wdsrefresh(1)),
    ("wdsrefresh pack --jobs 2", pack_with_wdsrefresh(2)),
]


def time_packers(src: str, spec: InputSet, scratch: str, rounds: int) -> list[float]:
    """Seconds per pack of each packer: the median over ``rounds`` rounds, after a warm-up round."""
    seconds: list[list[float]] = [[] for _ in PACKERS]
    for round_no in range(rounds + 1):
        for i, (name, packer) in enumerate(PACKERS):
            out = os.path.join(scratch, f"out-{i}")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            count = packer(src, out, spec)
            took = time.perf_counter() - t0
            if count != spec.samples:
                raise SystemExit(f"{name} packed {count} samples, expected {spec.samples}")
            if round_no:
                seconds[i].append(took)
                print(f"  {spec.name:6s} {name:26s} {spec.files / took:10,.0f} files/s", file=sys.stderr, flush=True)
    return [statistics.median(s) for s in seconds]


def run_pack_bench(args) -> None:
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    rounds = args.repeat
    lines = [
        f"wdsrefresh pack vs webdataset {wds.__version__} ShardWriter; {os.cpu_count()} CPUs; packers interleaved, "
        f"median of {rounds} rounds, inputs in page cache{'; --quick' if args.quick else ''}",
        "",
        "| inputs | packer | files/s | MB/s | x ShardWriter |",
        "|---|---|---:|---:|---:|",
    ]
    for spec in input_sets(args.quick):
        src = ensure_inputs(root, spec)
        with tempfile.TemporaryDirectory(prefix="wdsrefresh-bench-pack-", dir=root) as scratch:
            seconds = time_packers(src, spec, scratch, rounds)
        base = seconds[0]
        described = f"{spec.describe} ({spec.samples} samples, {spec.maxcount}/shard)"
        for (name, _), took in zip(PACKERS, seconds):
            lines.append(f"| {described} | {name} | {spec.files / took:,.0f} | {spec.payload_bytes / took / 1e6:,.0f} "
                         f"| {base / took:.2f}x |")
    print("\n".join(lines))

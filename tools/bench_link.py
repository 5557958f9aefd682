"""``tools/bench.py --remote``, on a shaped link: the same samples read from the same store across a
loopback network shaper (tools/netshaper.py) by wdsrefresh and by the loaders users compare it with.

The shaper runs in a process of its own in front of the bench's moto server: each request's
first byte waits ``--link-delay`` (25 ms, +/- 5 ms), each connection gets ``--conn-rate`` (16 MB/s),
the whole link ``--link-rate`` (160 MB/s). Before anything is timed, the shaper's own ceiling
is measured with shaping off (16 threads of 4 MiB ranged GETs of the same objects, through it):
a link rate above 80% of that ceiling is refused, so the shaped network, not moto or the proxy,
is the bound of every row.

Shard sets: the bench's 1 KiB x3 members set, and 256 KiB samples in objects of 16 (about 4 MB,
one digest block each, the issue's layout: 24 objects, 8 with --quick). Readers, each through a
DataLoader with the bench's workers (2) and batches of 64, persistent workers:

- ``link capacity``: 16 threads of 1 MiB ranged GETs (more connections than the link needs):
  what the shaped link delivers for these objects;
- ``wdsrefresh``: ``RefreshingWebDataset("s3://bench/<set>/")`` with default options, and with
  the options of ``--link-options`` (the best found, named in the row);
- ``litdata``: ``StreamingDataset("s3://bench/<set>-litdata")`` on the same samples in LitData's
  format (tools/bench_peers.py), from the peers venv, chunks downloaded into a cache emptied
  before every pass;
- ``webdataset pipe:aws``: ``WebDataset`` over ``pipe:aws s3 cp s3://... -`` with the peers
  venv's awscli, the way its documentation reads S3;
- Mosaic streaming, when ``import streaming`` works in the peers venv (else the report says why).

Rates are object bytes per second (the same bytes for every reader); the time to first batch is
from ``iter(loader)`` (after ``set_epoch``, workers up) to the first batch. Readers take turns
in every round; ratios are medians of the rounds' paired ratios.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bench
from bench import LARGE_MEMBERS, Plain, Refreshing, ShardSet, ensure_set, rounds_of, shard_sets

import wdsrefresh as wr
from wdsrefresh.format.digest import BLOCK_SIZE

NETSHAPER = Path(__file__).resolve().with_name("netshaper.py")
CEILING_SHARE = 0.8  # the link may use at most this share of the proxy's unshaped ceiling
CEILING_THREADS = 16
CEILING_SECONDS = 1.0
LINK_THREADS = 16
PIPE_OBJECTS = 8  # objects webdataset's pipe:aws reads (each a process: seconds of start-up on a loaded machine)
RANGE_BYTES = 1 << 20  # the link-capacity reader's GETs: enough of them in flight on a few objects
BUCKET = "bench"
LINK_CAPACITY, DEFAULTS, LITDATA, PIPE_AWS = ("link capacity (16 threads of 1 MiB ranged GETs)", "wdsrefresh s3://, defaults",
                                              "litdata StreamingDataset", "webdataset pipe:aws s3 cp")


def link_sets(quick: bool) -> list[ShardSet]:
    small = next(s for s in shard_sets(quick) if s.name == "small-plain")
    return [small, ShardSet("large-objects", "256 KiB, plain", LARGE_MEMBERS, False, 8 if quick else 24, 16)]


class ShaperProcess:
    """tools/netshaper.py in front of ``upstream``, in a process of its own (its pacing never
    shares a reader's GIL); it ends when this process closes its stdin or exits."""

    def __init__(self, upstream: str, delay: float, conn_rate: float, link_rate: float):
        command = [sys.executable, str(NETSHAPER), upstream, "--delay", str(delay), "--conn-rate", str(conn_rate),
                   "--link-rate", str(link_rate)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.close()
            raise SystemExit(f"--remote: the network shaper did not start (said {self.url!r})")
        self.settings = {"delay": delay, "conn_rate": conn_rate, "link_rate": link_rate}

    def control(self, what: str = "stats", **query) -> dict:
        from netshaper import control

        return control(self.url, what, **query)

    def shaped(self, on: bool) -> None:
        self.control("set", **(self.settings if on else {"delay": 0, "conn_rate": None, "link_rate": None}))

    def close(self) -> None:
        from bench_pipe import stop

        stop(self.process, 30.0)


class ThreadedGets:
    """Ranged GETs of every 1 MiB of the objects, ``threads`` at a time: what the link delivers
    for these bytes, however few the objects."""

    def __init__(self, client, keys: list[str], samples: int, threads: int, range_bytes: int = RANGE_BYTES):
        self.client, self.samples, self.threads = client, samples, threads
        sizes = {k: client.head_object(Bucket=BUCKET, Key=k)["ContentLength"] for k in keys}
        self.ranges = [(k, start, min(start + range_bytes, size) - 1) for k, size in sizes.items()
                       for start in range(0, size, range_bytes)]
        self.size = sum(sizes.values())
        self.firsts: list[float] = []

    def prepare(self) -> None:
        pass

    def _get(self, job: tuple[str, int, int]) -> None:
        key, start, end = job
        with self.client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}")["Body"] as body:
            while body.read(1 << 20):
                pass

    def one_pass(self) -> int:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(self._get, self.ranges))
        return self.samples


class TimedLoader:
    """A bench reader (``Refreshing``, ``Plain``) through a DataLoader with persistent workers;
    each pass records the seconds from ``iter(loader)`` to its first batch."""

    def __init__(self, reader, workers: int, batch: int, members: tuple[str, ...]):
        import torch.utils.data

        self.reader = reader
        pipeline = reader.ds.to_tuple(*members).batched(batch)
        self.loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                                  persistent_workers=True)
        self.firsts: list[float] = []

    def prepare(self) -> None:
        self.reader.prepare()

    def one_pass(self) -> int:
        started = time.perf_counter()
        count = 0
        for batch in self.loader:
            if not count:
                self.firsts.append(time.perf_counter() - started)
            count += len(batch[0])
        return count

    def close(self) -> None:
        self.loader._iterator = None  # lets the persistent workers exit


class FirstTimed:
    """A reader in another process (bench_pipe.PassServer) whose answers name ``first=``: the
    seconds to its first batch, kept pass by pass."""

    def __init__(self, server):
        self.server = server
        self.firsts: list[float] = []

    def prepare(self) -> None:
        self.server.prepare()

    def one_pass(self) -> int:
        count = self.server.one_pass()
        self.firsts.append(self.server.named["first"])
        return count

    def close(self) -> None:
        self.server.close()


@dataclass
class LinkRow:
    shard_set: str
    reader: str
    rate: float  # samples/s, the median of the rounds
    mbps: float  # object bytes/s, the median of the rounds
    rounds: list[float]
    firsts: list[float] = field(default_factory=list)

    @property
    def first(self) -> float | None:
        return statistics.median(self.firsts) if self.firsts else None


@dataclass
class Link:
    """What the shaped link is: the proxy's unshaped ceiling and the shaped round trip and rate."""

    ceiling: float  # bytes/s through the proxy, shaping off
    rtt: float  # seconds, a HEAD through the shaped proxy (median)
    conn_rate: float  # bytes/s one connection reaches (median of whole-object GETs, latency taken out)

    def block_seconds(self) -> float:
        return BLOCK_SIZE / self.conn_rate


def measure_link(shaper: ShaperProcess, client, keys: list[str], link_rate: float) -> Link:
    """The ceiling (shaping off; refuses a link rate above CEILING_SHARE of it), then the shaped
    round trip and one connection's rate."""
    shaper.shaped(False)
    gets = ThreadedGets(client, keys, 0, CEILING_THREADS, BLOCK_SIZE)
    gets.one_pass()  # connections opened, server warm
    rates = []
    for _ in range(3):  # each at least CEILING_SECONDS of passes, so that a small set is not timed by its start
        t0, passes = time.perf_counter(), 0
        while not passes or time.perf_counter() - t0 < CEILING_SECONDS:
            gets.one_pass()
            passes += 1
        rates.append(passes * gets.size / (time.perf_counter() - t0))
    ceiling = statistics.median(rates)
    print(f"  shaper ceiling, shaping off ({CEILING_THREADS} threads of 4 MiB ranged GETs): {ceiling / 1e6:,.0f} MB/s",
          file=sys.stderr, flush=True)
    if link_rate > CEILING_SHARE * ceiling:
        raise SystemExit(f"--remote: --link-rate {link_rate / 1e6:.0f} MB/s is above {CEILING_SHARE:.0%} of what "
                         f"the proxy and the server deliver unshaped here ({ceiling / 1e6:.0f} MB/s): the shaped "
                         "link would not be the bound; give a lower --link-rate")
    shaper.shaped(True)
    rtts, rates = [], []
    for key in keys[:5]:
        t0 = time.perf_counter()
        client.head_object(Bucket=BUCKET, Key=key)
        rtts.append(time.perf_counter() - t0)
    rtt = statistics.median(rtts)
    for key in keys[:5]:  # whole blocks, one connection
        t0 = time.perf_counter()
        gets._get((key, 0, BLOCK_SIZE - 1))
        rates.append(BLOCK_SIZE / max(time.perf_counter() - t0 - rtt, 1e-6))
    return Link(ceiling, rtt, statistics.median(rates))


def link_readers(spec: ShardSet, keys: list[str], through, shaper: ShaperProcess, state_root: str, args,
                 peers) -> list[tuple[str, object]]:
    """(name, reader) of every reader on the shaped link, each with ``one_pass`` and ``firsts``."""
    url = f"s3://{BUCKET}/{spec.directory(Path(args.data)).name}/"

    def refreshing(**options) -> TimedLoader:
        reader = Refreshing(url, "inline", tempfile.mkdtemp(dir=state_root),
                            storage_options={"endpoint_url": shaper.url, **options})
        return TimedLoader(reader, args.workers, args.batch, spec.extensions)

    readers = [(LINK_CAPACITY, ThreadedGets(through, keys, spec.samples, LINK_THREADS)),
               (DEFAULTS, refreshing())]
    best = json.loads(args.link_options) if args.link_options else {}
    if best:
        readers.append((f"wdsrefresh s3://, {', '.join(f'{k}={v}' for k, v in best.items())}", refreshing(**best)))
    if peers is not None:
        python, litdata_url, aws = peers
        from bench_peers import litdata_peer

        cache = tempfile.mkdtemp(dir=state_root)
        readers.append((LITDATA, FirstTimed(litdata_peer(python, litdata_url, "--workers", str(args.workers),
                                                         "--batch", str(args.batch), "--endpoint", shaper.url,
                                                         "--cache", cache))))
        some = keys[:PIPE_OBJECTS]  # an aws process per object: its rate is its start-up's, on any number of them
        commands = [f"pipe:{aws} s3 cp --quiet --endpoint-url {shaper.url} s3://{BUCKET}/{k} -" for k in some]
        pipe = TimedLoader(Plain(commands), args.workers, args.batch, spec.extensions)
        pipe.expected = spec.samples_per_shard * len(some)
        name = PIPE_AWS if len(some) == len(keys) else f"{PIPE_AWS} ({len(some)} of the {len(keys)} objects)"
        readers.append((name, pipe))
    return readers


def bench_link_set(spec: ShardSet, client, through, shaper: ShaperProcess, args, state_root: str,
                   peers_for) -> list[LinkRow]:
    from bench_remote import upload

    files = ensure_set(Path(args.data), spec)
    keys = upload(client, files, spec.directory(Path(args.data)).name)
    size = sum(os.path.getsize(f) for f in files)
    readers = link_readers(spec, keys, through, shaper, state_root, args, peers_for(spec, files))
    rates, per_round = rounds_of(readers, spec.samples, args)
    rows = []
    for (name, reader), (rate, _), rounds in zip(readers, rates, per_round):
        firsts = reader.firsts[-len(rounds):] if reader.firsts else []  # the timed rounds' passes, warm-up left out
        rows.append(LinkRow(spec.name, name, rate, rate * size / spec.samples / 1e6, rounds, firsts))
        first = f", first batch {1e3 * statistics.median(firsts):,.0f} ms" if firsts else ""
        print(f"  {spec.name:14s} shaped {name:44s} {rate:10,.0f} samples/s {rows[-1].mbps:7,.1f} MB/s{first}",
              file=sys.stderr, flush=True)
    return rows


def growth_cost(client, through, shaper: ShaperProcess, count: int, link: Link, state_root: str) -> dict:
    """``set_epoch`` through the shaped link after 10% new objects joined a prefix of ``count``
    one-sample objects (with a manifest recording the others' ETags): indexed at set_epoch, 8 at
    a time, against one plain paginated listing of the prefix through the same link."""
    data = bench.tiny_shard_bytes()
    prefix = f"grow-{count}"
    keys = [f"{prefix}/t-{i:06d}.tar" for i in range(count)]
    print(f"uploading {count:,} objects for the growth row ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(16) as pool:
        etags = list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=data)["ETag"], keys))
    from wdsrefresh.format.digest import FileDigester

    digests = FileDigester()
    digests.update_block(data)
    entries = [{"url": k.split("/", 1)[1], "nsamples": 1, "filesize": len(data), "etag": e, "digest": digests.digest,
                "blocks": digests.blocks.hex()} for k, e in zip(keys, etags)]
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json",
                      Body=json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                       "shardlist": entries}).encode())
    source = wr.make_source(f"s3://{BUCKET}/{prefix}/", storage_options={"endpoint_url": shaper.url,
                                                                         "index_interval": 0})
    ds = wr.RefreshingWebDataset(source, shardshuffle=False, state_dir=tempfile.mkdtemp(dir=state_root))
    ds.set_epoch(0)
    new = count // 10
    added = [f"{prefix}/new-{i:06d}.tar" for i in range(new)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=data), added))
    t0 = time.perf_counter()
    snap = ds.set_epoch(1)
    grown = time.perf_counter() - t0
    ds.close()
    if len(snap.shards) != count + new:
        raise SystemExit(f"growth row: {len(snap.shards)} objects in the snapshot, expected {count + new}")
    t0 = time.perf_counter()
    for _ in through.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/", Delimiter="/"):
        pass
    listing = time.perf_counter() - t0
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.delete_object(Bucket=BUCKET, Key=k), keys + added))
    limit = listing + math.ceil(new / 8) * (link.rtt + len(data) / link.conn_rate)
    print(f"  growth: {count:,} objects + {new:,} new: set_epoch {grown:.2f} s, plain listing {listing:.2f} s, "
          f"limit {limit:.2f} s", file=sys.stderr, flush=True)
    return {"count": count, "new": new, "set_epoch": grown, "listing": listing, "limit": limit}


# --------------------------------------------------------------------------- peers


MOSAIC_PROBE = "import streaming; print(streaming.__version__)"


def ensure_remote_peers(python: Path) -> tuple[str, str | None]:
    """awscli in the peers venv (installed once), and whether Mosaic streaming imports there:
    (the aws command, None if Mosaic runs, else why not)."""
    from bench_peers import CONSTRAINTS, _peer_env, _run

    venv = python.parent.parent
    aws = venv / "bin" / "aws"
    if not aws.exists():
        print(f"installing awscli into {venv} (once) ...", file=sys.stderr, flush=True)
        _run(f"install awscli into {venv}", [str(python), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS),
                                             "awscli"])
    tried = venv / ".mosaic-tried"
    if not tried.exists():  # once: mosaicml-streaming 0.13, to see whether it imports beside this torch
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS),
                        "mosaicml-streaming==0.13.0"], capture_output=True, env=_peer_env())
        tried.touch()
    probe = subprocess.run([str(python), "-c", MOSAIC_PROBE], capture_output=True, text=True, env=_peer_env())
    if probe.returncode == 0:
        return str(aws), None
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return str(aws), f"`import streaming` fails in the peers venv: {last}"


def peers_for_sets(client, args, python: Path):
    """A function of (spec, shard files): (python, the set's LitData URL in the bucket, aws)."""
    from bench_peers import ensure_litdata_set

    aws, _ = ensure_remote_peers(python)

    def peers(spec: ShardSet, files: list[str]):
        directory = Path(ensure_litdata_set(python, Path(args.data), spec, files))
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: client.upload_file(str(directory / n), BUCKET, f"{directory.name}/{n}"), names))
        return python, f"s3://{BUCKET}/{directory.name}", aws

    return peers


# --------------------------------------------------------------------------- report


PEERS = (LITDATA, PIPE_AWS)  # (a row's name starts with one of these)


@dataclass(frozen=True)
class LinkTarget:
    what: str
    value: float
    limit: float
    at_least: bool
    unit: str = "x"
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def shown(self, value: float) -> str:
        return f"{value:.2f}x" if self.unit == "x" else f"{value * 1e3:,.0f} ms" if value < 10 else f"{value:.2f} s"


def best_peer(rows: list[LinkRow], shard_set: str) -> LinkRow | None:
    peers = [r for r in rows if r.shard_set == shard_set and r.reader.startswith(PEERS)]
    return max(peers, key=lambda r: r.rate) if peers else None


def link_targets(rows: list[LinkRow], link: Link, growth: dict | None) -> list[LinkTarget]:
    from bench import paired_ratio

    by = {(r.shard_set, r.reader): r for r in rows}
    targets = []
    for shard_set, label in (("large-objects", "256 KiB"), ("small-plain", "1 KiB x3")):
        ours = by.get((shard_set, DEFAULTS))
        if ours is None:
            continue
        capacity = by[(shard_set, LINK_CAPACITY)]
        share = paired_ratio([r * ours.mbps / ours.rate for r in ours.rounds],
                             [r * capacity.mbps / capacity.rate for r in capacity.rounds])
        if shard_set == "large-objects":
            targets.append(LinkTarget(f"{label}: wdsrefresh defaults / link capacity", share, 0.9, True))
        peer = best_peer(rows, shard_set)
        if peer is not None:
            targets.append(LinkTarget(f"{label}: wdsrefresh defaults / best peer ({peer.reader})",
                                      paired_ratio(ours.rounds, peer.rounds), 1.0, True,
                                      note=f"uses {share:.2f}x of the link" if shard_set != "large-objects" else ""))
        limit = 3 * link.rtt + link.block_seconds()
        targets.append(LinkTarget(f"{label}: time to first batch, defaults (3 RTT + one block: {limit * 1e3:,.0f} ms)",
                                  ours.first, limit, False, "s"))
    if growth:
        targets.append(LinkTarget(f"growth: set_epoch after {growth['new']:,} new of {growth['count']:,} objects "
                                  f"(listing alone {growth['listing']:.2f} s: {growth['set_epoch'] / growth['listing']:.2f}x)",
                                  growth["set_epoch"], growth["limit"], False, "s"))
    return targets


def link_report(rows: list[LinkRow], specs: list[ShardSet], link: Link, settings: dict, targets: list[LinkTarget],
                mosaic: str | None, args) -> list[str]:
    from bench import paired_ratio

    lines = [
        "", f"Shaped link (tools/netshaper.py): first byte after {settings['delay'] * 1e3:.0f} ms (+/- 5 ms), "
        f"{settings['conn_rate'] / 1e6:.0f} MB/s per connection, {settings['link_rate'] / 1e6:.0f} MB/s for the link; "
        f"the proxy's unshaped ceiling {link.ceiling / 1e6:,.0f} MB/s (the link is "
        f"{settings['link_rate'] / link.ceiling:.0%} of it); measured shaped: a HEAD {link.rtt * 1e3:.0f} ms, one "
        f"connection {link.conn_rate / 1e6:.1f} MB/s, one 4 MiB block {link.block_seconds() * 1e3:.0f} ms. "
        f"DataLoader {args.workers} workers, batches of {args.batch}; MB/s: object bytes; first batch: median from "
        "iter(loader) after set_epoch, workers up.",
        "" if mosaic is None else f"Mosaic streaming left out: {mosaic}.",
        "",
        "| shards | reader | samples/s | MB/s | x link | x best peer | first batch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    described = {s.name: f"{s.describe} ({s.shards}x{s.samples_per_shard})" for s in specs}
    for r in rows:
        capacity = next(c for c in rows if c.shard_set == r.shard_set and c.reader == LINK_CAPACITY)
        peer = best_peer(rows, r.shard_set)
        vs_peer = f"{paired_ratio(r.rounds, peer.rounds):.2f}x" if peer is not None else ""
        first = f"{r.first * 1e3:,.0f} ms" if r.first is not None else ""
        lines.append(f"| {described[r.shard_set]} | {r.reader} | {r.rate:,.0f} | {r.mbps:,.1f} | "
                     f"{paired_ratio(r.rounds, capacity.rounds):.2f}x | {vs_peer} | {first} |")
    lines += ["", "TARGETS (shaped link)", "", "| target | measured | limit | |", "|---|---:|---:|---|"]
    for t in targets:
        limit = ("\u2265 " if t.at_least else "\u2264 ") + t.shown(t.limit)
        note = f" ({t.note})" if t.note else ""
        lines.append(f"| {t.what}{note} | {t.shown(t.value)} | {limit} | {'PASS' if t.passed else 'MISS'} |")
    return lines


def run_link(args, client, endpoint: str, state_root: str) -> list[str]:
    """The shaped part of ``--remote``: the report's lines."""
    import boto3
    from botocore.config import Config
    from bench_peers import ensure_peers_venv

    specs = [s for s in link_sets(args.quick) if s.name in (args.link_sets or "small-plain,large-objects").split(",")]
    settings = {"delay": args.link_delay, "conn_rate": args.conn_rate, "link_rate": args.link_rate}
    shaper = ShaperProcess(endpoint, **settings)
    try:
        through = boto3.client("s3", endpoint_url=shaper.url,
                               config=Config(response_checksum_validation="when_required",
                                             max_pool_connections=2 * LINK_THREADS))
        peers_for = (lambda spec, files: None)
        mosaic = "not tried (--no-peers)"
        if not args.no_peers:
            python, _ = ensure_peers_venv(Path(args.data))
            peers_for = peers_for_sets(client, args, python)
            mosaic = ensure_remote_peers(python)[1]
        first = specs[-1]
        from bench_remote import upload

        files = ensure_set(Path(args.data), first)
        link = measure_link(shaper, through, upload(client, files, first.directory(Path(args.data)).name),
                            args.link_rate)
        rows = []
        for spec in specs:
            rows += bench_link_set(spec, client, through, shaper, args, state_root, peers_for)
        growth = growth_cost(client, through, shaper, args.growth, link, state_root) if args.growth else None
    finally:
        shaper.close()
    return link_report(rows, specs, link, settings, link_targets(rows, link, growth), mosaic, args)

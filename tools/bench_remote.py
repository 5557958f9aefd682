"""``tools/bench.py --remote``: read speed from an S3 server on 127.0.0.1 (moto, its own process).

The same shard sets as tools/bench.py are uploaded to a loopback S3 server; readers take turns
as in bench.py (median of rounds):

- ``plain GET``: one sequential ``get_object`` per object, whole, body read and dropped: the
  server's own ceiling for these bytes, with no parsing and no check;
- ``wdsrefresh inline``: ``RefreshingWebDataset("s3://bench/<set>/")`` (every block pinned to the
  object's ETag and checked against its digest, read ahead in a thread);
- ``webdataset http``: ``webdataset.WebDataset`` over the objects' http:// URLs (its curl
  opener; the loopback server needs no signature), and ``webdataset pipe:aws``: over
  ``pipe:aws s3 cp <url> -``, the way its documentation reads S3 (when the aws CLI is here).

Snapshot resolution is timed on N one-sample objects: with a manifest that records their
ETags (one listing, the manifest), then without (every object indexed once: one pinned GET
each, 8 at a time), and the next epoch (nothing changed: the listing only), against one plain
paginated boto3 listing of the same prefix (the store's own listing cost, in the same run).

A loopback server on a 2-core machine shares the CPUs with the readers: the numbers compare
readers on the same server, not with a real store's throughput.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench
from bench import Plain, Refreshing, data_loader, ensure_set, interleaved_rates, one_process, shard_sets

import wdsrefresh as wr
from wdsrefresh.format.digest import FileDigester

BUCKET = "bench"


def _serve(queue, stop) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    queue.put(server.get_host_and_port())
    parent = os.getppid()
    while not stop.wait(1.0) and os.getppid() == parent:
        pass  # until told, or until the bench is gone (killed: nobody would tell)
    server.stop()


def start_server():
    """moto's S3 server on 127.0.0.1 (port 0) in a process of its own (so it does not share the
    readers' GIL), and dummy credentials in the environment: nothing leaves the machine."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    process = ctx.Process(target=_serve, args=(queue, stop), daemon=True)
    process.start()
    host, port = queue.get(timeout=120)
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    os.environ.pop("AWS_PROFILE", None)

    def shutdown() -> None:
        stop.set()
        process.join(timeout=30)

    return shutdown, endpoint


class PlainGets:
    """One whole-object get_object after another: what the server itself delivers."""

    def __init__(self, client, keys: list[str], samples: int):
        self.client, self.keys, self.samples = client, keys, samples
        self.ds = self

    def prepare(self) -> None:
        pass

    def pass_(self) -> int:
        for key in self.keys:
            with self.client.get_object(Bucket=BUCKET, Key=key)["Body"] as body:
                while body.read(1 << 20):
                    pass
        return self.samples


def upload(client, files: list[str], prefix: str) -> list[str]:
    keys = [f"{prefix}/{os.path.basename(f)}" for f in files]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kf: client.upload_file(kf[1], BUCKET, kf[0]), zip(keys, files)))
    return keys


def bench_set(client, endpoint: str, root: Path, spec, args, state_root: str) -> list[tuple]:
    files = ensure_set(root, spec)
    prefix = spec.directory(root).name
    keys = upload(client, files, prefix)
    size = sum(os.path.getsize(f) for f in files)
    url = f"s3://{BUCKET}/{prefix}/"
    http = [client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": k}, ExpiresIn=3600)
            for k in keys]
    rows = []
    modes = [("1 proc", one_process)]
    if args.workers > 0:
        modes.append((f"loader {args.workers}w b{args.batch}",
                      lambda r: data_loader(r, args.workers, args.batch, spec.extensions)))
    for mode, wrap in modes:
        readers = []
        if mode == "1 proc":
            readers.append(("plain GET (server ceiling)", PlainGets(client, keys, spec.samples)))
        readers.append(("wdsrefresh inline", Refreshing(url, "inline", tempfile.mkdtemp(dir=state_root))))
        if args.base:  # HEAD and the base commit, each in a process of its own (bench_base.py), same rounds
            from bench_base import server

            loader = () if mode == "1 proc" else ("--workers", str(args.workers), "--batch", str(args.batch),
                                                  "--members", ",".join(spec.extensions))
            readers += [(f"{side} inline", server(tree, "inline", url, *loader)) for side, tree in args.trees]
        readers.append(("webdataset http", Plain(http)))
        if shutil.which("aws"):
            readers.append(("webdataset pipe:aws", Plain([f"pipe:aws s3 cp --quiet --endpoint-url {endpoint} "
                                                           f"s3://{BUCKET}/{k} -" for k in keys])))
        wrapped = [(r.pass_, lambda: None) if isinstance(r, PlainGets) else
                   (r.one_pass, r.close) if hasattr(r, "one_pass") else wrap(r) for _, r in readers]
        per_round: list[list[float]] = []
        try:
            rates = interleaved_rates([(r, one_pass) for (_, r), (one_pass, _) in zip(readers, wrapped)],
                                      spec.samples, args.repeat, args.min_time, per_round)
        finally:
            for _, close in wrapped:
                close()
        for (name, _), (rate, _passes), rounds in zip(readers, rates, per_round):
            mbps = rate * size / spec.samples / 1e6  # object bytes per second, the same bytes for every reader
            rows.append((spec, mode, name, rate, mbps, rounds))
            print(f"  {spec.name:12s} {mode:16s} {name:28s} {rate:12,.0f} samples/s {mbps:8,.0f} MB/s",
                  file=sys.stderr, flush=True)
    return rows


def bench_resolution(client, count: int, state_root: str) -> tuple[float, float, float, float]:
    data = bench.tiny_shard_bytes()
    digests = FileDigester()
    digests.update_block(data)
    prefix = f"tiny-{count}"
    keys = [f"{prefix}/t-{i:06d}.tar" for i in range(count)]
    print(f"uploading {count:,} objects ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(16) as pool:
        etags = list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=data)["ETag"], keys))
    entries = [{"url": k.split("/", 1)[1], "nsamples": 1, "filesize": len(data), "etag": e,
                "digest": digests.digest, "blocks": digests.blocks.hex()} for k, e in zip(keys, etags)]
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json",
                      Body=json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                       "shardlist": entries}).encode())

    def plain_listing() -> float:
        """One paginated ListObjectsV2 pass over the prefix with boto3, pages dropped: the listing's ceiling."""
        t0 = time.perf_counter()
        for _ in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/", Delimiter="/"):
            pass
        return time.perf_counter() - t0

    def timed(source) -> tuple[float, float]:
        ds = wr.RefreshingWebDataset(source, shardshuffle=False, state_dir=tempfile.mkdtemp(dir=state_root))
        t0 = time.perf_counter()
        snap = ds.set_epoch(0)
        cold = time.perf_counter() - t0
        if len(snap.shards) != count:
            raise SystemExit(f"{source}: {len(snap.shards)} objects in the snapshot, expected {count}")
        t0 = time.perf_counter()
        ds.set_epoch(1)
        warm = time.perf_counter() - t0
        ds.close()  # its background indexing would load the server during the next measurements
        return cold, warm

    with_manifest, warm = timed(f"s3://{BUCKET}/{prefix}/")
    listing = plain_listing()
    indexed, warm_indexed = timed(f"s3://{BUCKET}/{prefix}/*.tar")  # a glob: the manifest is not used
    listing = statistics.median([listing, plain_listing()])
    ahead, at_set_epoch = growth_epoch(client, prefix, data, count // 10, state_root)
    print(f"  resolve {count:>7,} objects: manifest {with_manifest:.2f} s, indexed {indexed:.2f} s, next epoch "
          f"{statistics.median([warm, warm_indexed]):.2f} s, plain listing {listing:.2f} s; after {count // 10:,} "
          f"new objects: indexed ahead {ahead:.2f} s, at set_epoch {at_set_epoch:.2f} s", file=sys.stderr, flush=True)
    return count, with_manifest, indexed, max(warm, warm_indexed), listing, ahead, at_set_epoch


def growth_epoch(client, prefix: str, data: bytes, new: int, state_root: str) -> tuple[float, float]:
    """The set_epoch after ``new`` objects without manifest entries joined the prefix: with the
    background thread given time to index them (remote/ahead.py), and with it off (indexed by
    set_epoch itself, 8 at a time)."""
    url = f"s3://{BUCKET}/{prefix}/"
    sources = [wr.make_source(url, storage_options={"index_interval": interval}) for interval in (0.5, 0)]
    datasets = [wr.RefreshingWebDataset(source, shardshuffle=False, state_dir=tempfile.mkdtemp(dir=state_root))
                for source in sources]
    for ds in datasets:
        ds.set_epoch(0)
    keys = [f"{prefix}/new-{i:06d}.tar" for i in range(new)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=data), keys))
    source, deadline = sources[0], time.monotonic() + 600
    while len(source.indexed_ahead) < new:
        if time.monotonic() > deadline:
            raise SystemExit(f"the background thread indexed {len(source.indexed_ahead)} of {new} objects in 600 s")
        time.sleep(0.2)
    source.ahead.stop(wait=600)  # its listings would load the server while the other dataset's set_epoch is timed
    seconds = []
    for ds in datasets:
        t0 = time.perf_counter()
        ds.set_epoch(1)
        seconds.append(time.perf_counter() - t0)
        ds.close()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.delete_object(Bucket=BUCKET, Key=k), keys))
    return seconds[0], seconds[1]


def base_lines(rows: list[tuple], commit: str) -> list[str]:
    """HEAD / base of the unshaped rows (``--base``): the median of the rounds' paired ratios."""
    from bench import paired_ratio
    from bench_base import LIMIT

    rounds = {(spec.name, mode, name): r for spec, mode, name, _, _, r in rows}
    lines = ["", f"HEAD / base {commit} (unshaped; each in a process of its own, same rounds)", "",
             "| shards | mode | reader | HEAD / base | |", "|---|---|---|---:|---|"]
    for spec, mode, name, _, _, r in rows:
        base = rounds.get((spec.name, mode, "base " + name.removeprefix("HEAD "))) if name.startswith("HEAD ") else None
        if base is not None:
            ratio = paired_ratio(r, base)
            lines.append(f"| {spec.describe} | {mode} | {name.removeprefix('HEAD ')} | {ratio:.3f} | "
                         f"{'ok' if ratio >= LIMIT else 'BELOW ' + str(LIMIT)} |")
    return lines


def run_remote(args) -> None:
    """What ``tools/bench.py --remote`` runs; prints a markdown report."""
    import platform

    import boto3
    import torch
    from botocore.config import Config
    import webdataset as wds

    shutdown, endpoint = start_server()
    try:
        # the plain GET's ceiling skips botocore's CRC32 of each body, as wdsrefresh's reads do
        client = boto3.client("s3", endpoint_url=endpoint,
                              config=Config(response_checksum_validation="when_required"))
        client.create_bucket(Bucket=BUCKET)
        specs = [s for s in shard_sets(args.quick) if s.name in (args.sets or "small-plain,large").split(",")]
        sizes = [int(s) for s in (("2000" if args.quick else "10000") if args.resolve_sizes is None else args.resolve_sizes).split(",") if s]
        root = Path(args.data)
        root.mkdir(parents=True, exist_ok=True)
        if args.base:
            from bench_base import HEAD_TREE, base_tree

            base = base_tree(root, args.base)[0]
            args.trees = (("HEAD", base if args.aa else HEAD_TREE), ("base", base))  # --aa: the noise
        with tempfile.TemporaryDirectory(prefix="wdsrefresh-bench-") as state_root:
            shaped = []
            if args.link_sets != "none":  # first: it refuses a link the machine cannot carry before the long part
                from bench_link import run_link

                if args.growth is None:
                    args.growth = 2000 if args.quick else 10000
                shaped = run_link(args, client, endpoint, state_root)
            rows = []
            for spec in specs:
                rows += bench_set(client, endpoint, root, spec, args, state_root)
            resolution = [bench_resolution(client, n, state_root) for n in sizes]
    finally:
        shutdown()
    lines = [
        f"wdsrefresh {wr.__version__} vs webdataset {wds.__version__}, reading from moto's S3 server on 127.0.0.1; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs; readers "
        f"interleaved, median of {args.repeat} rounds{'; --quick' if args.quick else ''}",
        "",
        "| shards | mode | reader | samples/s | MB/s | x plain GET |",
        "|---|---|---|---:|---:|---:|",
    ]
    ceiling = {r[0].name: r[3] for r in rows if r[2].startswith("plain GET")}
    for spec, mode, name, rate, mbps, _ in rows:
        lines.append(f"| {spec.describe} ({spec.shards}x{spec.samples_per_shard}) | {mode} | {name} | {rate:,.0f} | "
                     f"{mbps:,.0f} | {rate / ceiling[spec.name]:.2f}x |")
    if args.base:
        lines += base_lines(rows, args.base)
    if resolution:
        lines += ["", "| one-sample objects | set_epoch, manifest with ETags | set_epoch, every object indexed "
                  "| next set_epoch (nothing changed) | plain boto3 listing of the prefix | next set_epoch x listing "
                  "| next set_epoch after 10% new objects: indexed ahead | ... indexed at set_epoch |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {n:,} | {m:.2f} s | {i:.2f} s | {w:.2f} s | {p:.2f} s | {w / p:.2f}x | {a:.2f} s | {g:.2f} s |"
                  for n, m, i, w, p, a, g in resolution]
    print("\n".join(lines + shaped))

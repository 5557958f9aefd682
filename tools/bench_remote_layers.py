"""What reading objects the way wdsrefresh does costs, one layer at a time, in one thread.

    python tools/bench_remote_layers.py            # the 256 KiB shard set, from moto on 127.0.0.1

The 256 KiB shard set of tools/bench.py is uploaded to moto's S3 server (its own process, as in
``bench.py --remote``) and read whole, in turns, median of the rounds (milliseconds per pass):

  plain GET         one get_object per object, body read in 1 MiB pieces and dropped
  blocks            Store.read_blocks: 4 MiB blocks of one ranged GET pinned by If-Match
  blocks + digest   the same, each block's xxh3 digest computed (the inline check)
  + payloads        the same, each 256 KiB payload copied out of its block to bytes

The last row is the work of wdsrefresh's inline read of these objects without its read-ahead
thread and dataset layers: compare it with ``bench.py --remote``'s rates for the same set.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import bench
from bench_remote import BUCKET, PlainGets, start_server, upload

from wdsrefresh.format.digest import BLOCK_SIZE, block_digest
from wdsrefresh.storage.objects.s3 import Store

PAYLOAD = 256 << 10
ROUNDS = 7


def passes(client, store: Store, keys: list[str]) -> dict:
    heads = {k: client.head_object(Bucket=BUCKET, Key=k) for k in keys}

    def blocks(digest: bool = False, payloads: bool = False) -> None:
        for key in keys:
            size = heads[key]["ContentLength"]
            for data, *_ in store.read_blocks(f"s3://{BUCKET}/{key}", 0, -(-size // BLOCK_SIZE), BLOCK_SIZE, size,
                                              etag=heads[key]["ETag"]):
                if digest:
                    block_digest(data)
                if payloads:
                    for offset in range(512, len(data) - PAYLOAD, PAYLOAD + 1024):
                        data[offset : offset + PAYLOAD]

    return {"plain GET": PlainGets(client, keys, 0).pass_, "blocks": blocks, "blocks + digest": lambda: blocks(True),
            "+ payloads": lambda: blocks(True, True)}


def main() -> None:
    from botocore.config import Config
    import boto3

    shutdown, endpoint = start_server()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, config=Config(response_checksum_validation="when_required"))
        client.create_bucket(Bucket=BUCKET)
        spec = next(s for s in bench.shard_sets(False) if s.name == "large")
        keys = upload(client, bench.ensure_set(Path("bench_data"), spec), spec.directory(Path("bench_data")).name)
        readers = passes(client, Store({"endpoint_url": endpoint}), keys)
        times: dict[str, list[float]] = {name: [] for name in readers}
        for round_no in range(ROUNDS + 1):
            for name, one_pass in readers.items():
                t0 = time.perf_counter()
                one_pass()
                if round_no:  # the first round warms the connections and the server
                    times[name].append(time.perf_counter() - t0)
    finally:
        shutdown()
    mb = spec.shards * spec.samples_per_shard * PAYLOAD / 1e6
    print(f"{spec.shards} objects, {mb:.0f} MB of payloads, median of {ROUNDS} rounds (ms per pass):")
    for name, seconds in times.items():
        print(f"  {name:18s} {1e3 * statistics.median(seconds):7.0f}  (min {1e3 * min(seconds):.0f})")


if __name__ == "__main__":
    sys.exit(main())

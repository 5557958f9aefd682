#!/usr/bin/env python
"""What checking 4 MiB block digests costs on 256 KiB payloads, in ten-line loops (no reader).

A reader may yield a payload only once the 4 MiB block it lies in matched its digest, so it
either holds the block's payloads (each read into its own ``bytes``, hashed right away) until
the block is complete, or reads the whole block into one buffer, checks it, and copies each
payload out. Each loop reads the same payloads of one shard; times are relative to "pread",
which reads each payload into its own ``bytes`` and drops it (what ``verify="off"`` does):

  pread              payloads read on their own, dropped at once
  pread+hash         ... each hashed (xxh3_64) right after its read
  pread+hold         ... kept until their block is complete, not hashed
  pread+hash+hold    ... hashed and kept: what verify="inline" must do
  block+hash+copy    the block read into a reused buffer, hashed, payloads copied out

    python tools/bench_hold.py [SHARD]   # default: bench_data/large-4x48/shard-00000.tar
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import xxhash

BLOCK = 4 << 20
PAYLOAD = 256 << 10


def payload_offsets(path: str) -> list[int]:
    """Where the payloads of ``path`` start (walking its ustar headers; members of PAYLOAD bytes)."""
    offsets, pos, size = [], 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos + 512 <= size:
            f.seek(pos)
            header = f.read(512)
            if header == bytes(512):
                break
            length = int(header[124:135], 8)
            if length == PAYLOAD:
                offsets.append(pos + 512)
            pos += 512 + (length + 511) // 512 * 512
    return offsets


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "bench_data/large-4x48/shard-00000.tar"
    offsets = payload_offsets(path)
    fd = os.open(path, os.O_RDONLY)
    size = os.path.getsize(path)
    buf = bytearray(BLOCK)
    view = memoryview(buf)

    def pread(hash_it: bool, hold: bool) -> None:
        held, hasher, block_end = [], xxhash.xxh3_64(), BLOCK
        for offset in offsets:
            data = os.pread(fd, PAYLOAD, offset)
            if hash_it:
                hasher.update(data)
            if hold:
                held.append(data)
                if offset + PAYLOAD >= block_end:
                    held.clear()
                    block_end += BLOCK

    def block_copy() -> None:
        for start in range(0, size, BLOCK):
            n = os.preadv(fd, [buf], start)
            xxhash.xxh3_64_digest(view[:n])
            for offset in offsets:
                if start <= offset and offset + PAYLOAD <= start + n:
                    bytes(view[offset - start : offset - start + PAYLOAD])

    loops = {
        "pread": lambda: pread(False, False),
        "pread+hash": lambda: pread(True, False),
        "pread+hold": lambda: pread(False, True),
        "pread+hash+hold": lambda: pread(True, True),
        "block+hash+copy": block_copy,
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(200):
        for name, loop in loops.items():
            started = time.process_time()
            loop()
            times[name].append(time.process_time() - started)
    base = statistics.median(times["pread"])
    print(f"{len(offsets)} payloads of {PAYLOAD >> 10} KiB from {path}; CPU time, median of 200 rounds")
    for name, values in times.items():
        print(f"  {name:18s} {statistics.median(values) * 1e3:7.2f} ms  {statistics.median(values) / base:5.2f}x")


if __name__ == "__main__":
    main()

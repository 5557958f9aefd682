"""Stream mode: how long after the last sample a partial batch arrives.

    python tools/bench_partial.py [--rounds 5] [--after 0.2,1.0]

A shard of 5 samples lands in a watched directory read by ``mode="stream"`` with
``.batched(8, partial_after=A)`` through a DataLoader worker; the time from the rename that
publishes the shard to the arrival of its 5-sample batch is the latency (ideally ``A`` plus
the drop-to-sample latency). Median over rounds after one untimed warm-up, printed per ``A``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))


def partial_batch_latency(partial_after: float, rounds: int) -> list[float]:
    import torch.utils.data

    import wdsrefresh as wr
    from shardutil import tar_bytes, make_samples

    latencies = []
    with tempfile.TemporaryDirectory() as d:
        ds = wr.RefreshingWebDataset(d, mode="stream").to_tuple("__key__").batched(8, partial_after=partial_after)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1))
        try:
            for i in range(rounds + 1):  # round 0 warms up: the worker's start and first shard take seconds
                tmp, final = os.path.join(d, f"_tmp.r{i}.tar"), os.path.join(d, f"r{i}.tar")
                with open(tmp, "wb") as f:
                    f.write(tar_bytes(make_samples(f"r{i}", 5)))
                landed = time.monotonic()
                os.replace(tmp, final)
                batch = next(it)[0]
                if i:
                    latencies.append(time.monotonic() - landed)
                assert len(batch) == 5, f"expected the 5 samples of r{i}.tar as one partial batch, got {len(batch)}"
        finally:
            ds.close()
            del it
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--after", default="0.2,1.0", help="partial_after values, comma-separated seconds")
    args = parser.parse_args()
    for after in (float(a) for a in args.after.split(",")):
        latencies = partial_batch_latency(after, args.rounds)
        median = statistics.median(latencies)
        print(f"stream partial batch, partial_after={after:.1f} s: median latency {median * 1e3:.0f} ms "
              f"({(median - after) * 1e3:+.0f} ms beyond partial_after; {args.rounds} rounds)")


if __name__ == "__main__":
    main()

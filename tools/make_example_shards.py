"""Writes the small example shards committed in example_shards/ (deterministic bytes).

Each sample is a 16-dimensional feature vector (``input.npy``) and a class label (``cls``)
from 4 well-separated classes, so the demo's tiny model visibly learns.

    python tools/make_example_shards.py [--out example_shards] [--shards 4]
"""

from __future__ import annotations

import argparse
import os

from wdsrefresh.demo import write_example_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="example_shards", help="output directory (default: example_shards)")
    parser.add_argument("--shards", type=int, default=4, help="number of shards (default: 4)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for index in range(args.shards):
        print(write_example_shard(args.out, index))


if __name__ == "__main__":
    main()

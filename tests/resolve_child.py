"""A resolving process for the readiness tests: a dataset on DIRECTORY, driven from stdin.

    python resolve_child.py DIRECTORY --watch|--no-watch

Each line "epoch N" resolves epoch N and prints one JSON line: the snapshot's shard names, its
pending files with their reasons, and the WARNINGs logged since the previous line. Started
without CAP_LEASE (setpriv), it shows what users of files it does not own meet.
"""

import json
import logging
import os
import sys

import wdsrefresh as wr


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main() -> None:
    directory, watch = sys.argv[1], sys.argv[2] == "--watch"
    collect = Collect()
    logging.getLogger("wdsrefresh").addHandler(collect)
    with wr.RefreshingWebDataset(directory, watch=watch, index_cache=False) as ds:
        for line in sys.stdin:
            if not line.startswith("epoch "):
                break
            snap = ds.set_epoch(int(line.split()[1]))
            print(json.dumps({
                "shards": [os.path.basename(s.url) for s in snap.shards],
                "pending": {os.path.basename(u): why for u, why in snap.pending_reasons.items()},
                "warnings": collect.messages,
            }), flush=True)
            collect.messages = []


if __name__ == "__main__":
    main()

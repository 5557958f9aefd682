"""LitData's side of ``tools/bench.py --peers``, run by the python of the peers venv.

That venv has torch and litdata but neither wdsrefresh nor webdataset, so this module imports
only the standard library at its top (the tests import ``tar_samples`` in the project venv,
where litdata is absent) and litdata inside the commands:

    python bench_peers_child.py export OUT SHARD...
        writes the shards' samples, in order, in LitData's own format (``BinaryWriter``: chunk
        files and an index.json) into OUT, through a temporary directory renamed at the end;
    python bench_peers_child.py serve DIR [--workers N --batch B] [--bytes]
        opens ``litdata.StreamingDataset(DIR)``, prints ``ready <litdata version>``, then
        answers each ``pass`` line on stdin with the number of samples one pass yielded.

A pass in one process iterates the dataset and drops each sample as litdata yields it (its
payloads are memoryviews into the chunk: no copy); ``--bytes`` copies each payload to
``bytes`` first, as the tar readers' samples hold them. With ``--workers N`` a pass iterates a
``StreamingDataLoader`` with N persistent workers and batches of B, collated into one list per
field with each payload copied to ``bytes``: what webdataset's default collation makes of the
same samples. litdata's own default collation cannot serve here: torch's ``default_collate``
takes a memoryview for a sequence of ints and builds a tensor per byte (about 700 samples/s of
1 KiB in one process, 70 with 2 workers), and a collation that keeps memoryviews cannot leave
a worker (they do not pickle).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator

CHUNK_BYTES = "64MB"  # the chunk size LitData's documentation uses in its examples
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def tar_samples(paths: list[str]) -> Iterator[dict]:
    """The samples of the tar shards, grouped as webdataset groups them: consecutive regular
    members with the same key (the name up to the first dot of its last part) make one sample
    ``{"__key__": key, ext: payload}``, extensions lower-cased; names without a dot are skipped
    (webdataset's metadata members, ``__*__``, do not occur in the bench's shards)."""
    for path in paths:
        sample = None
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                match = _KEY_EXT.match(member.name) if member.isreg() else None
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key}
                sample[ext] = tar.extractfile(member).read()
        if sample is not None:
            yield sample


def export(out: str, paths: list[str]) -> None:
    from litdata.streaming.writer import BinaryWriter

    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = BinaryWriter(tmp, chunk_bytes=CHUNK_BYTES)
    count = 0
    for count, sample in enumerate(tar_samples(paths), 1):
        writer.add_item(count - 1, sample)
    writer.done()
    writer.merge()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(count)


def _to_bytes(sample: dict) -> dict:
    return {k: v if isinstance(v, str) else bytes(v) for k, v in sample.items()}


def collate_bytes(samples: list[dict]) -> dict:
    """One list per field, payloads copied to ``bytes``: picklable, like webdataset's default."""
    return {k: [s[k] if isinstance(s[k], str) else bytes(s[k]) for s in samples] for k in samples[0]}


def serve(directory: str, workers: int, batch: int, as_bytes: bool) -> None:
    import litdata
    from litdata import StreamingDataLoader, StreamingDataset

    dataset = StreamingDataset(directory)
    if workers:
        loader = StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=True,
                                     collate_fn=collate_bytes)

        def one_pass() -> int:
            return sum(len(b["__key__"]) for b in loader)
    elif as_bytes:
        def one_pass() -> int:
            count = 0
            for sample in dataset:
                _to_bytes(sample)
                count += 1
            return count
    else:
        def one_pass() -> int:
            return sum(1 for _ in dataset)

    print("ready", litdata.__version__, flush=True)
    for line in sys.stdin:
        if line.strip() != "pass":
            raise SystemExit(f"bench_peers_child: expected 'pass' on stdin, got {line!r}")
        print(one_pass(), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("export", help="write the shards' samples in LitData's format")
    p.add_argument("out")
    p.add_argument("shards", nargs="+")
    p = commands.add_parser("serve", help="time passes over a LitData directory, one per 'pass' line")
    p.add_argument("directory")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bytes", action="store_true", dest="as_bytes")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.out, args.shards)
    else:
        serve(args.directory, args.workers, args.batch, args.as_bytes)


if __name__ == "__main__":
    main()

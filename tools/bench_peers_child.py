"""LitData's side of ``tools/bench.py --peers``, run by the python of the peers venv.

That venv has torch and litdata but neither wdsrefresh nor webdataset, so this module imports
only the standard library at its top (the tests import ``tar_samples`` in the project venv,
where litdata is absent) and litdata inside the commands:

    python bench_peers_child.py export OUT SHARD...
        writes the shards' samples, in order, in LitData's own format (``BinaryWriter``: chunk
        files and an index.json) into OUT, through a temporary directory renamed at the end;
    python bench_peers_child.py serve DIR [--workers N --batch B] [--bytes]
                                          [--endpoint URL --cache DIR]
        opens ``litdata.StreamingDataset(DIR)``, prints ``ready <litdata version>``, then
        answers each ``pass`` line on stdin with the number of samples one pass yielded and
        ``first=`` the seconds from ``iter()`` to its first sample or batch. DIR may be an ``s3://`` URL
        read through ``--endpoint`` (the bench's store): its chunks are downloaded into
        ``--cache``, which is emptied before every pass, so every pass reads from the store.

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
import time
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


def _timed(items, size) -> tuple[int, float]:
    """(samples, seconds to the first item) of one pass over ``items``."""
    started = time.perf_counter()
    first, count = None, 0
    for item in items:
        if first is None:
            first = time.perf_counter() - started
        count += size(item)
    return count, first or 0.0


def _empty(cache: str) -> None:
    """Drops the downloaded chunks (the index stays): the next pass downloads them again."""
    for root, _, files in os.walk(cache):
        for name in files:
            if name.endswith(".bin") or name.endswith(".lock"):
                os.remove(os.path.join(root, name))


def serve(directory: str, workers: int, batch: int, as_bytes: bool, endpoint: str | None = None,
          cache: str | None = None) -> None:
    import litdata
    from litdata import StreamingDataLoader, StreamingDataset

    options = {"storage_options": {"endpoint_url": endpoint}} if endpoint else {}
    if endpoint and endpoint.startswith("http://"):
        # litdata downloads chunks with obstore, whose client refuses plain http unless told (the
        # bench's store is on 127.0.0.1); its own options are a module-level dict
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True
    dataset = StreamingDataset(directory, cache_dir=cache, **options)
    if workers:
        loader = StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=True,
                                     collate_fn=collate_bytes)

        def one_pass() -> tuple[int, float]:
            return _timed(loader, lambda b: len(b["__key__"]))
    elif as_bytes:
        def one_pass() -> tuple[int, float]:
            return _timed((_to_bytes(s) for s in dataset), lambda s: 1)
    else:
        def one_pass() -> tuple[int, float]:
            return _timed(dataset, lambda s: 1)

    print("ready", litdata.__version__, flush=True)
    for line in sys.stdin:
        if line.strip() != "pass":
            raise SystemExit(f"bench_peers_child: expected 'pass' on stdin, got {line!r}")
        if cache:
            _empty(cache)
        count, first = one_pass()
        print(count, f"first={first:.6f}", flush=True)


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
    p.add_argument("--endpoint", default=None, help="the S3 endpoint of an s3:// DIR")
    p.add_argument("--cache", default=None, help="where an s3:// DIR's chunks go (emptied before each pass)")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.out, args.shards)
    else:
        serve(args.directory, args.workers, args.batch, args.as_bytes, args.endpoint, args.cache)


if __name__ == "__main__":
    main()

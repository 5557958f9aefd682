"""Helpers the tests share: writing real tar shards the way producers do."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile


def tar_bytes(samples: list[dict[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar archive holding ``samples`` (each a dict with __key__ and extension: bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 1700000000
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_samples(prefix: str, n: int, size: int = 64) -> list[dict[str, bytes]]:
    return [
        {"__key__": f"{prefix}/{i:06d}", "bin": (f"{prefix}:{i}:".encode() * size)[:size], "cls": str(i % 10).encode()}
        for i in range(n)
    ]


def write_shard(directory: str, name: str, n: int, size: int = 64, prefix: str | None = None) -> str:
    """Publishes a shard the safe way (temporary name, then rename); returns its path.

    The rename is what tells a reader the shard is complete: a watcher sees it. A reader that
    finds the file without seeing the rename (its first scan, or a rescan) knows it from the
    ctime, which a rename sets, being later than the mtime of the last write; timestamps are
    coarse, so the writer here dates its last write a second back, as a slower writer's is.
    """
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f"_tmp.{name}")
    with open(tmp, "wb") as f:
        f.write(tar_bytes(make_samples(prefix or name.split(".")[0], n, size)))
    written = os.stat(tmp).st_mtime_ns - 1_000_000_000
    os.utime(tmp, ns=(written, written))
    os.replace(tmp, path)
    return path


def write_sources(root, **shards) -> dict[str, str]:
    """Directories ``root/NAME`` by name, each holding shards ``NAME<i>.tar`` of the given sample
    counts, published by rename: the sources of a mix."""
    out = {}
    for name, counts in shards.items():
        directory = os.path.join(str(root), name)
        os.makedirs(directory)
        for i, n in enumerate(counts):
            write_shard(directory, f"{name}{i}.tar", n)
        out[name] = directory
    return out


def write_junk(directory: str, name: str) -> str:
    """A file with a shard's name that is no tar, last written an hour ago (a broken download)."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(b"this is not a tar archive\n" * 100)
    old = os.stat(path).st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(old, old))
    return path


def write_in_place(directory: str, name: str, n: int) -> str:
    """A complete shard written at its final name just now and closed, as a plain copy, a
    download or webdataset's ShardWriter does: no writer holds it, so a reader takes it at once."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(tar_bytes(make_samples(name.split(".")[0], n)))
    return path


@contextlib.contextmanager
def held_open(directory: str, name: str, n: int, data: bytes | None = None):
    """A shard (``data``, else a complete one of ``n`` samples) written at its final name whose
    writer still holds it open for writing, as a preallocating or growing writer does until it
    closes the file: pending for as long as the ``with`` block lasts. Yields the path and file."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data if data is not None else tar_bytes(make_samples(name.split(".")[0], n)))
        f.flush()
        yield path, f

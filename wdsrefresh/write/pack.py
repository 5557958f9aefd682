"""Packing files into tar shards: grouping into samples, shard planning, atomic publishing.

Files are grouped into samples by webdataset's key rule (``names.split_key``: ``dir/a.b.c``
is extension ``b.c`` of sample ``dir/a``). Samples are written in key order, members of a
sample in extension order, with ``tarwriter``'s fixed metadata, so the same tree always
packs to the same bytes.

Guarantees of ``pack``:
- every input is checked (names, symlinks, readability, duplicate keys) before any shard is
  written; on any error nothing is published;
- each shard is written under a hidden temporary name, fsynced, then renamed to
  ``PREFIX-NNNNNN.tar``, numbered after the highest shard already in the output directory;
- the manifest (``manifest.json`` in the output directory) is rewritten atomically once,
  after all shards are durable, with exact sample counts, sizes and digests.
Publishing (``publish.py``) holds an exclusive lock on the output directory, so packs and
ingests into the same directory never take the same shard number.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..format.manifest import ManifestEntry
from ..format.names import split_key
from ..format.tarwriter import TarWriter, archive_overhead, member_size
from .publish import publish

log = logging.getLogger("wdsrefresh")

DEFAULT_PREFIX = "shard"
DEFAULT_MAXCOUNT = 10_000
DEFAULT_MAXSIZE = 1_000_000_000
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class PackError(ValueError):
    """Input that cannot be packed; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Member:
    name: str
    path: str
    size: int


@dataclass(frozen=True)
class Sample:
    key: str
    members: tuple[Member, ...]

    @property
    def tar_size(self) -> int:
        return sum(member_size(m.name, m.size) for m in self.members)


@dataclass(frozen=True)
class InputId:
    """Which file was packed: enough to tell it from a later file under the same name."""

    path: str
    ino: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class WrittenShard:
    """A durable shard under its temporary name, and the exact inputs it holds."""

    tmp_path: str
    nsamples: int
    filesize: int
    digest: str
    blocks: bytes
    inputs: tuple[InputId, ...]

    def entry(self, url: str) -> ManifestEntry:
        return ManifestEntry(url, self.nsamples, self.filesize, self.digest, self.blocks)


def parse_size(text: str | int) -> int:
    """``"1GB"`` -> 10**9, ``"64MiB"`` -> 2**26, ``"1000"`` -> 1000."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r} (examples: 1GB, 500MB, 64MiB, 1000)")
    return int(float(match.group(1)) * _UNITS[unit])


# ---- collecting inputs -------------------------------------------------------------------


def check_name(name: str, path: str) -> None:
    """Raises PackError unless ``name`` is a safe relative member name."""
    parts = name.split("/")
    if name.startswith("/") or os.path.isabs(name):
        raise PackError(f"{path}: member name {name!r} is absolute")
    if ".." in parts or "" in parts or "." in parts:
        raise PackError(f"{path}: member name {name!r} has '..', '.' or empty path components")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PackError(f"{path}: file name is not valid UTF-8") from None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_symlink(path: str, root_real: str, root: str, follow: bool) -> None:
    target = os.path.realpath(path)
    if not os.path.exists(target):
        raise PackError(f"{path}: dangling symlink (target {target} does not exist)")
    if not follow and not _inside(target, root_real):
        raise PackError(
            f"{path}: symlink points outside {root} (to {target}); not followed "
            "(use --follow-symlinks to include it)"
        )


def walk_tree(root: str, follow_symlinks: bool = False) -> Iterator[tuple[str, str]]:
    """Yields ``(name relative to root, path)`` of the regular files under ``root``.

    Hidden names (starting with '.') are skipped. Symlinks whose target lies outside
    ``root`` raise PackError unless ``follow_symlinks``; symlinked directories inside
    ``root`` are skipped (their files are packed under their real names).
    """
    root_real = os.path.realpath(root)
    visited = {root_real}
    stack = [("", root)]
    while stack:
        rel, directory = stack.pop()
        with os.scandir(directory) as it:
            entries = list(it)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                _check_symlink(entry.path, root_real, root, follow_symlinks)
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if (entry.is_symlink() and not follow_symlinks) or real in visited:
                    log.debug("%s: symlinked directory skipped", entry.path)
                    continue
                visited.add(real)
                stack.append((rel + entry.name + "/", entry.path))
            elif entry.is_file():
                yield rel + entry.name, entry.path
            else:
                raise PackError(f"{entry.path}: not a regular file or directory")


def _stat_readable(path: str) -> int:
    """The size of a regular file that can be opened for reading; PackError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exn:
        raise PackError(f"{path}: cannot be read ({exn.strerror})") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PackError(f"{path}: not a regular file")
    return st.st_size


def group_samples(files: Iterable[tuple[str, str, str]]) -> list[Sample]:
    """Groups ``(origin, name, path)`` triples into samples by webdataset's key rule.

    Returns samples sorted by key, members sorted by name. Raises PackError for a name
    without an extension, for two files that would be the same member of a sample
    (extensions compare lower-cased, as readers do), and for a key found in two origins.
    """
    by_key: dict[str, dict[str, Member]] = {}
    origin_of: dict[str, str] = {}
    for origin, name, path in files:
        check_name(name, path)
        key, ext = split_key(name)
        if key is None or not ext:
            raise PackError(f"{path}: name {name!r} has no extension, so it belongs to no sample")
        if origin_of.setdefault(key, origin) != origin:
            raise PackError(f"{path}: duplicate key {key!r}: also in {origin_of[key]}")
        members = by_key.setdefault(key, {})
        other = members.get(ext.lower())
        if other is not None:
            raise PackError(f"{path}: duplicate key {key!r}: {other.path} is the same member .{ext.lower()}")
        members[ext.lower()] = Member(name, path, _stat_readable(path))
    return [
        Sample(key, tuple(sorted(members.values(), key=lambda m: m.name)))
        for key, members in sorted(by_key.items())
    ]


def collect(sources: Sequence[str], follow_symlinks: bool = False) -> list[Sample]:
    """The samples in ``sources`` (directories, whose files are named relative to them, or
    single files, named by their base name). Raises PackError on any bad input or none."""
    def files() -> Iterator[tuple[str, str, str]]:
        for src in sources:
            if os.path.isdir(src):
                for name, path in walk_tree(src, follow_symlinks):
                    yield src, name, path
            elif os.path.lexists(src):
                yield src, os.path.basename(src), src
            else:
                raise PackError(f"{src}: no such file or directory")

    samples = group_samples(files())
    if not samples:
        raise PackError(f"nothing to pack: no files in {', '.join(sources) or 'no source given'}")
    return samples


# ---- planning and writing shards ---------------------------------------------------------


def plan_shards(samples: Sequence[Sample], maxcount: int, maxsize: int) -> list[list[Sample]]:
    """Splits samples, in order, into shards of at most ``maxcount`` samples and ``maxsize``
    bytes. A sample bigger than ``maxsize`` alone gets a shard of its own (with a warning)."""
    if maxcount < 1 or maxsize < 1:
        raise ValueError("maxcount and maxsize must be positive")
    shards: list[list[Sample]] = []
    current: list[Sample] = []
    size = archive_overhead()
    for sample in samples:
        need = sample.tar_size
        if current and (len(current) >= maxcount or size + need > maxsize):
            shards.append(current)
            current, size = [], archive_overhead()
        if need + archive_overhead() > maxsize:
            log.warning("sample %r is %d bytes, more than maxsize %d: it gets a shard of its own",
                        sample.key, need, maxsize)
        current.append(sample)
        size += need
    if current:
        shards.append(current)
    return shards


def write_shard(samples: Sequence[Sample], tmp_path: str, progress: Callable[[int], None] | None = None) -> WrittenShard:
    """Writes ``samples`` to the new file ``tmp_path`` and fsyncs it; removes it on error."""
    inputs = []
    try:
        with open(tmp_path, "xb") as f:
            writer = TarWriter(f)
            for sample in samples:
                for m in sample.members:
                    inputs.append(InputId(m.path, *writer.add_file(m.name, m.path, m.size)))
                    if progress:
                        progress(m.size)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp_path)
        raise
    assert writer.digest is not None and writer.blocks is not None
    return WrittenShard(tmp_path, len(samples), writer.size, writer.digest, writer.blocks, tuple(inputs))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="pack", disable=not sys.stderr.isatty())


def pack(
    sources: Sequence[str],
    out: str,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int | str = DEFAULT_MAXSIZE,
    prefix: str = DEFAULT_PREFIX,
    jobs: int = 1,
    follow_symlinks: bool = False,
) -> list[ManifestEntry]:
    """Packs the files under ``sources`` into new shards in ``out``; returns their entries.

    All or nothing: any bad input raises PackError before a shard is published, and a
    failure while writing removes the temporary files. See the module docstring.
    """
    samples = collect(sources, follow_symlinks)
    shards = plan_shards(samples, maxcount, parse_size(maxsize))
    os.makedirs(out, exist_ok=True)
    total = sum(m.size for s in samples for m in s.members)
    tmp = [os.path.join(out, f".pack-{os.getpid()}-{i:06d}.tar.tmp") for i in range(len(shards))]
    with _progress_bar(total) as bar, ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(write_shard, s, t, bar.update) for s, t in zip(shards, tmp)]
        try:
            written = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True)
            for path in tmp:
                _unlink_quietly(path)
            raise
    try:
        entries = publish(out, written, prefix)
    except BaseException:
        for path in tmp:
            _unlink_quietly(path)
        raise
    log.info("packed %d samples into %d shards in %s", len(samples), len(entries), out)
    return entries

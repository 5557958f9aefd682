"""``wr.Writer``: samples made in memory, written into published shards (webdataset's ShardWriter, safely).

    with wr.Writer("shards/", maxcount=1000, maxsize="1GB") as w:
        for i, (jpeg, label) in enumerate(produce()):
            w.write({"__key__": f"{i:08d}", "jpg": jpeg, "cls": label})

Values are encoded as webdataset's writer encodes them: ``bytes`` as they are, ``str`` as UTF-8,
anything else by the extension (``int`` under ``cls``, objects under ``json``, images under
``jpg``/``png``, ...: ``webdataset.writer.default_handlers``). Keys starting with ``_`` other than
``__key__`` are not written. Members of a sample are written in extension order, with the
packer's fixed tar metadata.

Each shard is written under a hidden temporary name in ``out``, fsynced, then published under
the lock of ``out``: numbered after the highest shard there (``PREFIX-NNNNNN.tar``, never
replacing a name), renamed into place, and its manifest entry written as a fragment
(``manifest.d/``), which readers take as listed. ``close()`` (the end of the ``with`` block)
publishes the last shard and merges the fragments into ``manifest.json``. A reader never sees a
partial shard: an exception in the block, or a kill, leaves the shard being written unpublished
(its temporary file is removed, or is hidden and swept by no one: ``.writer-*.tmp``).
On an object store (``s3://``) the steps are ``destination.py``'s: the temporary file is local,
the number comes from the prefix's counter, the upload never replaces an object.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping

from ..format.manifest import ManifestEntry
from ..format.tarwriter import TarWriter, archive_overhead, member_size
from .keys import record_shard
from .destination import open_destination
from .pack import (
    DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE, DEFAULT_PREFIX, check_destination, check_name, check_prefix, parse_size,
)
from .publish import named

log = logging.getLogger("wdsrefresh")


def encode(sample: Mapping) -> tuple[str, list[tuple[str, bytes]]]:
    """``(key, [(member name, bytes), ...])`` of a sample dict, members in extension order."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise ValueError(f"a sample needs a non-empty string __key__, got {key!r}")
    members = []
    for ext in sorted(sample):
        if ext.startswith("_"):
            continue
        name = f"{key}.{ext}"
        check_name(name, f"sample {key!r}")
        members.append((name, _encoded(sample[ext], ext, key)))
    if not members:
        raise ValueError(f"sample {key!r} has no members (only keys starting with '_')")
    return key, members


def _encoded(value: object, ext: str, key: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    from webdataset.writer import default_handlers, encode_based_on_extension1

    try:
        return encode_based_on_extension1(value, ext, default_handlers)
    except ValueError as exn:
        raise ValueError(f"sample {key!r}: cannot encode the {type(value).__name__} under {ext!r} ({exn}); "
                         "give bytes or str, or an extension webdataset encodes (cls, json, npy, jpg, ...)") from None


class Writer:
    """A ShardWriter-like context manager whose shards are published atomically, listed at once.

    ``out`` is a local directory or an ``s3://bucket/prefix/`` URL (``storage_options`` as
    ``pack`` takes them): there each shard is written to a local temporary file, uploaded whole
    under a number taken from the prefix's counter (a conditional PUT that never replaces an
    object), and described by its fragment in ``manifest.d/``; ``close()`` compacts the fragments
    into ``manifest.json`` with a conditional PUT."""

    def __init__(self, out: str, maxcount: int = DEFAULT_MAXCOUNT, maxsize: int | str = DEFAULT_MAXSIZE,
                 prefix: str = DEFAULT_PREFIX, storage_options: dict | None = None):
        check_prefix(prefix)
        check_destination(out)
        self.maxsize = parse_size(maxsize)
        if maxcount < 1 or self.maxsize < 1:
            raise ValueError("maxcount and maxsize must be positive")
        self.dest = open_destination(out, storage_options)
        self.out, self.maxcount, self.prefix = self.dest.url, maxcount, prefix
        self.tag = secrets.token_hex(8)  # names this writer's temporaries and fragments
        self.published: list[ManifestEntry] = []
        self._file = None
        self._tar: TarWriter | None = None
        self._keys: list[str] = []
        self.dest.prepare()

    @property
    def _tmp_path(self) -> str:
        return self.dest.temporary(self.tag, len(self.published), kind="writer")

    def write(self, sample: Mapping) -> None:
        """Adds one sample; publishes the current shard first when the sample would make it
        exceed ``maxcount`` samples or ``maxsize`` bytes (a bigger sample gets a shard of its own)."""
        key, members = encode(sample)
        need = sum(member_size(name, len(data)) for name, data in members)
        if self._tar is not None and (len(self._keys) >= self.maxcount
                                      or self._tar.size + need + archive_overhead() > self.maxsize):
            self._publish()
        if self._tar is None:
            self._file = open(self._tmp_path, "xb")
            self._tar = TarWriter(self._file)
        try:
            for name, data in members:
                self._tar.add_bytes(name, data)
        except OSError as exn:
            self._discard()
            raise named(exn, self._tmp_path) from None
        self._keys.append(key)

    def _publish(self) -> None:
        """Ends the current shard, makes it durable, and publishes it with its fragment."""
        tmp, tar, f = self._tmp_path, self._tar, self._file
        try:
            tar.close()
            f.flush()
            os.fsync(f.fileno())
            f.close()
        except OSError as exn:
            self._discard()
            raise named(exn, tmp) from None
        self._file = self._tar = None
        entry = ManifestEntry("", len(self._keys), tar.size, tar.digest, tar.blocks, os.stat(tmp).st_mtime_ns)
        try:
            entry = self.dest.publish_next(tmp, self.prefix, entry)  # a rename keeps the mtime
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.dest.write_fragment(self.tag, len(self.published), [entry])
        record_shard(self.dest, entry.url, self._keys)
        log.info("published %s: %d samples, %d bytes", self.dest.location(entry.url), entry.nsamples,
                 entry.filesize)
        self.published.append(entry)
        self._keys = []
    def _discard(self) -> None:
        """Drops the shard being written: nothing of it is published."""
        if self._file is not None:
            self._file.close()
            try:
                os.unlink(self._tmp_path)
            except FileNotFoundError:
                pass
        self._file = self._tar = None
        self._keys = []

    def close(self) -> list[ManifestEntry]:
        """Publishes the last shard (if it holds a sample) and merges the fragments into
        ``manifest.json``; returns the entries of every shard this writer published."""
        if self._tar is not None:
            if self._keys:
                self._publish()
            else:
                self._discard()
        if self.published:
            self.dest.commit(self.tag)
        return self.published

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()  # shards finished before the error stay published (listed by their fragments)

"""A snapshot as packed columns: the compact form a checkpoint carries.

A snapshot of 100k shards is about 22 MB as pickled ``ShardInfo`` objects; as columns it is
one string of names, one of digests, a few arrays of little-endian int64 and the block digests
concatenated, about 110 bytes per shard plus 8 per 4 MiB block. The document holds only plain
values (str, int, bytes, dict), so it survives ``torch.save``, pickling and ``copy.deepcopy``::

    {"id": ..., "epoch": 3, "count": N,
     "names": "a.tar\\0b.tar...",                 # relative to the source root
     "root": "/data/shards/",                    # url = root + name (else "urls": joined urls)
     "paths": "...",                             # only where some path differs from its url
     "size": b"...", "mtime_ns": b"...", "inode": b"...", "device": b"...",
     "nsamples": b"...", "block_size": b"...",   # int64 columns, 8 bytes per shard
     "flags": b"...",                            # per shard: has digest, has blocks, has nsamples
     "digests": "xxh3_128:...\\0...",
     "blocks": b"...",                           # each shard's block digests, in shard order
     "etags": "...", "version_ids": "..."}       # objects in a store only

``decode`` treats the document as hostile: every column must have the length the count says,
blocks must add up to what the sizes imply, and the id must match the content.
"""

from __future__ import annotations

import sys
from array import array
from itertools import accumulate
import numpy

from ..errors import WdsRefreshError
from .snapshot import LazySequence, ShardInfo, Snapshot, snapshot_id

SEPARATOR = "\0"  # cannot occur in a file name or an object key
_TEXT_COLUMNS = ("names", "urls", "paths", "digests", "etags", "version_ids")
_INT_COLUMNS = ("size", "mtime_ns", "inode", "device", "nsamples", "block_size")
_HAS_DIGEST, _HAS_BLOCKS, _HAS_NSAMPLES = 1, 2, 4
_BLOCK_DIGEST_SIZE = 8


class ColumnsError(WdsRefreshError, ValueError):
    """A columnar snapshot that is malformed or does not match its id."""


def encode(snapshot: Snapshot) -> dict:
    """``snapshot`` as packed columns (see the module docstring); ``decode`` rebuilds it exactly."""
    shards = snapshot.shards
    names = [s.name for s in shards]
    urls = [s.url for s in shards]
    doc: dict = {"id": snapshot.id, "epoch": snapshot.epoch, "count": len(shards), "names": _join(names, "name")}
    root = _common_root(urls, names)
    if root is None:
        doc["urls"] = _join(urls, "url")
    else:
        doc["root"] = root
    if any(s.path != s.url for s in shards):
        doc["paths"] = _join([s.path for s in shards], "path")
    for column in _INT_COLUMNS:
        doc[column] = pack_int64(getattr(s, column) or 0 for s in shards)
    doc["flags"] = bytes(_flags(s) for s in shards)
    doc["digests"] = _join([s.digest or "" for s in shards], "digest")
    doc["blocks"] = b"".join(_checked_blocks(s) for s in shards)
    for column, attr in (("etags", "etag"), ("version_ids", "version_id")):
        values = [getattr(s, attr) for s in shards]
        if any(v is not None for v in values):
            doc[column] = _join([v or "" for v in values], attr)
    return doc


def with_offsets(doc: dict) -> dict:
    """``doc`` plus where each value of its text columns ends (``ends``: int64 per value), so a
    ``ShardTable`` finds one shard's name without splitting 100k of them. For the state
    directory, which writes a snapshot once and has every consumer read a few of its shards."""
    ends = {}
    for column in _TEXT_COLUMNS:
        if column in doc:
            values = doc[column].split(SEPARATOR) if doc["count"] else []  # "" is no value, not one empty one
            ends[column] = pack_int64(accumulate(len(v) + 1 for v in values))
    return {**doc, "ends": ends}


def decode(doc: object) -> Snapshot:
    """The snapshot ``encode`` made of ``doc``, every shard built and the id checked against them;
    ColumnsError naming the column that is wrong. For documents from outside (checkpoints), whose
    recorded ends (if any) are not trusted: values come from the split columns."""
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k != "ends"}
    table = ShardTable(doc)
    for column in _TEXT_COLUMNS:
        table.text(column)  # every value checked, even those no shard uses
    shards = tuple(table)
    if snapshot_id(shards) != table.id:
        raise ColumnsError(f"snapshot.id {table.id!r} does not match its shards (corrupted state?)")
    return Snapshot(table.epoch, shards, table.id)


def decode_lazy(doc: object) -> Snapshot:
    """The snapshot of ``doc`` with its shards built only when asked for (``ShardTable``): a
    consumer reading a few shards of 100k loads in milliseconds. The columns are checked, the id
    is trusted: for documents this process's own kind wrote (the state directory)."""
    table = ShardTable(doc)
    return Snapshot(table.epoch, table, table.id)


class ShardTable(LazySequence):
    """A snapshot's shards as columns: a read-only sequence of ``ShardInfo`` built on access."""

    def __init__(self, doc: object):
        doc = _get(doc, None, dict, "snapshot")
        self.doc = doc
        self.id = _get(doc, "id", str, "snapshot")
        self.epoch = _get(doc, "epoch", int, "snapshot")
        count = self.count = _get(doc, "count", int, "snapshot")
        if count < 0:
            raise ColumnsError(f"snapshot.count: {count} is negative")
        for column in _TEXT_COLUMNS:
            if column in doc:
                _get(doc, column, str, "snapshot")
        if "urls" not in doc:
            _get(doc, "root", str, "snapshot")
        self.ints = {column: _int64_column(doc, column, count) for column in _INT_COLUMNS}
        self.flags = numpy.frombuffer(_get(doc, "flags", bytes, "snapshot"), dtype=numpy.uint8)
        if len(self.flags) != count:
            raise ColumnsError(f"snapshot.flags: {len(self.flags)} bytes for {count} shards")
        self._text: dict[str, list[str] | None] = {}  # split on first use: most consumers build few shards
        self._ends = {column: unpack_int64(data, count, f"snapshot.ends.{column}")
                      for column, data in _get(doc, "ends", dict, "snapshot").items()} if "ends" in doc else {}
        self.blocks = _get(doc, "blocks", bytes, "snapshot")
        self.block_starts = self._block_starts()
        self._built: dict[int, ShardInfo] = {}

    def text(self, column: str) -> list[str] | None:
        """A text column split into its values (None if the document has no such column)."""
        if column not in self._text:
            self._text[column] = _split(self.doc, column, self.count) if column in self.doc else None
        return self._text[column]

    def value(self, column: str, i: int) -> str | None:
        """Value ``i`` of a text column: cut at its recorded end when the document has one
        (``with_offsets``), else from the split column; None if there is no such column."""
        if column not in self.doc:
            return None
        ends = self._ends.get(column)
        if ends is None:
            return self.text(column)[i]
        start = int(ends[i - 1]) if i else 0
        return self.doc[column][start:int(ends[i]) - 1]

    def _block_starts(self):
        """Where each shard's block digests start in the blocks column (one more: the end)."""
        size, block_size = self.ints["size"], self.ints["block_size"]
        bad = numpy.flatnonzero((size < 0) | (block_size <= 0))
        if len(bad):
            i = int(bad[0])
            raise ColumnsError(f"snapshot shard {i} ({self.text('names')[i]!r}): size {size[i]}, "
                               f"block size {block_size[i]}")
        nblocks = numpy.where(self.flags & _HAS_BLOCKS, -(-size // block_size), 0)
        if (nblocks > len(self.blocks) // _BLOCK_DIGEST_SIZE).any():  # also keeps the sum below from overflowing
            i = int(numpy.argmax(nblocks))
            raise ColumnsError(f"snapshot.blocks: {len(self.blocks)} bytes, shard {i} ({self.text('names')[i]!r}) alone "
                               f"calls for {nblocks[i]} block digests")
        starts = numpy.concatenate(([0], numpy.cumsum(nblocks * _BLOCK_DIGEST_SIZE)))
        if starts[-1] != len(self.blocks):
            raise ColumnsError(f"snapshot.blocks: {len(self.blocks)} bytes, the shards' sizes call for {starts[-1]}")
        return starts

    def __len__(self) -> int:
        return self.count

    def _item(self, index: int) -> ShardInfo:
        shard = self._built.get(index)
        if shard is None:
            shard = self._built[index] = self._build(index)
        return shard

    def _build(self, i: int) -> ShardInfo:
        ints, flags, name = {k: int(v[i]) for k, v in self.ints.items()}, int(self.flags[i]), self.value("names", i)
        url = self.value("urls", i) or self.doc["root"] + name
        return ShardInfo(
            url=url, path=self.value("paths", i) or url, size=ints["size"],
            mtime_ns=ints["mtime_ns"], inode=ints["inode"], device=ints["device"],
            nsamples=ints["nsamples"] if flags & _HAS_NSAMPLES else None,
            digest=self.value("digests", i) if flags & _HAS_DIGEST else None,
            blocks=self.blocks[self.block_starts[i]:self.block_starts[i + 1]] if flags & _HAS_BLOCKS else None,
            block_size=ints["block_size"], name=name,
            etag=self.value("etags", i) or None, version_id=self.value("version_ids", i) or None,
        )

    def sample_counts(self) -> list[int]:
        """Every shard's sample count (0 where unknown), in order, without building the shards."""
        return self.sample_count_array().tolist()

    def sample_count_array(self):
        return numpy.where(self.flags & _HAS_NSAMPLES, self.ints["nsamples"], 0)

    def __reduce__(self):
        return ShardTable, (self.doc,)

    def __repr__(self) -> str:
        return f"ShardTable({self.count} shards, snapshot {self.id})"


def _int64_column(doc: dict, column: str, count: int):
    data = _get(doc, column, bytes, "snapshot")
    if len(data) != 8 * count:
        raise ColumnsError(f"snapshot.{column}: {len(data)} bytes for {count} values (expected {8 * count})")
    return numpy.frombuffer(data, dtype="<i8")


def _flags(s: ShardInfo) -> int:
    return ((_HAS_DIGEST if s.digest is not None else 0) | (_HAS_BLOCKS if s.blocks is not None else 0)
            | (_HAS_NSAMPLES if s.nsamples is not None else 0))


def _checked_blocks(s: ShardInfo) -> bytes:
    if s.blocks is not None and len(s.blocks) != _BLOCK_DIGEST_SIZE * -(-s.size // s.block_size):
        raise ValueError(f"{s.url}: {len(s.blocks)} bytes of block digests for {s.size} bytes in "
                         f"{s.block_size}-byte blocks")
    return s.blocks or b""


def _common_root(urls: list[str], names: list[str]) -> str | None:
    """The prefix every url has before its name, when there is one prefix; None otherwise."""
    if not urls or not all(u.endswith(n) for u, n in zip(urls, names)):
        return None
    root = urls[0][:len(urls[0]) - len(names[0])]
    return root if all(len(u) - len(n) == len(root) and u.startswith(root) for u, n in zip(urls, names)) else None


def _join(values: list[str], what: str) -> str:
    for v in values:
        if SEPARATOR in v:
            raise ValueError(f"a shard's {what} {v!r} holds a NUL character: it cannot be checkpointed")
    return SEPARATOR.join(values)


def _split(doc: dict, column: str, count: int) -> list[str]:
    text = _get(doc, column, str, "snapshot")
    values = text.split(SEPARATOR) if count else ([] if text == "" else [text, ""])
    if len(values) != count:
        raise ColumnsError(f"snapshot.{column}: {len(values)} values for {count} shards")
    return values


def pack_int64(values) -> bytes:
    """Integers as little-endian int64s, 8 bytes each."""
    column = array("q", values)
    if sys.byteorder == "big":
        column.byteswap()
    return column.tobytes()


def unpack_int64(data: bytes, count: int, what: str) -> array:
    """The ``count`` integers ``pack_int64`` made of ``data``; ColumnsError naming ``what`` otherwise."""
    if len(data) != 8 * count:
        raise ColumnsError(f"{what}: {len(data)} bytes for {count} values (expected {8 * count})")
    values = array("q")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _get(doc: object, key: str | None, kind: type, where: str):
    value = doc if key is None else doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = where if key is None else f"{where}.{key}"
        raise ColumnsError(f"{what}: expected {kind.__name__}, got {type(value).__name__} {value!r:.60}")
    return value

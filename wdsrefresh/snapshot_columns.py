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

from .snapshot import ShardInfo, Snapshot, snapshot_id

SEPARATOR = "\0"  # cannot occur in a file name or an object key
_INT_COLUMNS = ("size", "mtime_ns", "inode", "device", "nsamples", "block_size")
_HAS_DIGEST, _HAS_BLOCKS, _HAS_NSAMPLES = 1, 2, 4
_BLOCK_DIGEST_SIZE = 8


class ColumnsError(ValueError):
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


def decode(doc: object) -> Snapshot:
    """The snapshot ``encode`` made of ``doc``; ColumnsError naming the column that is wrong."""
    doc = _get(doc, None, dict, "snapshot")
    count = _get(doc, "count", int, "snapshot")
    if count < 0:
        raise ColumnsError(f"snapshot.count: {count} is negative")
    names = _split(doc, "names", count)
    urls = [_get(doc, "root", str, "snapshot") + n for n in names] if "urls" not in doc else _split(doc, "urls", count)
    paths = _split(doc, "paths", count) if "paths" in doc else urls
    ints = {column: unpack_int64(_get(doc, column, bytes, "snapshot"), count, f"snapshot.{column}")
            for column in _INT_COLUMNS}
    flags = _get(doc, "flags", bytes, "snapshot")
    if len(flags) != count:
        raise ColumnsError(f"snapshot.flags: {len(flags)} bytes for {count} shards")
    digests = _split(doc, "digests", count)
    etags = _split(doc, "etags", count) if "etags" in doc else [""] * count
    version_ids = _split(doc, "version_ids", count) if "version_ids" in doc else [""] * count
    blocks = _BlockReader(_get(doc, "blocks", bytes, "snapshot"))
    shards = []
    for i in range(count):
        size, block_size = ints["size"][i], ints["block_size"][i]
        if size < 0 or block_size <= 0:
            raise ColumnsError(f"snapshot shard {i} ({names[i]!r}): size {size}, block size {block_size}")
        shards.append(ShardInfo(
            url=urls[i], path=paths[i], size=size, mtime_ns=ints["mtime_ns"][i], inode=ints["inode"][i],
            device=ints["device"][i],
            nsamples=ints["nsamples"][i] if flags[i] & _HAS_NSAMPLES else None,
            digest=digests[i] if flags[i] & _HAS_DIGEST else None,
            blocks=blocks.take(-(-size // block_size), names[i]) if flags[i] & _HAS_BLOCKS else None,
            block_size=block_size, name=names[i], etag=etags[i] or None, version_id=version_ids[i] or None,
        ))
    blocks.check_consumed()
    shards = tuple(shards)
    sid = _get(doc, "id", str, "snapshot")
    if snapshot_id(shards) != sid:
        raise ColumnsError(f"snapshot.id {sid!r} does not match its shards (corrupted state?)")
    return Snapshot(_get(doc, "epoch", int, "snapshot"), shards, sid)


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


class _BlockReader:
    """Hands out each shard's block digests from the concatenated column, checking the lengths."""

    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def take(self, nblocks: int, name: str) -> bytes:
        end = self.offset + nblocks * _BLOCK_DIGEST_SIZE
        if end > len(self.data):
            raise ColumnsError(f"snapshot.blocks: ends at byte {len(self.data)}, shard {name!r} needs bytes "
                               f"{self.offset}..{end}")
        chunk, self.offset = self.data[self.offset:end], end
        return chunk

    def check_consumed(self) -> None:
        if self.offset != len(self.data):
            raise ColumnsError(f"snapshot.blocks: {len(self.data) - self.offset} bytes beyond the last shard's")


def _get(doc: object, key: str | None, kind: type, where: str):
    value = doc if key is None else doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = where if key is None else f"{where}.{key}"
        raise ColumnsError(f"{what}: expected {kind.__name__}, got {type(value).__name__} {value!r:.60}")
    return value

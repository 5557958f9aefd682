"""Writing plain tar shards: ustar headers in GNU form, no per-member PAX headers.

Every member gets the same fixed metadata (mode 0644, uid/gid 0, no user names, a fixed
integer mtime), so the bytes of a shard are a pure function of its member names and
contents in the order added. Names longer than 100 bytes get a GNU long-name ('L') record,
sizes of 8 GiB and more use GNU base-256 numbers; GNU tar, Python's tarfile, webdataset and
``wdsrefresh.format.tario`` all read both.

The writer digests the bytes as it writes them (``digest.FileDigester`` over aligned
``BLOCK_SIZE`` blocks), so a shard's whole-file and block digests cost no second read.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from ..errors import WdsRefreshError
from .digest import BLOCK_SIZE, FileDigester

RECORD = 512
DEFAULT_MTIME = 0
_GNU_MAGIC = b"ustar  \0"
_LONGLINK = b"././@LongLink"


class TarWriteError(WdsRefreshError, OSError):
    """A member could not be written as declared; names the member and the file."""


def member_size(name: str, size: int) -> int:
    """Bytes one member takes in a shard: header(s) plus padded payload."""
    encoded = name.encode("utf-8")
    longname = _padded(len(encoded) + 1) + RECORD if len(encoded) > 100 else 0
    return longname + RECORD + _padded(size)


def archive_overhead() -> int:
    """Bytes of the end-of-archive marker."""
    return 2 * RECORD


def _padded(size: int) -> int:
    return size + (-size % RECORD)


def _number(value: int, width: int) -> bytes:
    """An octal field of ``width`` bytes, or GNU base-256 when the value does not fit."""
    digits = width - 1
    if value < 8**digits:
        return b"%0*o\0" % (digits, value)
    return bytes([0o200]) + value.to_bytes(width - 1, "big")


def header(name: bytes, size: int, kind: bytes = b"0", mtime: int = DEFAULT_MTIME) -> bytes:
    """One 512-byte GNU/ustar header; ``name`` must be at most 100 bytes."""
    assert len(name) <= 100
    hdr = bytearray(RECORD)
    hdr[0 : len(name)] = name
    hdr[100:108] = _number(0o644, 8)
    hdr[108:116] = _number(0, 8)
    hdr[116:124] = _number(0, 8)
    hdr[124:136] = _number(size, 12)
    hdr[136:148] = _number(mtime, 12)
    hdr[148:156] = b" " * 8
    hdr[156:157] = kind
    hdr[257:265] = _GNU_MAGIC
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def member_headers(name: str, size: int, mtime: int = DEFAULT_MTIME) -> bytes:
    """The header bytes for a regular member, with a GNU long-name record when needed."""
    encoded = name.encode("utf-8")
    if len(encoded) <= 100:
        return header(encoded, size, mtime=mtime)
    data = encoded + b"\0"
    record = header(_LONGLINK, len(data), kind=b"L", mtime=mtime) + data + bytes(-len(data) % RECORD)
    return record + header(encoded[:100], size, mtime=mtime)


class _BlockSink:
    """Collects output in one ``BLOCK_SIZE`` buffer; each full block is digested, then written.

    File payloads are read straight into the buffer, so each byte is copied once.
    """

    def __init__(self, f: BinaryIO):
        self.f = f
        self.digester = FileDigester()
        self.buf = memoryview(bytearray(BLOCK_SIZE))
        self.fill = 0
        self.flushed = 0

    @property
    def size(self) -> int:
        return self.flushed + self.fill

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), BLOCK_SIZE - self.fill)
            self.buf[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == BLOCK_SIZE:
                self._flush()

    def copy_from(self, src: BinaryIO, n: int) -> int:
        """Reads up to ``n`` bytes of ``src`` into the output; returns how many it got."""
        left = n
        while left:
            room = min(left, BLOCK_SIZE - self.fill)
            got = src.readinto(self.buf[self.fill : self.fill + room])
            if not got:
                break
            self.fill += got
            left -= got
            if self.fill == BLOCK_SIZE:
                self._flush()
        return n - left

    def _flush(self) -> None:
        block = self.buf[: self.fill]
        self.digester.update_block(block)
        self.f.write(block)
        self.flushed += self.fill
        self.fill = 0

    def finish(self) -> FileDigester:
        if self.fill:
            self._flush()
        return self.digester


class TarWriter:
    """Writes members to an open binary file in the order given; ``close()`` ends the archive.

    Guarantees: the output is a valid tar with exactly the members added, in order; after
    ``close()``, ``digest``, ``blocks`` and ``size`` describe the bytes written exactly.
    Member names are used as given (the caller validates them).
    """

    def __init__(self, f: BinaryIO, mtime: int = DEFAULT_MTIME):
        self.sink = _BlockSink(f)
        self.mtime = mtime
        self.digest: str | None = None
        self.blocks: bytes | None = None

    @property
    def size(self) -> int:
        return self.sink.size

    def add_file(self, name: str, path: str, size: int) -> tuple[int, int, int]:
        """Adds the file at ``path`` as ``name``; it must hold exactly ``size`` bytes.

        Returns the (inode, size, mtime_ns) of the file that was read. Raises TarWriteError
        when the file's size is not ``size`` (it changed since it was listed).
        """
        with open(path, "rb", buffering=0) as src:
            st = os.fstat(src.fileno())
            if st.st_size != size:
                raise TarWriteError(f"{path}: size changed from {size} to {st.st_size} bytes while packing")
            self.sink.write(member_headers(name, size, self.mtime))
            got = self.sink.copy_from(src, size)
            if got != size:
                raise TarWriteError(f"{path}: ended after {got} of {size} bytes while packing")
        self.sink.write(bytes(-size % RECORD))
        return st.st_ino, st.st_size, st.st_mtime_ns

    def add_bytes(self, name: str, data: bytes) -> None:
        """Adds ``data`` (bytes held in memory) as member ``name``."""
        self.sink.write(member_headers(name, len(data), self.mtime))
        self.sink.write(data)
        self.sink.write(bytes(-len(data) % RECORD))

    def close(self) -> None:
        """Writes the end-of-archive marker and finalises the digests (does not close the file)."""
        self.sink.write(bytes(archive_overhead()))
        digester = self.sink.finish()
        self.digest, self.blocks = digester.digest, digester.blocks

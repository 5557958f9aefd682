"""A fast streaming tar sample reader that replaces ``tarfile`` on the read path.

Guarantees:

- Samples are grouped exactly as webdataset 1.0.2 groups them (``base_plus_ext`` keys,
  lower-cased extensions, ``__meta__`` names and non-regular members skipped, one shard at a
  time), with ``__key__``, ``__url__`` and ``__local_path__``.
- Every byte a yielded sample depends on (its payloads and every header up to the one that
  ends it) was hashed and compared with the snapshot's block digest before the sample is
  yielded, from the very bytes the sample was cut from: no second read, no window in which
  the file could change between the check and the use.
- A read error never merges a partial sample into anything: samples are yielded complete.
- Samples can be skipped by index without copying their payloads (the exact split).

How it is fast: a local shard is read with ``os.pread`` in chunks that grow to 1 MiB while
members are small, and large payloads are read straight into their own ``bytes`` (one copy,
hashed while still in cache). Headers are parsed in place; the common member (ustar, regular,
short name, no PAX path/size) takes one short path through a single loop. Bytes are hashed
when consumed, so the part of a chunk a large payload makes unnecessary is never hashed. As
the block digests cover 4 MiB blocks, samples are held until the blocks they depend on are
complete and checked. gzip shards (``.tgz``, ``.tar.gz``) are decompressed as a stream; their
raw blocks are checked as they are read, before decompression. Files are never mmap'ed: a
file truncated under an mmap kills the process with SIGBUS.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol

import xxhash

from ..errors import WdsRefreshError
from .digest import BLOCK_SIZE, DEFAULT_ALGO, block_at, new_hasher, split_digest
from .heap import keep_freed_memory

ZERO_BLOCK = bytes(512)

# A tar is a sequence of 512-byte header blocks, each followed by its member's data padded
# to whole blocks: ``(size + 511) & -512``. The fields of a header that the reader looks at:
_OFF_NAME, _END_NAME = 0, 100  # the name; NUL-terminated when shorter than 100 bytes
_OFF_SIZE, _END_SIZE = 124, 136  # the size: 11 octal digits then a NUL, or base-256 (first byte 0x80/0xff)
_OFF_SIZE_NUL = 135  # where the NUL after 11 octal digits is
_OFF_CHKSUM, _END_CHKSUM = 148, 156  # the header checksum, counted as 8 spaces in the sum
_OFF_TYPE = 156  # the type flag, one byte
_OFF_MAGIC, _END_MAGIC = 257, 262  # b"ustar" in ustar, PAX and GNU headers
_OFF_PREFIX, _END_PREFIX = 345, 500  # ustar's name prefix (dir part), joined with '/'; NUL when unused
_MAGIC = b"ustar"
_TYPE_REGULAR = 48  # b"0"
_TYPE_PAX = 120  # b"x": a PAX extended header for the next member
_SLASH = 47  # b"/"
_UNDERSCORE = 95  # b"_"
_REGULAR = (b"0", b"\0", b"7")
_OTHER_KNOWN = (b"1", b"2", b"3", b"4", b"5", b"6")
_EXTENDED = (b"x", b"g", b"L", b"K")
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIGITS = 20  # of a PAX length or size: 2**64 has 20
_KEY_RE_BYTES = re.compile(rb"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE_BYTES = re.compile(rb"__[^/]*__($|/)")
_INF = float("inf")

_FIRST_CHUNK = 64 << 10  # first read of a shard; doubles at each refill up to _MAX_CHUNK
_MAX_CHUNK = 1 << 20
_AFTER_LARGE_CHUNK = 8 << 10  # after a payload read on its own, the next one likely is too
_DIRECT_MIN = 64 << 10  # payloads this large that run past the chunk are read on their own

MAX_SAMPLE_BYTES = 1 << 30  # default: the largest member a reader holds; larger ones are refused
_MAX_EXTENDED = 1 << 20  # PAX and GNU long-name data; Go's archive/tar draws the line there too
_MAX_SIZE = (1 << 63) - 1  # no file is larger (off_t); a larger size is corruption, not truncation


class TarError(WdsRefreshError, ValueError):
    """A shard is not a well-formed tar; names the shard and the offset.

    ``truncated`` marks data that ends too early: the sign of a shard still being written.
    ``where`` says what the offset counts: "byte" of the file, or "uncompressed offset" in
    the decompressed stream of a gzip shard. With ``stop``, the error lies somewhere in the
    block of bytes ``offset <= b < stop`` (a block digest says which block, not which byte).
    """

    def __init__(self, url: str, offset: int, message: str, truncated: bool = False, *, where: str = "byte",
                 stop: int | None = None):
        super().__init__(f"{url}: {_position(offset, stop, where)}: {message}")
        self.url = url
        self.offset = offset
        self.stop = stop
        self.truncated = truncated
        self.where = where


def _position(offset: int, stop: int | None, where: str = "byte") -> str:
    """"at byte 700", or "in the block at bytes 0-4194303" for a block ``[offset, stop)``."""
    return f"at {where} {offset}" if stop is None else f"in the block at bytes {offset}-{stop - 1}"


class ShardChangedError(WdsRefreshError, RuntimeError):
    """The bytes of a shard differ from the snapshot it was listed in."""

    def __init__(self, url: str, offset: int, message: str, *, stop: int | None = None):
        super().__init__(f"{url}: {_position(offset, stop)}: {message}")
        self.url = url
        self.offset = offset
        self.stop = stop  # with it, the difference lies in the block [offset, stop)


@dataclass(frozen=True)
class Expected:
    """What the snapshot says a shard is; any of it may be unknown."""

    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    digest: str | None = None
    blocks: bytes | None = None
    block_size: int = BLOCK_SIZE


# --------------------------------------------------------------------------- raw bytes


class IOCounters:
    """What reading shards costs, added up over the shards read with it: ``bytes_read`` (bytes
    the read calls returned), ``read_seconds`` (time blocked in those calls) and
    ``verify_seconds`` (time hashing bytes to check them against digests). Measured once per
    read call and per hashed chunk, never per sample. Any object with these attributes will do."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.verify_seconds = 0.0


def _timed_pread(fd: int, size: int, offset: int, counters: IOCounters | None) -> bytes:
    if counters is None:
        return os.pread(fd, size, offset)
    started = perf_counter()
    data = os.pread(fd, size, offset)
    counters.read_seconds += perf_counter() - started
    counters.bytes_read += len(data)
    return data


class _Checker:
    """Hashes a file's raw bytes in order, each once, and checks or records the digests.

    ``hashed`` is how far it has seen; ``verified`` how far the bytes are known good (infinite
    when there is nothing to check block by block). ``sequential`` means every byte must be
    seen (whole-file digest, or digests being recorded); otherwise whole blocks that nothing
    is read from may be jumped over.
    """

    def __init__(self, url: str, expected: Expected | None = None, record: bool = False,
                 algo: str = DEFAULT_ALGO, counters: IOCounters | None = None):
        self.url = url
        self.counters = counters
        self.blocks = expected.blocks if expected else None
        self.block_size = expected.block_size if expected else BLOCK_SIZE
        self.whole = self.whole_algo = self.whole_hex = None
        if record:
            self.whole_algo = algo
            self.whole = new_hasher(algo)
        elif expected and expected.digest and not self.blocks:
            self.whole_algo, self.whole_hex = split_digest(expected.digest)
            self.whole = new_hasher(self.whole_algo)
        self.recorded: list[bytes] | None = [] if record else None
        self.block_hasher = xxhash.xxh3_64() if (self.blocks is not None or record) else None
        self.active = self.block_hasher is not None or self.whole is not None
        self.sequential = self.whole is not None
        self.hashed = 0
        self.index = 0
        self.block_end = self.block_size
        self.verified = 0 if self.blocks is not None else _INF

    def feed(self, data) -> None:
        """Takes the bytes that follow ``hashed``; checks each block as it completes."""
        if self.counters is not None and len(data):
            started = perf_counter()
            self._feed(data)
            self.counters.verify_seconds += perf_counter() - started
        else:
            self._feed(data)

    def _feed(self, data) -> None:
        n = len(data)
        if not n:
            return
        if self.whole is not None:
            self.whole.update(data)
        if self.block_hasher is not None:
            start, done = self.hashed, 0
            while start + n - done >= self.block_end:
                cut = self.block_end - start
                self.block_hasher.update(memoryview(data)[done : done + cut])
                done += cut
                start += cut
                self._close_block(self.block_end)
            if done < n:
                self.block_hasher.update(memoryview(data)[done:] if done else data)
        self.hashed += n

    def end_of_file(self) -> None:
        """The file ends at ``hashed``: the last, short block is complete."""
        self.ends_at(self.hashed)
        if self.block_hasher is not None and self.hashed > self.block_end - self.block_size:
            self._close_block(self.hashed)

    def ends_at(self, offset: int) -> None:
        """The file ends at ``offset``. Raises ShardChangedError when the snapshot's blocks
        say it reached further: cut at a block boundary, no short block would show it."""
        if self.blocks is not None and offset <= (len(self.blocks) // 8 - 1) * self.block_size:
            raise ShardChangedError(self.url, offset, f"the shard ends at byte {offset}, before the snapshot's "
                                                      f"last block (truncated since)")

    def jump(self, offset: int) -> None:
        """Skips to ``offset``, which lies in a later block than any byte hashed so far."""
        index = offset // self.block_size
        self.block_hasher.reset()
        self.index = index
        self.hashed = index * self.block_size
        self.block_end = self.hashed + self.block_size

    def _close_block(self, end: int) -> None:
        digest = self.block_hasher.digest()
        self.block_hasher.reset()
        if self.recorded is not None:
            self.recorded.append(digest)
        elif digest != block_at(self.blocks, self.index):
            raise ShardChangedError(
                self.url, self.index * self.block_size,
                f"block {self.index} differs from the snapshot's digest (shard replaced or rewritten)", stop=end,
            )
        else:
            self.verified = end
        self.index += 1
        self.block_end += self.block_size

    def check_whole(self) -> None:
        if self.whole_hex is not None and self.whole.hexdigest() != self.whole_hex:
            raise ShardChangedError(
                self.url, self.hashed, f"{self.whole_algo} digest differs from the snapshot's (shard replaced)"
            )

    @property
    def digest(self) -> str:
        return f"{self.whole_algo}:{self.whole.hexdigest()}"


class ByteSource(Protocol):
    """Where a ShardReader's bytes come from, checked against the snapshot on the way.

    Implemented by ``_LocalSource`` (a tar file) and ``_GzipSource`` (a gzip-compressed tar);
    anything that keeps this contract (a ranged reader of an object store) can feed the reader.

    Positions. The reader holds one chunk, ``buf``, whose first byte is at absolute offset
    ``base`` of the tar stream (the file itself, or the decompressed stream of a gzip shard);
    it never keeps a reference into an older chunk. Each method takes the reader's
    ``(buf, base)`` and a position relative to ``base`` (``p`` or ``q``), and returns the new
    ``buf``, ``base`` and relative position. A relative position may lie past ``len(buf)``:
    the bytes in between (padding, a skipped payload) are skipped, never handed out. Positions
    only go forward: no call names an absolute position before one the reader already reached.
    ``hoff`` is the absolute offset of the header being served; errors name it.

    Checking. ``verified`` is the absolute offset up to which the bytes are known to match the
    snapshot's digests: it only grows, and is infinite when no block digest is being checked or
    when every byte is checked before it is handed out (gzip: raw blocks are checked before
    they are decompressed). The reader yields a sample only once ``verified`` passed every byte
    the sample depends on, so a source:

    - checks the very bytes it hands out (the same ``bytes`` object, hashed while in cache),
      never a second read of them: the file may change between two reads;
    - hashes each byte at most once and in order (the checker, ``_Checker``, hashes a stream);
      bytes of ``buf`` count as consumed once the reader passes a position beyond them to any
      method, and consumed bytes must be hashed before a later byte is; bytes of a chunk the
      reader never consumed are not hashed, unless a whole-file digest needs every byte
      (``_Checker.sequential``), which ``finish`` then reads;
    - whole blocks the reader skips may be jumped over (``_Checker.jump``) unless sequential;
      a partly consumed block is hashed to its end before anything past it counts as verified;
    - never reports a byte verified that it has not checked.

    Errors. ``TarError(truncated=True)`` when the data ends before what was asked for (the
    mark of a shard still being written), ``ShardChangedError`` when bytes differ from the
    snapshot (a source that cannot pin the bytes it reads, e.g. an object replaced between two
    ranged reads, raises it rather than mixing versions), ``TarError`` for anything else; all
    name the shard (``url``) and the offset.
    """

    #: How errors name a position of the tar stream: "byte" when it is the file itself,
    #: "uncompressed offset" when it is decompressed (TarError's ``where``).
    position: str

    @property
    def verified(self) -> float:
        """Absolute offset up to which bytes are checked against the snapshot (inf: all)."""
        ...

    def refill(self, buf: bytes, base: int, p: int, need: int, hoff: int) -> tuple[bytes, int]:
        """A new chunk starting at absolute ``base + p``: ``(buf, base + p)``.

        The chunk holds at least ``need`` bytes, fewer only where the data ends (then as many
        as there are, possibly none). Consumes ``buf`` up to ``p``.
        """
        ...

    def take(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, bytes, int, int]:
        """The payload of ``size`` bytes at relative ``q``, which runs past the end of ``buf``.

        Returns ``(payload, buf, base, p)``: the payload as ``bytes`` (checked as it is read,
        one copy), and the chunk to go on with, where relative ``p`` is the position after the
        payload's padding. Raises TarError(truncated=True) when the data ends inside it, and
        never allocates more than the data holds: memory for a payload is its size plus a chunk.
        """
        ...

    def skip(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, int, int]:
        """Skips the payload of ``size`` bytes at relative ``q`` that runs past ``buf``.

        Returns ``(buf, base, p)`` with ``p`` after the payload's padding. Raises
        TarError(truncated=True) when the data ends inside the payload.
        """
        ...

    def settle(self, buf: bytes, base: int, p: int) -> bytes:
        """Makes ``verified`` reach ``base + p``, reading the rest of its block ahead if needed.

        Returns ``buf``, at the same ``base``, possibly extended with the bytes read ahead for
        the check, so that the reader goes on with those very bytes.
        """
        ...

    def finish(self, buf: bytes, base: int) -> None:
        """Called when the reader is done: with a whole-file digest to check or record, hashes
        every byte not hashed yet, to the end of the file, then raises ShardChangedError if
        the digest differs from the snapshot's. Does nothing otherwise."""
        ...


class _LocalSource:
    """An uncompressed local shard: chunks for headers and small payloads, large payloads alone.

    Keeps the ``ByteSource`` contract with ``os.pread`` (no shared file position, no mmap).
    Bytes are fed to the checker only once the reader has consumed them, from the object it
    consumed them from; unconsumed bytes of a chunk are dropped unhashed.
    """

    position = "byte"

    def __init__(self, fd: int, url: str, check: _Checker):
        self.fd = fd
        self.url = url
        self.check = check
        self.chunk = _FIRST_CHUNK
        self.file_size = 0  # as last seen; a shard being written grows
        self.counters = check.counters

    @property
    def verified(self) -> float:
        return self.check.verified

    def _holds(self, end: int) -> bool:
        """Whether the file reaches offset ``end`` (a fresh fstat when it did not last time)."""
        if end > self.file_size:
            self.file_size = os.fstat(self.fd).st_size
        return end <= self.file_size

    def _consume(self, buf: bytes, base: int, upto: int) -> None:
        """Feeds the checker what the reader consumed of ``buf``, up to relative ``upto``."""
        lo = self.check.hashed - base
        hi = min(upto, len(buf))
        if lo < hi:
            self.check.feed(buf if lo == 0 and hi == len(buf) else memoryview(buf)[lo:hi])

    def _advance(self, pos: int, hoff: int) -> None:
        """Brings the checker to ``pos`` over bytes the reader skipped (not in any chunk)."""
        check = self.check
        if not check.sequential and check.hashed < pos:
            if check.block_hasher is None:
                check.hashed = pos
                return
            if pos >= check.block_end:
                if check.hashed > check.block_end - check.block_size:
                    self._read_feed(check.block_end, hoff)
                if pos >= check.block_end:
                    check.jump(pos)
        self._read_feed(pos, hoff)

    def _read_feed(self, pos: int, hoff: int) -> None:
        check = self.check
        while check.hashed < pos:
            data = _timed_pread(self.fd, min(pos - check.hashed, BLOCK_SIZE), check.hashed, self.counters)
            if not data:
                raise TarError(self.url, hoff, f"truncated member: the shard ends at byte {check.hashed}",
                               truncated=True)
            check.feed(data)

    def refill(self, buf: bytes, base: int, p: int, need: int, hoff: int) -> tuple[bytes, int]:
        """A chunk starting at ``base + p`` with at least ``need`` bytes (fewer only at the end)."""
        pos = base + p
        check = self.check
        if check.active:
            self._consume(buf, base, p)
            if check.hashed < pos:
                self._advance(pos, hoff)
            elif check.hashed > pos:  # checked ahead (see settle): keep those very bytes
                kept = buf[p:]
                size = max(need, self.chunk)
                more = _timed_pread(self.fd, size, base + len(buf), self.counters)
                if len(more) < size:
                    check.ends_at(base + len(buf) + len(more))
                return kept + more, pos
        size = max(need, self.chunk)
        if self.chunk < _MAX_CHUNK:
            self.chunk *= 2
        data = _timed_pread(self.fd, size, pos, self.counters)
        if len(data) < size and check.blocks is not None:
            check.ends_at(pos + len(data))
        return data, pos

    def take(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, bytes, int, int]:
        """The payload at relative ``q`` that runs past the chunk: (payload, buf, base, p after it)."""
        if size < _DIRECT_MIN:
            buf, base = self.refill(buf, base, q, size, hoff)
            if len(buf) < size:
                raise _truncated(self.url, hoff, size, len(buf), self.position)
            return buf[:size], buf, base, size + (-size & 511)
        start = base + q
        head = b""
        check = self.check
        if check.active:
            self._consume(buf, base, q)
            if check.hashed > start:
                head = buf[q : check.hashed - base]
        if not self._holds(start + size):  # before allocating what the header merely claims
            raise _truncated(self.url, hoff, size, max(self.file_size - start, 0), self.position)
        if check.blocks is not None:  # held until its block checks out: reuse memory, not fresh pages
            keep_freed_memory()
        data = _timed_pread(self.fd, size - len(head), start + len(head), self.counters)
        if len(data) < size - len(head):
            raise _truncated(self.url, hoff, size, len(head) + len(data), self.position)
        if check.active:
            check.feed(data)
        self.chunk = _AFTER_LARGE_CHUNK
        return (head + data if head else data), b"", start + size, -size & 511

    def skip(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, int, int]:
        """Skips the payload at relative ``q`` that runs past the chunk: (buf, base, p after it)."""
        end = base + q + size
        if self.check.active:
            self._consume(buf, base, q)
        if not self._holds(end):
            raise TarError(self.url, hoff, f"truncated member: header declares {size} bytes past the end",
                           truncated=True)
        if self.check.active:
            self._advance(end, hoff)
        return b"", end, -size & 511

    def settle(self, buf: bytes, base: int, p: int) -> bytes:
        """Checks the block holding ``base + p - 1`` now, keeping the bytes read for it in ``buf``."""
        check = self.check
        pos = base + p
        if check.verified >= pos:
            return buf
        self._consume(buf, base, p)
        if check.hashed < pos:
            self._advance(pos, base + p)
        if check.verified >= pos:
            return buf
        want = check.block_end - check.hashed
        extra = _timed_pread(self.fd, want, check.hashed, self.counters)
        start = check.hashed
        check.feed(extra)
        if len(extra) < want:
            check.end_of_file()
        return buf[: start - base] + extra

    def finish(self, buf: bytes, base: int) -> None:
        """Hashes the rest of the file when a whole-file digest needs it, and compares."""
        check = self.check
        if not check.sequential:
            return
        self._consume(buf, base, len(buf))
        while data := _timed_pread(self.fd, BLOCK_SIZE, check.hashed, self.counters):
            check.feed(data)
        check.end_of_file()
        check.check_whole()


class _GzipSource:
    """A gzip-compressed shard (several gzip members allowed), decompressed as a stream.

    Keeps the ``ByteSource`` contract; positions are offsets in the decompressed tar, and
    errors name them so ("uncompressed offset"); errors in the gzip data itself name the byte
    of the file. Raw blocks are checked as they are read, before decompression, so every
    decompressed byte is already verified. A large payload is decompressed straight into its
    own buffer, no more than it needs at a time: a member costs its size plus one block.
    """

    verified = _INF
    position = "uncompressed offset"
    _MAX_OUT = 4 * BLOCK_SIZE

    def __init__(self, fd: int, url: str, check: _Checker):
        self.fd = fd
        self.url = url
        self.check = check
        self.counters = check.counters
        self.dec = zlib.decompressobj(31)
        self.fresh = True  # between gzip members: trailing zero padding is allowed here
        self.pending = b""
        self.raw_offset = 0
        self.out_offset = 0  # decompressed bytes so far

    def _raw(self) -> bytes:
        data = _timed_pread(self.fd, self.check.block_size, self.raw_offset, self.counters)
        self.raw_offset += len(data)
        self.check.feed(data)
        if len(data) < self.check.block_size:  # the end of the file: the last block is complete
            self.check.end_of_file()
        return data

    def _next(self, limit: int = _MAX_OUT) -> bytes:
        """The next decompressed bytes, at most ``limit``; empty at the end of the data."""
        while True:
            if not self.pending:
                self.pending = self._raw()
                if not self.pending:
                    if not self.fresh:
                        raise TarError(self.url, self.out_offset, f"gzip stream ends early, at byte {self.raw_offset}",
                                       truncated=True, where=self.position)
                    return b""
            if self.fresh:
                self.pending = self.pending.lstrip(b"\0")
                if not self.pending:
                    continue
                self.fresh = False
            try:
                out = self.dec.decompress(self.pending, limit)
            except zlib.error as exn:
                raise TarError(self.url, self.raw_offset, f"bad gzip data: {exn}") from None
            self.pending = self.dec.unconsumed_tail
            if self.dec.eof:
                self.pending = self.dec.unused_data + self.pending
                self.dec = zlib.decompressobj(31)
                self.fresh = True
            if out:
                self.out_offset += len(out)
                return out

    def refill(self, buf: bytes, base: int, p: int, need: int, hoff: int) -> tuple[bytes, int]:
        pos = base + p
        if p <= len(buf):
            parts, have, drop = [buf[p:]], len(buf) - p, 0
        else:
            parts, have, drop = [], 0, p - len(buf)
        while have < need or drop:
            chunk = self._next()
            if not chunk:
                if drop:
                    raise TarError(self.url, hoff, "truncated member: the stream ends inside it", truncated=True,
                                   where=self.position)
                break
            if drop:
                if drop >= len(chunk):
                    drop -= len(chunk)
                    continue
                chunk, drop = chunk[drop:], 0
            parts.append(chunk)
            have += len(chunk)
        return (parts[0] if len(parts) == 1 else b"".join(parts)), pos

    def take(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, bytes, int, int]:
        if q > len(buf):
            buf, base = self.refill(buf, base, q, 0, hoff)
            q = 0
        if size < _DIRECT_MIN or len(buf) - q >= size:
            buf, base = self.refill(buf, base, q, size, hoff)
            if len(buf) < size:
                raise _truncated(self.url, hoff, size, len(buf), self.position)
            return buf[:size], buf, base, size + (-size & 511)
        # Decompressed into one growing buffer, never more than the payload still needs: no
        # list of parts joined into a copy. In CPython getvalue() hands over BytesIO's own
        # buffer when it is exactly full, so the payload is written once.
        payload = io.BytesIO()
        have = payload.write(memoryview(buf)[q:])
        while have < size:
            chunk = self._next(min(size - have, self._MAX_OUT))
            if not chunk:
                raise _truncated(self.url, hoff, size, have, self.position)
            have += payload.write(chunk)
            del chunk
        return payload.getvalue(), b"", base + q + size, -size & 511

    def skip(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, int, int]:
        buf, base = self.refill(buf, base, q + size, 0, hoff)
        return buf, base, -size & 511

    def settle(self, buf: bytes, base: int, p: int) -> bytes:
        return buf

    def finish(self, buf: bytes, base: int) -> None:
        if self.check.sequential:
            while self._raw():
                pass
            self.check.check_whole()


def _truncated(url: str, hoff: int, size: int, have: int, where: str) -> TarError:
    return TarError(url, hoff, f"truncated member: header declares {size} bytes, only {have} present",
                    truncated=True, where=where)


# --------------------------------------------------------------------------- headers and keys


def _number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _fields(hdr: bytes, sizes: dict[bytes, int], limit: int) -> tuple[int, int]:
    """(size, want) of a ustar header for the fast path, cached by the fields as written.

    ``size`` is -1 unless the size field is 11 octal digits and a NUL, at most ``limit``;
    ``want`` is what ``adler32(hdr) & 0xFFFF`` is when the checksum holds (see _sum_want).
    """
    field = hdr[_OFF_SIZE:_END_SIZE]
    size = sizes.get(field)
    if size is None:
        size = -1
        if field[-1] == 0:
            try:
                size = int(field[:-1], 8)
            except ValueError:
                pass
            if not 0 <= size <= limit:
                size = -1
        if len(sizes) < 4096:
            sizes[field] = size
    chksum = hdr[_OFF_CHKSUM:_END_CHKSUM]
    want = _SUM_WANTS.get(chksum)
    return size, _sum_want(chksum) if want is None else want


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


# A header's checksum is the sum of its 512 bytes, its checksum field counted as 8 spaces.
# sum() over 512 bytes costs microseconds; zlib.adler32 sums them in C: its low 16 bits are
# (1 + sum) mod 65521. The fast path compares them with what the checksum field claims, so a
# header whose bytes sum to 65521 or more is checked modulo 65521: never the case for a header
# a tar writer produces (ASCII digits and names, NUL padding: at most 512 * 127 = 65024 when
# all ASCII, and far below with UTF-8 names), and a damaged one passes only if the damage adds
# a multiple of 65521. Whatever the fast path does not take, the slow path checks exactly.
_SUM_WANTS: dict[bytes, int] = {}  # checksum field as written -> adler32 & 0xFFFF it needs, or -1
_ADLER_MOD = 65521
_ASCII_SUM_MAX = 512 * 127


def _claimed_sum(field: bytes) -> int:
    """The sum of a header's bytes, its checksum field as written, that the field claims."""
    try:
        return _number(field) - 8 * 32 + sum(field)
    except ValueError:
        return -1


def _sum_want(field: bytes) -> int:
    """What ``zlib.adler32(header) & 0xFFFF`` is for a header whose checksum field ``field``
    holds; -1 (never equal) when no header can have that field."""
    total = _claimed_sum(field)
    want = (1 + total) % _ADLER_MOD if 0 <= total <= 512 * 255 else -1
    if len(_SUM_WANTS) < 1 << 15:
        _SUM_WANTS[field] = want
    return want


def _checksum_ok(hdr: bytes) -> bool:
    """Whether the header's checksum holds (exactly), summed unsigned (POSIX) or signed (old writers)."""
    field = hdr[_OFF_CHKSUM:_END_CHKSUM]
    total = _claimed_sum(field)
    if hdr.isascii():  # the sum is at most 65024: adler32 gives it exactly
        return total <= _ASCII_SUM_MAX and zlib.adler32(hdr) & 0xFFFF == 1 + total
    try:
        stored = _number(field)
    except ValueError:
        return False
    unsigned = sum(hdr) - sum(field) + 8 * 32
    if stored == unsigned:
        return True
    # Old writers summed signed chars: each byte above 127 counts 256 less.
    signed = unsigned - 256 * sum(b > 127 for b in hdr[:_OFF_CHKSUM] + hdr[_END_CHKSUM:])
    return stored == signed


class _Malformed(ValueError):
    """A malformed extended header: ``pos`` is where, relative to the start of its data."""

    def __init__(self, pos: int, message: str):
        super().__init__(message)
        self.pos = pos


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The ``"<length> <keyword>=<value>\\n"`` records of a PAX header's data (NUL padding may
    follow), as tarfile frames them; raises _Malformed for any record that is not framed so."""
    records: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:
        space = data.find(b" ", pos, pos + _MAX_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():  # ASCII digits only: no sign, no blanks, no '_'
            raise _Malformed(pos, "malformed PAX record: no decimal length then a space")
        stop = pos + int(digits)
        if stop > end:
            raise _Malformed(pos, f"malformed PAX record: its length runs {stop - end} bytes past the header data")
        if stop < space + 2 or data[stop - 1] != 10:
            raise _Malformed(pos, "malformed PAX record: no newline where its length ends it")
        key, eq, value = data[space + 1 : stop - 1].partition(b"=")
        if not eq or not key:
            raise _Malformed(pos, "malformed PAX record: not keyword=value")
        records[key] = value
        pos = stop
    return records


def _pax_lead(size: int, cache: dict[int, tuple[bytes, int]]) -> tuple[bytes, int]:
    """How the data of a PAX header of ``size`` bytes starts when it is one mtime record."""
    lead = b"%d mtime=" % size
    if len(cache) < 4096:
        cache[size] = (lead, len(lead))
    return lead, len(lead)


def _pax_inert(data: bytes) -> bool:
    """Whether PAX data is well framed and sets neither path nor size (what the reader uses)."""
    try:
        records = _pax_records(data)
    except _Malformed:
        return False
    return b"path" not in records and b"size" not in records


def _decimal(value: bytes) -> int | None:
    """A PAX decimal number: ASCII digits only; None for anything else."""
    return int(value) if value.isdigit() and len(value) <= _MAX_DIGITS else None


def _split_name(name: bytes) -> tuple[bytes | None, bytes]:
    """``split_key`` plus webdataset's ``__meta__`` rules, on an undecoded name.

    Splitting the UTF-8 bytes is the same as splitting the decoded text: '.' and '/' never
    occur inside a multi-byte sequence, and surrogateescape maps other bytes one to one.
    """
    if name.startswith(b"__") and (
        (b"/" not in name and name.endswith(b"__")) or _META_RE_BYTES.match(name) is not None
    ):
        return None, b""
    if b"/" not in name:
        key, dot, ext = name.partition(b".")
        return (key, ext) if key and dot else (None, b"")
    match = _KEY_RE_BYTES.match(name)
    return (match.group(1), match.group(2)) if match else (None, b"")


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- samples


class _Held:
    """Complete samples that wait until the blocks they depend on are checked.

    The reader appends complete samples to ``ready``; before each read it notes how far it has
    consumed (``note``), and after it takes the samples the checked bytes now cover
    (``release``), in order.
    """

    def __init__(self):
        self.ready: list[dict] = []
        self.marks: list[tuple[int, int]] = []  # (samples made ready so far, offset consumed then)
        self.released = 0

    def note(self, consumed: int) -> None:
        """All samples ready now depend on no byte at or after ``consumed``."""
        self.marks.append((self.released + len(self.ready), consumed))

    def release(self, verified: float) -> list[dict] | tuple[()]:
        """Removes from ``ready`` and returns the samples that only depend on bytes before ``verified``."""
        marks = self.marks
        if not marks or marks[0][1] > verified:
            return ()
        upto = self.released
        while marks and marks[0][1] <= verified:
            upto = marks.pop(0)[0]
        count, self.released = upto - self.released, upto
        out = self.ready[:count]
        del self.ready[:count]
        return out


class ShardReader:
    """Samples of one opened shard, by index: ``samples(start, stop)`` yields webdataset dicts."""

    def __init__(self, source: ByteSource, url: str, local_path: str | None = None, *,
                 max_sample_bytes: int = MAX_SAMPLE_BYTES):
        self.source = source
        self.url = url
        self.local_path = local_path or url
        self.max_sample_bytes = max_sample_bytes
        self.buf = b""
        self.base = 0
        self.p = 0
        self.next_index = 0
        self.end_of_archive = False
        self.done = False
        self.global_pax: dict[bytes, bytes] = {}
        self.pending: tuple[bytes, int] | None = None  # the member a stop parsed, for the next call
        self.hoff = 0  # offset of the first header of the member _header_slow returned
        self._exts: dict[bytes, str] = {}  # extension as written -> sample key
        self._sizes: dict[bytes, int] = {}  # size field -> size, or -1 (see _fields)
        self._pax_leads: dict[int, tuple[bytes, int]] = {}  # PAX data size -> (b"<size> mtime=", its length)

    def samples(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Yields samples ``start <= i < stop`` (all remaining when stop is None), in order.

        Samples before ``start`` are skipped without copying payloads. Indexes must not go back.
        A sample is yielded once the bytes it depends on were checked against the snapshot.
        """
        if start < self.next_index:
            raise ValueError(f"{self.url}: cannot go back from sample {self.next_index} to {start}")
        if self.done:
            return
        if stop is None:
            stop = 1 << 62
        src, url, local_path, exts, sizes = self.source, self.url, self.local_path, self._exts, self._sizes
        pax_leads, max_sample, sum_wants = self._pax_leads, self.max_sample_bytes, _SUM_WANTS
        buf, base, p = self.buf, self.base, self.p
        n = len(buf)
        index = self.next_index - 1
        cur: bytes | None = None
        sample: dict | None = None
        # With block digests, complete samples wait in ``ready`` until the blocks they depend on
        # are checked; ``held`` notes at each read how far the reader had consumed.
        hold = src.verified != _INF
        # Block digests cover every byte of a header before a sample cut after it is yielded (a
        # flipped bit fails its block), and were recorded by a read that checked every checksum:
        # then the fast path need not sum headers again, which costs about 20% on 1 KiB samples.
        check_sums = not hold
        held = _Held()
        ready = held.ready
        plain = not self.global_pax and self.pending is None  # the fast path applies
        # Header fields and byte values, as locals for the loop.
        off_size, end_size, off_type, off_prefix = _OFF_SIZE, _END_SIZE, _OFF_TYPE, _OFF_PREFIX
        off_magic, end_magic, end_name, magic = _OFF_MAGIC, _END_MAGIC, _END_NAME, _MAGIC
        off_chksum, end_chksum, adler32 = _OFF_CHKSUM, _END_CHKSUM, zlib.adler32
        type_regular, type_pax, slash, underscore = _TYPE_REGULAR, _TYPE_PAX, _SLASH, _UNDERSCORE
        try:
            while True:
                if p + 512 > n and self.pending is None:
                    if ready:
                        held.note(base + p)
                    buf, base = src.refill(buf, base, p, 512, base + p)
                    p, n = 0, len(buf)
                    if ready:
                        yield from held.release(src.verified)
                    if n < 512:
                        self.buf, self.base, self.p = buf, base, p
                        self._end_of_data()
                        break
                hoff = p  # where the member's headers start, relative to base
                name = None
                hdr = buf[p : p + 512]
                if plain and hdr[off_magic:end_magic] == magic:
                    # A ustar header. The fast path takes it when its checksum holds (see _sum_want)
                    # and its size field is octal within the limit (else size is -1, see _fields).
                    try:
                        size = sizes[hdr[off_size:end_size]]
                        want = sum_wants[hdr[off_chksum:end_chksum]] if check_sums else 0
                    except KeyError:
                        size, want = _fields(hdr, sizes, max_sample)
                    if (not check_sums or adler32(hdr) & 0xFFFF == want) and size >= 0:
                        kind = hdr[off_type]
                    else:
                        kind = -1  # the slow path checks again, and says what is wrong
                    if kind == type_regular and hdr[off_prefix] == 0 and (z := hdr.find(b"\0", 0, end_name)) > 0:
                        # The common member: regular, with a short NUL-terminated name.
                        name = hdr[:z]
                        p += 512
                    elif kind == type_pax and p + 512 + size <= n:
                        # A PAX header. webdataset's TarWriter writes one before every member for
                        # its float mtime: one record, "<size> mtime=<value>\n", that changes
                        # nothing here. Well-framed records without path or size are as inert;
                        # the rest (and anything malformed) takes the slow path.
                        pax = buf[p + 512 : p + 512 + size]
                        try:
                            lead, k = pax_leads[size]
                        except KeyError:
                            lead, k = _pax_lead(size, pax_leads)
                        if pax[:k] == lead and pax[-1] == 10 or _pax_inert(pax):
                            p += 512 + ((size + 511) & -512)
                            continue
                if name is None:
                    self.buf, self.base, self.p = buf, base, p
                    member = self._header_slow()
                    buf, base, p = self.buf, self.base, self.p
                    hoff = self.hoff - base
                    n = len(buf)
                    plain = not self.global_pax
                    if member is None:
                        break
                    name, size = member
                # p is at the payload. Group by key as webdataset does.
                if slash in name or name[0] == underscore:  # a '/' in it, or a leading '_' (__meta__?)
                    key, ext = _split_name(name)
                else:
                    key, dot, ext = name.partition(b".")
                    if not dot or not key:
                        key = None
                if key is None:
                    sample_for_member = None
                elif key != cur:
                    if sample is not None:
                        if hold:
                            ready.append(sample)
                        else:
                            yield sample
                    index += 1
                    if index >= stop:
                        self.buf, self.base, self.p = buf, base, p
                        self.pending, self.hoff = (name, size), base + hoff
                        self.next_index = index
                        break
                    cur = key
                    sample = sample_for_member = (
                        {"__key__": key.decode("utf-8", "surrogateescape"), "__url__": url,
                         "__local_path__": local_path}
                        if index >= start else None
                    )
                else:
                    sample_for_member = sample
                end = p + size
                if sample_for_member is None:  # not a sample's member, or a sample before start
                    if end <= n:
                        p += (size + 511) & -512
                    else:
                        buf, base, p = src.skip(buf, base, p, size, base + hoff)
                        n = len(buf)
                    continue
                try:
                    suffix = exts[ext]
                except KeyError:
                    suffix = _decode(ext).lower()
                    if len(exts) < 4096:
                        exts[ext] = suffix
                if suffix in sample:
                    raise self._error(base + hoff, f"duplicate file name in sample {sample['__key__']!r}: .{suffix}")
                if end <= n:
                    sample[suffix] = buf[p:end]
                    p += (size + 511) & -512
                else:
                    if ready:
                        held.note(base + p)
                    sample[suffix], buf, base, p = src.take(buf, base, p, size, base + hoff)
                    n = len(buf)
                    if ready:
                        yield from held.release(src.verified)
            if index < stop:
                if sample is not None:
                    ready.append(sample)
                self.next_index = index + 1
                self.done = True
            if ready:
                self.buf = src.settle(buf, base, p)
                yield from ready
        except TarError:
            # What completed before the error is still yielded, once its blocks checked out.
            if ready:
                yield from held.release(src.verified)
            raise

    def _error(self, offset: int, message: str, truncated: bool = False) -> TarError:
        return TarError(self.url, offset, message, truncated, where=self.source.position)

    def _end_of_data(self) -> None:
        """The data ran out where a header should be."""
        have = len(self.buf)
        pos = self.base + self.p
        if have == 0 and pos == 0:
            raise self._error(0, "empty file, not a tar archive")
        if have:
            raise self._error(pos, "truncated tar header", truncated=True)

    def _header_block(self) -> tuple[bytes | None, int]:
        """The 512-byte header at the current position (None at the end of the data)."""
        buf, p = self.buf, self.p
        if p + 512 > len(buf):
            buf, self.base = self.source.refill(buf, self.base, p, 512, self.base + p)
            self.buf, self.p, p = buf, 0, 0
            if len(buf) < 512:
                self._end_of_data()
                return None, self.base
        self.p = p + 512
        return buf[p : p + 512], self.base + p

    def _data(self, size: int, hoff: int) -> bytes:
        """The payload at the current position, and the position moved past its padding."""
        buf, p = self.buf, self.p
        if p + size <= len(buf):
            self.p = p + ((size + 511) & -512)
            return buf[p : p + size]
        value, self.buf, self.base, self.p = self.source.take(buf, self.base, p, size, hoff)
        return value

    def _header_slow(self) -> tuple[bytes, int] | None:
        """Every header the fast path does not take: extended headers, links, odd fields, the end.

        Returns (name, size) of the next regular member with the position at its payload, or
        None at the end of the archive or of the data.
        """
        if self.pending is not None:
            member, self.pending = self.pending, None
            return member
        pax: dict[bytes, bytes] = {}
        longname: bytes | None = None
        first = True
        while True:
            hdr, hoff = self._header_block()
            if first:
                self.hoff, first = hoff, False
            if hdr is None:
                return None
            if hdr == ZERO_BLOCK:
                self.end_of_archive = True
                return None
            if not _checksum_ok(hdr):
                what = "not a tar archive (bad header checksum)" if hoff == 0 else "bad header checksum"
                raise self._error(hoff, what)
            try:
                size = _number(hdr[_OFF_SIZE:_END_SIZE])
            except ValueError:
                raise self._error(hoff, "invalid size field in tar header") from None
            if size < 0:
                raise self._error(hoff, "negative size in tar header")
            kind = hdr[_OFF_TYPE : _OFF_TYPE + 1]
            if kind in _EXTENDED:
                if size > _MAX_EXTENDED:
                    raise self._error(hoff, f"extended header {_decode(kind)!r} of {size} bytes; more than "
                                            f"{_MAX_EXTENDED} is not a real one")
                data = self._data(size, hoff)
                try:
                    if kind == b"x":
                        pax = _pax_records(data)
                    elif kind == b"g":
                        self.global_pax.update(_pax_records(data))
                    elif kind == b"L":
                        longname = _cstr(data)
                except _Malformed as exn:
                    raise self._error(hoff + 512 + exn.pos, str(exn)) from None
                continue
            name = _cstr(hdr[_OFF_NAME:_END_NAME])
            if longname is not None:
                name = longname
            elif hdr[_OFF_PREFIX] != 0 and kind != b"S":  # GNU sparse headers use the prefix's bytes
                prefix = _cstr(hdr[_OFF_PREFIX:_END_PREFIX])
                if prefix:
                    name = prefix + b"/" + name
            if self.global_pax or pax:
                merged = {**self.global_pax, **pax}
                name = merged.get(b"path", name)
                if b"size" in merged:
                    size = _decimal(merged[b"size"])
                    if size is None:
                        raise self._error(self.hoff, f"invalid size in PAX header: {merged[b'size'][:40]!r}")
            if size > _MAX_SIZE:
                raise self._error(self.hoff, f"impossible size {size} in tar header (no file holds 2**63 bytes)")
            if kind in _REGULAR and not (kind == b"\0" and name.endswith(b"/")) and name:
                if size > self.max_sample_bytes:
                    raise self._error(self.hoff, f"member {_decode(name)!r} of {size} bytes is larger than "
                                                 f"max_sample_bytes={self.max_sample_bytes}; refused unread")
                return name, size
            if kind == b"S":
                raise self._error(hoff, f"sparse member {_decode(name)!r} is not supported")
            if kind not in _OTHER_KNOWN and size:
                buf, p = self.buf, self.p
                if p + size <= len(buf):
                    self.p = p + ((size + 511) & -512)
                else:
                    self.buf, self.base, self.p = self.source.skip(buf, self.base, p, size, hoff)
            pax, longname, first = {}, None, True

    def count(self) -> int:
        """Walks the remaining headers and returns how many samples follow; copies no payload."""
        before = self.next_index
        for _ in self.samples(start=1 << 62):
            pass
        return self.next_index - before

    def finish(self) -> None:
        """Completes a whole-file digest check when one is pending (reads the rest if needed)."""
        self.source.finish(self.buf, self.base)


def _source(fd: int, url: str, check: _Checker) -> ByteSource:
    if os.pread(fd, 2, 0) == _GZIP_MAGIC:
        return _GzipSource(fd, url, check)
    return _LocalSource(fd, url, check)


def open_shard(path: str, url: str | None = None, expected: Expected | None = None,
               counters: IOCounters | None = None, *,
               max_sample_bytes: int = MAX_SAMPLE_BYTES) -> tuple[ShardReader, int]:
    """Opens a local shard (tar or gzip-compressed tar) for reading.

    Returns the reader and the open file descriptor (the caller closes it). Raises
    ShardChangedError when size, mtime or inode differ from ``expected``; with block digests
    in ``expected``, no sample is yielded before the blocks it depends on match them.
    ``counters`` (an IOCounters), if given, adds up the reader's bytes read and seconds spent.

    A member larger than ``max_sample_bytes`` is refused with a TarError before it is read,
    and nothing is allocated on a header's word alone: a size past the end of the file is a
    truncated TarError (a shard still being written), an impossible one a TarError.
    """
    url = url or path
    fd = os.open(path, os.O_RDONLY)
    try:
        if expected is not None:
            _check_identity(fd, url, expected)
        source = _source(fd, url, _Checker(url, expected, counters=counters))
        return ShardReader(source, url, local_path=path, max_sample_bytes=max_sample_bytes), fd
    except BaseException:
        os.close(fd)
        raise


def _check_identity(fd: int, url: str, expected: Expected) -> None:
    st = os.fstat(fd)
    changes = [
        f"{what} {have} != {want}"
        for what, have, want in (
            ("size", st.st_size, expected.size),
            ("mtime_ns", st.st_mtime_ns, expected.mtime_ns),
            ("inode", st.st_ino, expected.inode),
        )
        if want is not None and have != want
    ]
    if changes:
        raise ShardChangedError(url, 0, "changed since the snapshot: " + ", ".join(changes))


@dataclass(frozen=True)
class ShardIndex:
    """What one full read of a shard tells: sample count, digests, and whether it is complete."""

    nsamples: int
    digest: str | None
    blocks: bytes | None
    complete: bool
    end: int = 0  # where an incomplete shard's tar data ends (an uncompressed offset for gzip)


def index_shard(path: str, url: str | None = None, with_digest: bool = True,
                algo: str = DEFAULT_ALGO, *, max_sample_bytes: int = MAX_SAMPLE_BYTES) -> ShardIndex:
    """Counts samples (headers only), and digests every raw block in the same single pass.

    The whole-file digest is computed with ``algo`` (e.g. to compare with a manifest's sha256);
    block digests are always xxh3_64. ``complete`` is False for a shard that ends before its
    end-of-archive marker or whose last member runs past the end of the file: the mark of a
    shard still being written. Raises TarError for a shard that is not a tar at all, is
    corrupt before its end, or holds a member larger than ``max_sample_bytes`` (as reading
    it would).
    """
    url = url or path
    check = _Checker(url, record=with_digest, algo=algo)
    fd = os.open(path, os.O_RDONLY)
    try:
        source = _source(fd, url, check)
        reader = ShardReader(source, url, max_sample_bytes=max_sample_bytes)
        try:
            nsamples = reader.count()
        except TarError as exn:
            if exn.truncated:
                return ShardIndex(reader.next_index, None, None, complete=False, end=exn.offset)
            raise
        complete = reader.end_of_archive
        if not complete:
            return ShardIndex(nsamples, None, None, complete, end=reader.base + reader.p)
        if not with_digest:
            return ShardIndex(nsamples, None, None, complete)
        source.finish(reader.buf, reader.base)
        return ShardIndex(nsamples, check.digest, b"".join(check.recorded), complete)
    finally:
        os.close(fd)

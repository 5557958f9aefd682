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

import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from time import perf_counter

import xxhash

from .digest import BLOCK_SIZE, DEFAULT_ALGO, block_at, new_hasher, split_digest

ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")
_OTHER_KNOWN = (b"1", b"2", b"3", b"4", b"5", b"6")
_EXTENDED = (b"x", b"g", b"L", b"K")
_GZIP_MAGIC = b"\x1f\x8b"
_KEY_RE_BYTES = re.compile(rb"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE_BYTES = re.compile(rb"__[^/]*__($|/)")
_INF = float("inf")

_FIRST_CHUNK = 64 << 10  # first read of a shard; doubles at each refill up to _MAX_CHUNK
_MAX_CHUNK = 1 << 20
_AFTER_LARGE_CHUNK = 8 << 10  # after a payload read on its own, the next one likely is too
_DIRECT_MIN = 64 << 10  # payloads this large that run past the chunk are read on their own


class TarError(ValueError):
    """A shard is not a well-formed tar; names the shard and the byte offset.

    ``truncated`` marks data that ends too early: the sign of a shard still being written.
    """

    def __init__(self, url: str, offset: int, message: str, truncated: bool = False):
        super().__init__(f"{url}: at byte {offset}: {message}")
        self.url = url
        self.offset = offset
        self.truncated = truncated


class ShardChangedError(RuntimeError):
    """The bytes of a shard differ from the snapshot it was listed in."""

    def __init__(self, url: str, offset: int, message: str):
        super().__init__(f"{url}: at byte {offset}: {message}")
        self.url = url
        self.offset = offset


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
        if self.block_hasher is not None and self.hashed > self.block_end - self.block_size:
            self._close_block(self.hashed)

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
                f"block {self.index} differs from the snapshot's digest (shard replaced or rewritten)",
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


class _LocalSource:
    """An uncompressed local shard: chunks for headers and small payloads, large payloads alone.

    The reader holds the current chunk ``buf`` whose first byte is at file offset ``base``;
    positions inside it are relative. Each method takes the reader's (buf, base) and returns
    the new ones. Bytes are fed to the checker only once the reader has consumed them, from
    the object it consumed them from; unconsumed bytes of a chunk are dropped unhashed.
    """

    def __init__(self, fd: int, url: str, check: _Checker):
        self.fd = fd
        self.url = url
        self.check = check
        self.chunk = _FIRST_CHUNK
        self.counters = check.counters

    @property
    def verified(self) -> float:
        return self.check.verified

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
                more = _timed_pread(self.fd, max(need, self.chunk), base + len(buf), self.counters)
                return kept + more, pos
        size = max(need, self.chunk)
        if self.chunk < _MAX_CHUNK:
            self.chunk *= 2
        return _timed_pread(self.fd, size, pos, self.counters), pos

    def take(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, bytes, int, int]:
        """The payload at relative ``q`` that runs past the chunk: (payload, buf, base, p after it)."""
        if size < _DIRECT_MIN:
            buf, base = self.refill(buf, base, q, size, hoff)
            if len(buf) < size:
                raise _truncated(self.url, hoff, size, len(buf))
            return buf[:size], buf, base, size + (-size & 511)
        start = base + q
        head = b""
        check = self.check
        if check.active:
            self._consume(buf, base, q)
            if check.hashed > start:
                head = buf[q : check.hashed - base]
        data = _timed_pread(self.fd, size - len(head), start + len(head), self.counters)
        if len(data) < size - len(head):
            raise _truncated(self.url, hoff, size, len(head) + len(data))
        if check.active:
            check.feed(data)
        self.chunk = _AFTER_LARGE_CHUNK
        return (head + data if head else data), b"", start + size, -size & 511

    def skip(self, buf: bytes, base: int, q: int, size: int, hoff: int) -> tuple[bytes, int, int]:
        """Skips the payload at relative ``q`` that runs past the chunk: (buf, base, p after it)."""
        end = base + q + size
        if self.check.active:
            self._consume(buf, base, q)
            self._advance(end, hoff)
        if os.fstat(self.fd).st_size < end:
            raise TarError(self.url, hoff, f"truncated member: header declares {size} bytes past the end",
                           truncated=True)
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

    Raw blocks are checked as they are read, before decompression, so every decompressed
    byte is already verified. Offsets in errors are offsets in the decompressed tar.
    """

    verified = _INF
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

    def _raw(self) -> bytes:
        data = _timed_pread(self.fd, self.check.block_size, self.raw_offset, self.counters)
        self.raw_offset += len(data)
        self.check.feed(data)
        if len(data) < self.check.block_size:  # the end of the file: the last block is complete
            self.check.end_of_file()
        return data

    def _next(self) -> bytes:
        while True:
            if not self.pending:
                self.pending = self._raw()
                if not self.pending:
                    if not self.fresh:
                        raise TarError(self.url, self.raw_offset, "gzip stream ends early", truncated=True)
                    return b""
            if self.fresh:
                self.pending = self.pending.lstrip(b"\0")
                if not self.pending:
                    continue
                self.fresh = False
            try:
                out = self.dec.decompress(self.pending, self._MAX_OUT)
            except zlib.error as exn:
                raise TarError(self.url, self.raw_offset, f"bad gzip data: {exn}") from None
            self.pending = self.dec.unconsumed_tail
            if self.dec.eof:
                self.pending = self.dec.unused_data + self.pending
                self.dec = zlib.decompressobj(31)
                self.fresh = True
            if out:
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
                    raise TarError(self.url, hoff, "truncated member: the stream ends inside it", truncated=True)
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
        buf, base = self.refill(buf, base, q, size, hoff)
        if len(buf) < size:
            raise _truncated(self.url, hoff, size, len(buf))
        return buf[:size], buf, base, size + (-size & 511)

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


def _truncated(url: str, hoff: int, size: int, have: int) -> TarError:
    return TarError(url, hoff, f"truncated member: header declares {size} bytes, only {have} present",
                    truncated=True)


# --------------------------------------------------------------------------- headers and keys


def _number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _octal(field: bytes, cache: dict[bytes, int]) -> int:
    """An octal size field (NUL-terminated, so 11 digits); -1 if it is not one."""
    try:
        size = int(field, 8)
    except ValueError:
        return -1
    if size >= 0 and len(cache) < 4096:
        cache[field] = size
    return size


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _checksum_ok(hdr: bytes) -> bool:
    try:
        stored = _number(hdr[148:156])
    except ValueError:
        return False
    unsigned = sum(hdr) - sum(hdr[148:156]) + 256
    if stored == unsigned:
        return True
    signed = unsigned - 2 * sum(b for b in hdr[:148] + hdr[156:] if b > 127)
    return stored == signed


def _pax_records(data: bytes, url: str, offset: int) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError(url, offset, "malformed PAX header record") from None
        if length <= 0:
            raise TarError(url, offset, "malformed PAX header record")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


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
    """Which held samples may go: (ready count, offset the reader had consumed) noted at reads."""

    def __init__(self):
        self.marks: list[tuple[int, int]] = []
        self.released = 0

    def note(self, ready: int, consumed: int) -> None:
        self.marks.append((self.released + ready, consumed))

    def release(self, verified: float) -> int:
        """How many of the ready samples only depend on bytes before ``verified``."""
        upto = self.released
        while self.marks and self.marks[0][1] <= verified:
            upto = self.marks.pop(0)[0]
        count, self.released = upto - self.released, upto
        return count


class ShardReader:
    """Samples of one opened shard, by index: ``samples(start, stop)`` yields webdataset dicts."""

    def __init__(self, source, url: str, local_path: str | None = None):
        self.source = source
        self.url = url
        self.local_path = local_path or url
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
        self._sizes: dict[bytes, int] = {}  # size field -> size

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
        buf, base, p = self.buf, self.base, self.p
        n = len(buf)
        index = self.next_index - 1
        cur: bytes | None = None
        sample: dict | None = None
        # With block digests, complete samples wait in ``ready`` until the blocks they depend on
        # are checked. ``held`` notes, at each read, (samples ready so far, offset read up to).
        hold = src.verified != _INF
        ready: list[dict] = []
        held = _Held()
        plain = not self.global_pax and self.pending is None  # the fast path applies
        try:
            while True:
                if p + 512 > n and self.pending is None:
                    if ready:
                        held.note(len(ready), base + p)
                    buf, base = src.refill(buf, base, p, 512, base + p)
                    p, n = 0, len(buf)
                    if ready and (k := held.release(src.verified)):
                        yield from ready[:k]
                        del ready[:k]
                    if n < 512:
                        self.buf, self.base, self.p = buf, base, p
                        self._end_of_data()
                        break
                hoff = p  # where the member's headers start, relative to base
                name = None
                if plain and buf[p + 257 : p + 262] == b"ustar" and buf[p + 135] == 0:
                    kind = buf[p + 156]
                    field = buf[p + 124 : p + 135]
                    try:
                        size = sizes[field]
                    except KeyError:
                        size = _octal(field, sizes)
                        if size < 0:
                            kind = -1
                    if kind == 48 and buf[p + 345] == 0 and (z := buf.find(b"\0", p, p + 100)) > p:
                        # The common member: regular, with a short NUL-terminated name.
                        name = buf[p:z]
                        p += 512
                    elif kind == 120 and p + 512 + size <= n:
                        # A PAX header. webdataset's TarWriter writes one before every member for
                        # its float mtime; when it sets neither path nor size it changes nothing.
                        pax = buf[p + 512 : p + 512 + size]
                        if b"path=" not in pax and b"size=" not in pax:
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
                if 47 in name or name[0] == 95:  # a '/' in it, or a leading '_'
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
                    raise TarError(url, base + hoff,
                                   f"duplicate file name in sample {sample['__key__']!r}: .{suffix}")
                if end <= n:
                    sample[suffix] = buf[p:end]
                    p += (size + 511) & -512
                else:
                    if ready:
                        held.note(len(ready), base + p)
                    sample[suffix], buf, base, p = src.take(buf, base, p, size, base + hoff)
                    n = len(buf)
                    if ready and (k := held.release(src.verified)):
                        yield from ready[:k]
                        del ready[:k]
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
            if ready and (k := held.release(src.verified)):
                yield from ready[:k]
            raise

    def _end_of_data(self) -> None:
        """The data ran out where a header should be."""
        have = len(self.buf)
        pos = self.base + self.p
        if have == 0 and pos == 0:
            raise TarError(self.url, 0, "empty file, not a tar archive")
        if have:
            raise TarError(self.url, pos, "truncated tar header", truncated=True)

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
        url = self.url
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
            if hdr[257:262] != b"ustar" and not _checksum_ok(hdr):
                what = "not a tar archive" if hoff == 0 else "invalid tar header (bad checksum)"
                raise TarError(url, hoff, what)
            try:
                size = _number(hdr[124:136])
            except ValueError:
                raise TarError(url, hoff, "invalid size field in tar header") from None
            if size < 0:
                raise TarError(url, hoff, "negative size in tar header")
            kind = hdr[156:157]
            if kind in _EXTENDED:
                data = self._data(size, hoff)
                if kind == b"x":
                    pax = _pax_records(data, url, hoff)
                elif kind == b"g":
                    self.global_pax.update(_pax_records(data, url, hoff))
                elif kind == b"L":
                    longname = _cstr(data)
                continue
            name = _cstr(hdr[0:100])
            if longname is not None:
                name = longname
            elif hdr[345] != 0 and kind != b"S":
                prefix = _cstr(hdr[345:500])
                if prefix:
                    name = prefix + b"/" + name
            if self.global_pax or pax:
                merged = {**self.global_pax, **pax}
                name = merged.get(b"path", name)
                if b"size" in merged:
                    try:
                        size = int(merged[b"size"])
                    except ValueError:
                        raise TarError(url, hoff, "invalid size in PAX header") from None
            if kind in _REGULAR and not (kind == b"\0" and name.endswith(b"/")) and name:
                return name, size
            if kind == b"S":
                raise TarError(url, hoff, f"sparse member {_decode(name)!r} is not supported")
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


def _source(fd: int, url: str, check: _Checker):
    if os.pread(fd, 2, 0) == _GZIP_MAGIC:
        return _GzipSource(fd, url, check)
    return _LocalSource(fd, url, check)


def open_shard(path: str, url: str | None = None, expected: Expected | None = None,
               counters: IOCounters | None = None) -> tuple[ShardReader, int]:
    """Opens a local shard (tar or gzip-compressed tar) for reading.

    Returns the reader and the open file descriptor (the caller closes it). Raises
    ShardChangedError when size, mtime or inode differ from ``expected``; with block digests
    in ``expected``, no sample is yielded before the blocks it depends on match them.
    ``counters`` (an IOCounters), if given, adds up the reader's bytes read and seconds spent.
    """
    url = url or path
    fd = os.open(path, os.O_RDONLY)
    try:
        if expected is not None:
            _check_identity(fd, url, expected)
        return ShardReader(_source(fd, url, _Checker(url, expected, counters=counters)), url, local_path=path), fd
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
                algo: str = DEFAULT_ALGO) -> ShardIndex:
    """Counts samples (headers only), and digests every raw block in the same single pass.

    The whole-file digest is computed with ``algo`` (e.g. to compare with a manifest's sha256);
    block digests are always xxh3_64. ``complete`` is False for a shard that ends before its
    end-of-archive marker or whose last member runs past the end of the file: the mark of a
    shard still being written. Raises TarError for a shard that is not a tar at all or is
    corrupt before its end.
    """
    url = url or path
    check = _Checker(url, record=with_digest, algo=algo)
    fd = os.open(path, os.O_RDONLY)
    try:
        source = _source(fd, url, check)
        reader = ShardReader(source, url)
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

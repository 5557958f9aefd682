"""A fast streaming tar sample reader that replaces ``tarfile`` on the read path.

A shard is read in fixed-size raw blocks (``digest.BLOCK_SIZE``). Each block is checked
against the snapshot's block digest when it is read, before any member is cut from it, so
every byte yielded was verified and no second read is needed. gzip shards are decompressed
as a stream; their raw (compressed) blocks are checked the same way.

Members are grouped into samples by webdataset's exact rules (``base_plus_ext``, lower-cased
extensions, ``__meta__`` names skipped, non-regular members skipped). Samples can be
skipped by index without copying their payloads, which is how a consumer starts inside a
shard. A sample is yielded only once complete, so a read error never merges a partial sample
into the next one.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .digest import BLOCK_SIZE, FileDigester, block_at, block_digest, new_hasher, split_digest

ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")
_OTHER_KNOWN = (b"1", b"2", b"3", b"4", b"5", b"6")
_GZIP_MAGIC = b"\x1f\x8b"
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE = re.compile(r"__[^/]*__($|/)")


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


class _BlockCheck:
    """Checks raw blocks against block digests, or a whole-file digest when that is all we have."""

    def __init__(self, url: str, expected: Expected | None, digester: FileDigester | None = None):
        self.url = url
        self.digester = digester
        self.blocks = expected.blocks if expected else None
        self.block_size = expected.block_size if expected else BLOCK_SIZE
        self.whole_algo = self.whole_hex = None
        self.whole = None
        if expected and expected.digest and not self.blocks:
            self.whole_algo, self.whole_hex = split_digest(expected.digest)
            self.whole = new_hasher(self.whole_algo)
        self.next_index = 0

    @property
    def sequential(self) -> bool:
        return self.whole is not None

    def check(self, index: int, data: bytes) -> None:
        if self.digester is not None:
            self.digester.update_block(data)
        if self.blocks is not None:
            want = block_at(self.blocks, index)
            if block_digest(data) != want:
                raise ShardChangedError(
                    self.url, index * self.block_size,
                    f"block {index} differs from the snapshot's digest (shard replaced or rewritten)",
                )
        elif self.whole is not None:
            assert index == self.next_index, "whole-file digests need sequential reads"
            self.whole.update(data)
        self.next_index = index + 1

    def finish(self, offset: int) -> None:
        if self.whole is not None and self.whole.hexdigest() != self.whole_hex:
            raise ShardChangedError(
                self.url, offset, f"{self.whole_algo} digest differs from the snapshot's (shard replaced)"
            )


class _RawFile:
    """A file's raw bytes, block by block, each block checked as it is read."""

    def __init__(self, fd: int, url: str, check: _BlockCheck):
        self.fd = fd
        self.url = url
        self.check = check
        self.block_size = check.block_size
        self.index = 0

    def next_chunk(self) -> bytes:
        data = os.pread(self.fd, self.block_size, self.index * self.block_size)
        if data:
            self.check.check(self.index, data)
            self.index += 1
        return data

    def seek(self, offset: int) -> int:
        target = offset // self.block_size
        if self.check.sequential:
            while self.index < target and self.next_chunk():
                pass
        else:
            self.index = target
        return self.index * self.block_size

    def finish(self) -> None:
        """Read what was not read yet when a whole-file digest must cover it; then compare."""
        if self.check.sequential:
            while self.next_chunk():
                pass
            self.check.finish(self.index * self.block_size)


class _GzipChunks:
    """Decompressed chunks of a gzip stream (several members allowed) over a _RawFile."""

    _MAX_OUT = 4 * BLOCK_SIZE

    def __init__(self, raw: _RawFile):
        self.raw = raw
        self.dec = zlib.decompressobj(31)
        self.fresh = True  # between gzip members: trailing zero padding is allowed here
        self.pending = b""
        self.raw_offset = 0

    def next_chunk(self) -> bytes:
        while True:
            if not self.pending:
                self.pending = self.raw.next_chunk()
                if not self.pending:
                    if not self.fresh:
                        raise TarError(self.raw.url, self.raw_offset, "gzip stream ends early", truncated=True)
                    return b""
                self.raw_offset += len(self.pending)
            if self.fresh:
                self.pending = self.pending.lstrip(b"\0")
                if not self.pending:
                    continue
                self.fresh = False
            try:
                out = self.dec.decompress(self.pending, self._MAX_OUT)
            except zlib.error as exn:
                raise TarError(self.raw.url, self.raw_offset, f"bad gzip data: {exn}") from None
            self.pending = self.dec.unconsumed_tail
            if self.dec.eof:
                self.pending = self.dec.unused_data + self.pending
                self.dec = zlib.decompressobj(31)
                self.fresh = True
            if out:
                return out


class ByteStream:
    """Sequential access to a tar stream: take n bytes (one copy) or skip them (no copy)."""

    def __init__(self, next_chunk: Callable[[], bytes], seek: Callable[[int], int] | None, url: str):
        self._next_chunk = next_chunk
        self._seek = seek
        self.url = url
        self.buf = b""
        self.buf_start = 0
        self.pos = 0

    def take(self, n: int) -> bytes:
        start = self.pos - self.buf_start
        end = start + n
        if end <= len(self.buf):
            self.pos += n
            return self.buf[start:end]
        return self._take_slow(n)

    def _take_slow(self, n: int) -> bytes:
        parts = []
        have = 0
        start = self.pos - self.buf_start
        if 0 <= start < len(self.buf):
            parts.append(self.buf[start:])
            have = len(self.buf) - start
        while have < n:
            self.buf_start += len(self.buf)
            self.buf = chunk = self._next_chunk()
            if not chunk:
                self.buf = b""
                raise EOFError(have)
            lo = self.pos + have - self.buf_start
            piece = chunk[lo : lo + n - have]
            parts.append(piece)
            have += len(piece)
        self.pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def skip(self, n: int) -> None:
        target = self.pos + n
        if target <= self.buf_start + len(self.buf):
            self.pos = target
        elif self._seek is not None:
            self.buf = b""
            self.buf_start = self._seek(target)
            self.pos = target
        else:
            while n > 0:
                step = min(n, BLOCK_SIZE)
                self.take(step)
                n -= step


def _number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


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


def _pax_records(data: bytes, url: str, offset: int) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError(url, offset, "malformed PAX header record") from None
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class MemberWalker:
    """Walks the headers of a tar stream; yields (name, size) of regular members.

    The payload of a yielded member may be taken from ``stream`` before the next step;
    otherwise it is skipped without being copied. ``end_of_archive`` tells whether the
    end-of-archive marker was seen (a half-written shard has none).
    """

    def __init__(self, stream: ByteStream):
        self.stream = stream
        self.end_of_archive = False
        self.header_offset = 0

    def __iter__(self) -> Iterator[tuple[str, int]]:
        stream, url = self.stream, self.stream.url
        global_pax: dict[str, str] = {}
        pax: dict[str, str] = {}
        longname: str | None = None
        while True:
            self.header_offset = hoff = stream.pos
            try:
                hdr = stream.take(512)
            except EOFError as eof:
                if hoff == 0 and eof.args[0] == 0:
                    raise TarError(url, 0, "empty file, not a tar archive") from None
                if eof.args[0]:
                    raise TarError(url, hoff, "truncated tar header", truncated=True) from None
                return
            if hdr == ZERO_BLOCK:
                self.end_of_archive = True
                return
            if hdr[257:262] != b"ustar" and not _checksum_ok(hdr):
                what = "not a tar archive" if hoff == 0 else "invalid tar header (bad checksum)"
                raise TarError(url, hoff, what)
            try:
                size = _number(hdr[124:136])
            except ValueError:
                raise TarError(url, hoff, "invalid size field in tar header") from None
            kind = hdr[156:157]
            if kind in (b"x", b"g", b"L", b"K"):
                data = self._take(size, hoff)
                if kind == b"x":
                    pax = _pax_records(data, url, hoff)
                elif kind == b"g":
                    global_pax.update(_pax_records(data, url, hoff))
                elif kind == b"L":
                    longname = _text(data)
                self._skip_padding(size)
                continue
            name = _text(hdr[0:100])
            if longname is not None:
                name = longname
            elif hdr[345:346] != b"\0" and kind not in (b"S",):
                prefix = _text(hdr[345:500])
                if prefix:
                    name = prefix + "/" + name
            if global_pax or pax:
                merged = {**global_pax, **pax}
                name = merged.get("path", name)
                if "size" in merged:
                    size = int(merged["size"])
            pax, longname = {}, None
            regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))
            if regular:
                data_offset = stream.pos
                yield name, size
                if stream.pos == data_offset:
                    self._skip(size, hoff)
                elif stream.pos != data_offset + size:
                    raise RuntimeError("member payload must be taken whole or not at all")
                self._skip_padding(size)
            elif kind not in _OTHER_KNOWN:
                if kind == b"S":
                    raise TarError(url, hoff, f"sparse member {name!r} is not supported")
                self._skip(size, hoff)
                self._skip_padding(size)

    def take_payload(self, size: int) -> bytes:
        return self._take(size, self.header_offset)

    def _take(self, size: int, hoff: int) -> bytes:
        try:
            return self.stream.take(size)
        except EOFError as eof:
            raise TarError(
                self.stream.url, hoff,
                f"truncated member: header declares {size} bytes, only {eof.args[0]} present",
                truncated=True,
            ) from None

    def _skip(self, size: int, hoff: int) -> None:
        if size:
            try:
                self.stream.skip(size - 1)
                self.stream.take(1)
            except EOFError:
                raise TarError(
                    self.stream.url, hoff, f"truncated member: header declares {size} bytes past the end",
                    truncated=True,
                ) from None

    def _skip_padding(self, size: int) -> None:
        pad = -size % 512
        if pad:
            try:
                self.stream.skip(pad)
            except EOFError:
                pass


def split_key(fname: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext``: ``"dir/a.b.c"`` -> ``("dir/a", "b.c")``."""
    if "/" not in fname:
        dot = fname.find(".")
        return (fname[:dot], fname[dot + 1 :]) if dot > 0 else (None, None)
    match = _KEY_RE.match(fname)
    return (match.group(1), match.group(2)) if match else (None, None)


def _is_meta(fname: str) -> bool:
    if not fname.startswith("__"):
        return False
    return ("/" not in fname and fname.endswith("__")) or _META_RE.match(fname) is not None


def _keyed_members(walker: MemberWalker) -> Iterator[tuple[str, str, int]]:
    for fname, size in walker:
        if _is_meta(fname):
            continue
        prefix, suffix = split_key(fname)
        if prefix is None:
            continue
        yield prefix, suffix, size


class ShardReader:
    """Samples of one opened shard, by index: ``samples(start, stop)`` yields webdataset dicts."""

    def __init__(self, stream: ByteStream, url: str, raw: _RawFile | None = None, local_path: str | None = None):
        self.stream = stream
        self.url = url
        self.local_path = local_path or url
        self.raw = raw
        self.walker = MemberWalker(stream)
        self._members = _keyed_members(self.walker)
        self._pending: tuple[str, str, int] | None = None
        self.next_index = 0

    def samples(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Yields samples ``start <= i < stop`` (all remaining when stop is None), in order.

        Samples before ``start`` are skipped without copying payloads. Indexes must not go back.
        """
        if start < self.next_index:
            raise ValueError(f"{self.url}: cannot go back from sample {self.next_index} to {start}")
        sample: dict | None = None
        key = None
        index = self.next_index - 1
        members = self._members
        take = self.walker.take_payload
        pending, self._pending = self._pending, None
        while True:
            if pending is not None:
                prefix, suffix, size = pending
                pending = None
            else:
                try:
                    prefix, suffix, size = next(members)
                except StopIteration:
                    break
            if prefix != key:
                if sample is not None:
                    yield sample
                    sample = None
                index += 1
                key = prefix
                if stop is not None and index >= stop:
                    self._pending = (prefix, suffix, size)
                    self.next_index = index
                    return
                if index >= start:
                    sample = {"__key__": prefix, "__url__": self.url, "__local_path__": self.local_path}
            if sample is not None:
                suffix = suffix.lower()
                if suffix in sample:
                    raise TarError(
                        self.url, self.walker.header_offset,
                        f"duplicate file name in sample {prefix!r}: .{suffix}",
                    )
                sample[suffix] = take(size)
        if sample is not None:
            yield sample
        self.next_index = index + 1

    def count(self) -> int:
        """Walks the remaining headers and returns how many samples follow; copies no payload."""
        before = self.next_index
        for _ in self.samples(start=1 << 62):
            pass
        return self.next_index - before

    def finish(self) -> None:
        """Completes a whole-file digest check when one is pending (reads the rest if needed)."""
        if self.raw is not None:
            self.raw.finish()


def open_shard(path: str, url: str | None = None, expected: Expected | None = None) -> tuple[ShardReader, int]:
    """Opens a local shard (tar or gzip-compressed tar) for reading.

    Returns the reader and the open file descriptor (the caller closes it). Raises
    ShardChangedError when size, mtime or inode differ from ``expected``.
    """
    url = url or path
    fd = os.open(path, os.O_RDONLY)
    try:
        if expected is not None:
            _check_identity(fd, url, expected)
        raw = _RawFile(fd, url, _BlockCheck(url, expected))
        head = os.pread(fd, 2, 0)
        if head == _GZIP_MAGIC:
            chunks = _GzipChunks(raw)
            stream = ByteStream(chunks.next_chunk, None, url)
        else:
            stream = ByteStream(raw.next_chunk, raw.seek, url)
        return ShardReader(stream, url, raw, local_path=path), fd
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


def index_shard(path: str, url: str | None = None, with_digest: bool = True) -> ShardIndex:
    """Counts samples (headers only), and digests every raw block in the same single pass.

    ``complete`` is False for a shard that ends before its end-of-archive marker or whose
    last member runs past the end of the file: the mark of a shard still being written.
    Raises TarError for a shard that is not a tar at all or is corrupt before its end.
    """
    url = url or path
    digester = FileDigester() if with_digest else None
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = _RawFile(fd, url, _BlockCheck(url, None, digester))
        if os.pread(fd, 2, 0) == _GZIP_MAGIC:
            stream = ByteStream(_GzipChunks(raw).next_chunk, None, url)
        else:
            stream = ByteStream(raw.next_chunk, None, url)
        reader = ShardReader(stream, url)
        try:
            nsamples = reader.count()
        except TarError as exn:
            if exn.truncated:
                return ShardIndex(reader.next_index, None, None, complete=False)
            raise
        while raw.next_chunk():
            pass
        complete = reader.walker.end_of_archive
        if digester is None:
            return ShardIndex(nsamples, None, None, complete)
        return ShardIndex(nsamples, digester.digest, digester.blocks, complete)
    finally:
        os.close(fd)

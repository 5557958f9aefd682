"""The tar reader survives crafted and rotted shards: it never hangs, never moves backwards,
never allocates what a header merely claims, and reports every broken shard by name and
offset with a TarError.

Shards here are built byte by byte (``header`` computes the checksum unless told not to), so
each test states exactly which field lies.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import pytest

from wdsrefresh.format.tario import Expected, ShardChangedError, TarError, index_shard, open_shard

MTIME = 1_700_000_000
END = bytes(1024)  # the end-of-archive marker: two zero blocks
GiB = 1 << 30


# --------------------------------------------------------------------------- crafting tars


def checksum(block: bytes | bytearray) -> int:
    """The ustar checksum: the unsigned sum of the header, its checksum field counted as spaces."""
    return sum(block[:148]) + 8 * 32 + sum(block[156:])


def header(name: bytes, size: int = 0, kind: bytes = b"0", *, size_field: bytes | None = None,
           chksum_format: bytes = b"%06o\0 ", fix_checksum: bool = True) -> bytes:
    """A POSIX ustar header block. ``size_field`` replaces the 12-byte size field as is."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0001750\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"%011o\0" % MTIME
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    if fix_checksum:
        h[148:156] = chksum_format % checksum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes) -> bytes:
    return header(name, len(data)) + padded(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"<length> key=value\\n"`` record; the length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d" % length + body


def pax(data: bytes, kind: bytes = b"x") -> bytes:
    """An extended header ('x' PAX, 'g' global PAX, 'L' GNU long name, 'K' long link name)."""
    name = b"././@LongLink" if kind in (b"L", b"K") else b"././@PaxHeader"
    return header(name, len(data), kind) + padded(data)


def samples_of(*names: bytes) -> bytes:
    return b"".join(member(name, b"<%s>" % name) for name in names)


def write(tmp_path: Path, data: bytes, name: str = "crafted.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read(path: Path, **kw) -> list[dict]:
    reader, fd = open_shard(str(path), **kw)
    try:
        return list(reader.samples())
    finally:
        os.close(fd)


def index(path: Path, **kw):
    return index_shard(str(path), **kw)


def tar_error(call, *args, **kw) -> TarError:
    with pytest.raises(TarError) as info:
        call(*args, **kw)
    return info.value


def assert_names(exn: TarError, path: Path, offset: int | None = None) -> None:
    assert exn.url == str(path) and str(path) in str(exn)
    if offset is not None:
        assert exn.offset == offset, str(exn)
        assert f" {offset}:" in str(exn)


# --------------------------------------------------------------------------- never backwards, never in place


@pytest.mark.timeout(20)
@pytest.mark.parametrize("value", [b"-1536", b"-512", b"-1", b"+512", b" 512", b"1_024", b"0x200", b"", b"9" * 5000])
def test_pax_size_that_is_not_a_plain_decimal_raises_instead_of_spinning(tmp_path, value):
    # size=-1536 once moved the header walk back three blocks, onto the same header, forever.
    head = samples_of(b"a.txt", b"a.cls")
    data = head + pax(pax_record(b"size", value)) + member(b"b.txt", b"x" * 2000) + samples_of(b"c.txt") + END
    path = write(tmp_path, data)
    for call in (read, index):
        assert_names(tar_error(call, path), path, offset=len(head))


@pytest.mark.timeout(20)
def test_every_header_moves_the_reader_forward(tmp_path):
    # Zero-size members, empty extended headers and unknown types each still advance one block.
    data = (pax(b"") + pax(b"", b"g") + header(b"d/", kind=b"5") + header(b"weird", kind=b"V")
            + samples_of(b"a.txt") + pax(pax_record(b"comment", b"")) + samples_of(b"b.txt") + END)
    path = write(tmp_path, data)
    assert [s["__key__"] for s in read(path)] == ["a", "b"]
    assert index(path).nsamples == 2


# --------------------------------------------------------------------------- PAX records


@pytest.mark.parametrize("records, bad_at", [
    (b"30 path=b.txt\n", 0),  # the length does not match the record
    (b"13 path=b.txt\n14 size=2000\n", 0),  # a length one short: no newline where it ends
    (b"14path=b.txt\n\n", 0),  # no space after the length
    (b"14 pathb.txt\n\n", 0),  # no '='
    (b"10 =b.txt\n", 0),  # no keyword
    (b"99 path=b.txt\n", 0),  # the length runs past the data
    (b"1x path=b.txt\n", 0),  # a length that is not a number
    (b"-5 path=b.txt\n", 0),
    (b" 14 path=b.txt\n", 0),
    (b"0 path=b.txt\n", 0),
    (b"3 \n", 0),
    (b"14 path=b.txt\nxyz", 14),  # junk after a good record
])
def test_malformed_pax_record_raises_naming_shard_and_offset(tmp_path, records, bad_at):
    head = samples_of(b"a.txt")
    for good in (b"", pax_record(b"mtime", b"1700000000.5")):  # alone: the fast path's case
        path = write(tmp_path, head + pax(good + records) + member(b"b.txt", b"x" * 2000) + END)
        for call in (read, index):
            exn = tar_error(call, path)
            assert_names(exn, path, offset=len(head) + 512 + len(good) + bad_at)
            assert "PAX" in str(exn)


def test_well_formed_pax_records_are_read(tmp_path):
    records = (pax_record(b"mtime", b"1700000000.5") + pax_record(b"path", b"dir/b.txt")
               + pax_record(b"comment", b"a value with = and\nnewline") + pax_record(b"size", b"2000"))
    path = write(tmp_path, samples_of(b"a.txt") + pax(records) + header(b"ignored", 7) + padded(b"x" * 2000) + END)
    assert [(s["__key__"], len(s["txt"])) for s in read(path)] == [("a", 7), ("dir/b", 2000)]


# --------------------------------------------------------------------------- sizes a header merely claims


def base256(value: int) -> bytes:
    return b"\x80" + value.to_bytes(11, "big")


HUGE_MEMBERS = {  # a regular member whose header claims far more than the file holds
    "octal 8 GiB": header(b"b.bin", size_field=b"77777777777\0"),
    "base-256 50 GB": header(b"b.bin", size_field=base256(50 * 10**9)),
    "PAX size 8 GiB": pax(pax_record(b"size", b"8589934592")) + header(b"b.bin", 10),
    "PAX size 50 GB, no ustar size": pax(pax_record(b"size", b"50000000000")) + header(b"b.bin"),
}
IMPOSSIBLE_MEMBERS = {  # sizes no file can have: corruption, never "still being written"
    "base-256 2**80": header(b"b.bin", size_field=base256(2**80)),
    "PAX size 2**80": pax(pax_record(b"size", b"%d" % 2**80)) + header(b"b.bin", 10),
    "x header of 8 GiB": header(b"././@PaxHeader", kind=b"x", size_field=b"77777777777\0") + padded(b"x" * 100),
    "g header of 50 GB": header(b"././@PaxHeader", kind=b"g", size_field=base256(50 * 10**9)) + padded(b"x" * 100),
    "L long name of 8 GiB": header(b"././@LongLink", kind=b"L", size_field=b"77777777777\0") + padded(b"b.bin\0"),
    "K long link of 2**80": header(b"././@LongLink", kind=b"K", size_field=base256(2**80)) + padded(b"b.bin\0"),
}


def peak_allocation(call, *args, **kw) -> tuple[int, object]:
    """(bytes, outcome): the peak of Python allocations during the call, and its result or exception."""
    tracemalloc.start()
    try:
        try:
            outcome = call(*args, **kw)
        except Exception as exn:  # noqa: BLE001 - the outcome is what the test looks at
            outcome = exn
        return tracemalloc.get_traced_memory()[1], outcome
    finally:
        tracemalloc.stop()


def huge_shard(tmp_path: Path, claim: bytes) -> tuple[Path, int]:
    head = samples_of(b"a.txt", b"a.cls")
    body = claim + padded(b"\1" * 3000) + samples_of(b"c.txt") + END  # far less than claimed
    return write(tmp_path, head + body), len(head)


@pytest.mark.parametrize("case", list(HUGE_MEMBERS) + list(IMPOSSIBLE_MEMBERS))
def test_size_claimed_beyond_the_file_is_refused_before_allocating(tmp_path, case):
    path, offset = huge_shard(tmp_path, {**HUGE_MEMBERS, **IMPOSSIBLE_MEMBERS}[case])
    for call, kw in [(read, {}), (index, {}), (index, {"with_digest": False})]:
        peak, exn = peak_allocation(call, path, **kw)
        assert isinstance(exn, TarError), f"{call.__name__}: {exn!r}"
        assert_names(exn, path, offset)
        assert not exn.truncated, str(exn)
        assert peak < 4 << 20, f"{call.__name__} allocated {peak} bytes"


@pytest.mark.parametrize("case", HUGE_MEMBERS)
def test_size_running_past_a_local_file_is_truncation_when_allowed(tmp_path, case):
    # With the limit raised, a size past the end is what a shard still being written looks
    # like: a truncated TarError when read, an incomplete index; never an allocation.
    path, offset = huge_shard(tmp_path, HUGE_MEMBERS[case])
    peak, exn = peak_allocation(read, path, max_sample_bytes=1 << 62)
    assert isinstance(exn, TarError) and exn.truncated, repr(exn)
    assert_names(exn, path, offset)
    assert peak < 4 << 20
    peak, result = peak_allocation(index, path, max_sample_bytes=1 << 62)
    assert result.complete is False, repr(result)
    assert peak < 4 << 20


@pytest.mark.parametrize("case", IMPOSSIBLE_MEMBERS)
def test_impossible_size_is_corruption_whatever_the_limit(tmp_path, case):
    path, offset = huge_shard(tmp_path, IMPOSSIBLE_MEMBERS[case])
    for call in (read, index):
        peak, exn = peak_allocation(call, path, max_sample_bytes=1 << 100)
        assert isinstance(exn, TarError) and not exn.truncated, repr(exn)
        assert_names(exn, path, offset)
        assert peak < 4 << 20


@pytest.mark.parametrize("name", ["big.tar", "big.tgz"])
def test_member_larger_than_max_sample_bytes_is_refused_unread(tmp_path, name):
    head = samples_of(b"a.txt")
    data = head + member(b"b.bin", bytes(3 << 20)) + samples_of(b"c.txt") + END
    path = write(tmp_path, gzip_bytes(data) if name.endswith(".tgz") else data, name)
    assert [s["__key__"] for s in read(path)] == ["a", "b", "c"]
    for call in (read, index):
        exn = tar_error(call, path, max_sample_bytes=1 << 20)
        assert_names(exn, path, len(head))
        assert "max_sample_bytes" in str(exn) and not exn.truncated
    reader, fd = open_shard(str(path), max_sample_bytes=1 << 20)
    try:
        with pytest.raises(TarError, match="max_sample_bytes"):
            list(reader.samples(start=2))  # skipping it does not make it readable
    finally:
        os.close(fd)


def gzip_bytes(data: bytes) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    return co.compress(data) + co.flush()


# --------------------------------------------------------------------------- header checksums


def flip(data: bytes, offset: int, bit: int = 0x20) -> bytes:
    return data[:offset] + bytes([data[offset] ^ bit]) + data[offset + 1 :]


def many_samples(n: int = 400) -> tuple[bytes, list[int]]:
    """A tar of n two-member samples, and the offset of every header in it."""
    data, offsets = b"", []
    for i in range(n):
        for ext in (b"txt", b"cls"):
            offsets.append(len(data))
            data += member(b"k%d.%s" % (i, ext), b"<%d>" % i)
    return data + END, offsets


@pytest.mark.parametrize("field, where", [
    ("name: k2 -> K2", 0), ("name, last byte of the field", 99), ("mode", 104), ("size", 134), ("mtime", 140),
    ("checksum", 150), ("type flag", 156), ("uname", 265), ("prefix", 400), ("padding", 511),
])
def test_flipped_bit_in_any_header_field_raises_bad_checksum_with_the_offset(tmp_path, field, where):
    data, offsets = many_samples()
    target = offsets[301]  # deep in the shard, where the fast path reads headers
    path = write(tmp_path, flip(data, target + where, 0x20 if where != 134 else 0x01))
    for call in (read, index):
        exn = tar_error(call, path)
        assert_names(exn, path, offset=target)
        assert "bad header checksum" in str(exn) and not exn.truncated
    assert data[0] == ord("k") and data[offsets[4]:offsets[4] + 2] == b"k2"


@pytest.mark.parametrize("kind", [b"x", b"L"])
def test_flipped_bit_in_an_extended_header_raises_bad_checksum(tmp_path, kind):
    record = pax_record(b"mtime", b"1700000000.5") if kind == b"x" else b"b.txt\0"
    head = samples_of(b"a.txt")
    good = head + pax(record, kind) + member(b"b.txt", b"x" * 10) + END
    assert [s["__key__"] for s in read(write(tmp_path, good))] == ["a", "b"]
    path = write(tmp_path, flip(good, len(head) + 120, 0x01))  # the extended header's gid field
    for call in (read, index):
        exn = tar_error(call, path)
        assert_names(exn, path, offset=len(head))
        assert "bad header checksum" in str(exn)


@pytest.mark.parametrize("chksum_format", [b"%06o\0 ", b"%07o\0", b"%6o\0 ", b"%06o  ", b"%07o "])
def test_checksum_fields_as_tar_writers_write_them_are_accepted(tmp_path, chksum_format):
    data = b"".join(header(b"s%d.txt" % i, 3, chksum_format=chksum_format) + padded(b"abc") for i in range(20))
    assert len(read(write(tmp_path, data + END))) == 20


def test_signed_checksums_of_old_writers_are_accepted(tmp_path):
    # Some old tars summed the header as signed chars: bytes >= 128 count negative.
    def signed_header(name: bytes, size: int) -> bytes:
        h = bytearray(header(name, size, fix_checksum=False))
        h[148:156] = b"%06o\0 " % sum(b - 256 if b > 127 else b for b in h)
        return bytes(h)

    names = ["ünïcode.txt", "ключ.txt", "plain.txt"]
    data = b"".join(signed_header(n.encode(), 2) + padded(b"ok") for n in names)
    assert [s["__key__"] for s in read(write(tmp_path, data + END))] == ["ünïcode", "ключ", "plain"]
def test_bad_checksum_in_a_gzip_shard_names_the_uncompressed_offset(tmp_path):
    data, offsets = many_samples(50)
    path = write(tmp_path, gzip_bytes(flip(data, offsets[33] + 1)), "rotted.tgz")
    for call in (read, index):
        exn = tar_error(call, path)
        assert_names(exn, path)
        assert exn.offset == offsets[33] and f"uncompressed offset {offsets[33]}:" in str(exn)



def test_truncated_gzip_member_names_the_uncompressed_offset(tmp_path):
    head = samples_of(b"a.txt")
    whole = gzip_bytes(head + member(b"b.bin", os.urandom(200_000)) + END)
    path = write(tmp_path, whole[: len(whole) // 2], "cut.tgz")
    exn = tar_error(read, path)
    assert_names(exn, path)
    assert exn.truncated and len(head) < exn.offset < len(head) + 200_000
    assert f"at uncompressed offset {exn.offset}:" in str(exn)
    assert index(path).complete is False


# --------------------------------------------------------------------------- gzip: memory


def gzip_of_zeros(head: bytes, zeros_mib: int, tail: bytes) -> bytes:
    """A gzip file (one member) of ``head``, ``zeros_mib`` MiB of zeros, ``tail``, built cheaply:
    one MiB of zeros compressed after a full flush (no reference to earlier data) repeated."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", co.compress(head), co.flush(zlib.Z_FULL_FLUSH)]
    mib = bytes(1 << 20)
    block = co.compress(mib) + co.flush(zlib.Z_FULL_FLUSH)
    parts += [block] * zeros_mib
    parts += [co.compress(tail), co.flush()]
    crc = zlib.crc32(head)
    for _ in range(zeros_mib):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(tail, crc)
    size = len(head) + (zeros_mib << 20) + len(tail)
    return b"".join(parts) + crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")


READ_IN_A_SMALL_PROCESS = textwrap.dedent("""
    import json, os, resource, sys, time
    from wdsrefresh.format.tario import open_shard
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: a runaway allocation fails
    path, kw = sys.argv[1], json.loads(sys.argv[2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    try:
        reader, fd = open_shard(path, **kw)
        sizes = [{k: len(v) for k, v in s.items() if not k.startswith("__")} for s in reader.samples()]
        outcome = {"samples": sizes}
    except Exception as exn:
        outcome = {"error": type(exn).__name__, "message": str(exn)[:300]}
    outcome["rss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    outcome["seconds"] = time.monotonic() - t0
    print(json.dumps(outcome))
""")


def read_in_a_small_process(path: Path, **kw) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-c", READ_IN_A_SMALL_PROCESS, str(path), json.dumps(kw)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.timeout(120)
def test_gzip_bomb_member_is_refused_before_it_is_decompressed(tmp_path):
    # 2 MiB of gzip that decompresses to a 2 GiB member: refused at its header.
    head = samples_of(b"a.txt")
    bomb = gzip_of_zeros(head + header(b"b.bin", 2 << 30), 2048, END)
    path = write(tmp_path, bomb, "bomb.tgz")
    assert len(bomb) < 4 << 20
    got = read_in_a_small_process(path)
    assert got.get("error") == "TarError", got
    assert f"at uncompressed offset {len(head)}:" in got["message"] and "max_sample_bytes" in got["message"]
    assert got["rss_growth"] < 64 << 20, got


@pytest.mark.timeout(120)
def test_gzip_member_is_held_once_not_copied(tmp_path):
    # A 160 MiB member: the reader's memory grows by its size plus a decompressed block, not by
    # two or three copies of it (parts, their join, then a slice of the join).
    size_mib = 160
    head = samples_of(b"a.txt")
    data = gzip_of_zeros(head + header(b"b.bin", size_mib << 20), size_mib, samples_of(b"c.txt") + END)
    path = write(tmp_path, data, "big.tgz")
    got = read_in_a_small_process(path)
    assert got.get("samples") == [{"txt": 7}, {"bin": size_mib << 20}, {"txt": 7}], got
    assert got["rss_growth"] < (size_mib << 20) + (48 << 20), got


# --------------------------------------------------------------------------- cut short after the snapshot


@pytest.mark.parametrize("name", ["cut.tar", "cut.tgz"])
def test_shard_cut_at_a_block_boundary_after_the_snapshot_yields_no_torn_sample(tmp_path, name):
    # Three 1 KiB members a sample: a cut at 4096 falls between two members of sample 1, at a
    # header boundary and at a block boundary, where no short last block shows the change.
    from wdsrefresh.format.digest import block_digest

    rng = random.Random(0)  # noise, so that the gzip shard spans blocks too
    data = b"".join(member(b"s%d.%s" % (i, ext), rng.randbytes(512)) for i in range(8) for ext in (b"a", b"b", b"c"))
    data += END
    gz = name.endswith(".tgz")
    whole = gzip_bytes(data) if gz else data
    blocks = b"".join(block_digest(whole[i : i + 4096]) for i in range(0, len(whole), 4096))
    cut = 4096 if not gz else len(whole) // 4096 * 4096
    assert 0 < cut < len(whole)
    path = write(tmp_path, whole[:cut], name)
    reader, fd = open_shard(str(path), expected=Expected(blocks=blocks, block_size=4096))
    yielded = []
    try:
        with pytest.raises((ShardChangedError, TarError)) as info:
            for sample in reader.samples():
                yielded.append(sample)
    finally:
        os.close(fd)
    assert str(path) in str(info.value)
    assert all(set(s) >= {"a", "b", "c"} for s in yielded), "a torn sample was yielded"

"""The tar reader yields exactly what webdataset 1.0.2 yields, checks bytes before yielding them,
and reports broken shards by name.

Every differential test compares ``open_shard(path).samples()`` with
``webdataset.WebDataset(path, shardshuffle=False)`` on the same file: same keys in the same
order, same extensions, same bytes (both add ``__url__`` and ``__local_path__``).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from wdsrefresh.format.digest import BLOCK_SIZE
from wdsrefresh.format.tario import Expected, ShardChangedError, TarError, index_shard, open_shard

from conftest import THIRD_PARTY_SHARDS, third_party_shard  # noqa: E402
MTIME = 1_700_000_000


# --------------------------------------------------------------------------- helpers


def read_ours(path, expected: Expected | None = None, start: int = 0, stop: int | None = None) -> list[dict]:
    reader, fd = open_shard(str(path), str(path), expected)
    try:
        samples = list(reader.samples(start, stop))
        reader.finish()
        return samples
    finally:
        os.close(fd)


def read_webdataset(path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False))


def expected_for(path) -> Expected:
    st = os.stat(path)
    index = index_shard(str(path))
    return Expected(st.st_size, st.st_mtime_ns, st.st_ino, index.digest, index.blocks)


def assert_same_as_webdataset(path) -> list[dict]:
    theirs = read_webdataset(path)
    assert theirs, f"{path}: webdataset yields nothing; the test shard is wrong"
    for expected in (None, expected_for(path), Expected(digest=index_shard(str(path)).digest)):
        ours = read_ours(path, expected)
        assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
        assert ours == theirs
        assert all(type(v) is bytes for s in ours for k, v in s.items() if not k.startswith("__"))
    assert index_shard(str(path)).nsamples == len(theirs)
    return theirs


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **kw) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.type = kind
    info.mtime = kw.get("mtime", MTIME)
    for key, value in kw.items():
        setattr(info, key, value)
    return info, data


def write_tar(path: Path, members, fmt: int = tarfile.GNU_FORMAT, mode: str = "w", **kw) -> Path:
    with tarfile.open(path, mode, format=fmt, **kw) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def payload(i: int, size: int) -> bytes:
    seed = f"<{i}>".encode()
    return (seed * (size // len(seed) + 1))[:size]


def plain_members(n: int, sizes=(0, 1, 511, 512, 513, 1024)) -> list:
    out = []
    for i in range(n):
        size = sizes[i % len(sizes)]
        out.append(member(f"s{i:06d}.bin", payload(i, size)))
        out.append(member(f"s{i:06d}.cls", str(i).encode()))
    return out


# --------------------------------------------------------------------------- webdataset's own shards


@pytest.mark.parametrize("name", THIRD_PARTY_SHARDS)
def test_samples_match_webdataset_on_its_own_test_shards(name):
    assert_same_as_webdataset(Path(third_party_shard(name)))


# --------------------------------------------------------------------------- generated shards


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_samples_match_webdataset_on_payloads_of_0_511_512_513_bytes(tmp_path, fmt):
    assert_same_as_webdataset(write_tar(tmp_path / "sizes.tar", plain_members(60), fmt))


def test_samples_match_webdataset_on_pax_shards_from_webdataset_tarwriter(tmp_path):
    path = tmp_path / "tarwriter.tar"
    with wds.TarWriter(str(path)) as writer:  # float mtime: a PAX header before every member
        for i in range(300):
            writer.write({"__key__": f"k{i:05d}", "jpg": payload(i, i * 7 % 1500), "cls": str(i).encode(),
                          "json": b"{}"})
    with open(path, "rb") as f:
        assert b"mtime=" in f.read(2048), "TarWriter no longer writes PAX headers; the test lost its point"
    assert len(assert_same_as_webdataset(path)) == 300


def test_samples_match_webdataset_on_pax_shards(tmp_path):
    members = [member(f"s{i:04d}.txt", payload(i, 100), mtime=MTIME + 0.5) for i in range(50)]
    members += [member("d" * 150 + f"/x{i}.bin", payload(i, 600)) for i in range(5)]  # PAX path records
    members += [member(f"u{i}.txt", payload(i, 10), uname="ü" * 40) for i in range(5)]  # PAX uname records
    assert_same_as_webdataset(write_tar(tmp_path / "pax.tar", members, tarfile.PAX_FORMAT))


def test_samples_match_webdataset_on_a_global_pax_header(tmp_path):
    path = write_tar(tmp_path / "global.tar", plain_members(20), tarfile.PAX_FORMAT,
                     pax_headers={"comment": "written for a test"})
    assert_same_as_webdataset(path)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_samples_match_webdataset_on_long_names(tmp_path, fmt):
    # GNU: ././@LongLink members; PAX: path records; ustar: the 155-byte prefix field.
    folder = "/".join(["a-rather-long-directory-name"] * 4)  # 115 bytes
    members = []
    for i in range(30):
        stem = f"{folder}/sample.{i:04d}" if i % 2 else f"{folder}/{'n' * 60}{i:04d}"
        members.append(member(f"{stem}.input.png", payload(i, 700)))
        members.append(member(f"{stem}.cls", str(i).encode()))
    assert len(members[0][0].name) > 100
    assert_same_as_webdataset(write_tar(tmp_path / "long.tar", members, fmt))


def test_samples_match_webdataset_on_empty_members(tmp_path):
    members = []
    for i in range(40):
        members.append(member(f"e{i:03d}.txt", b""))
        members.append(member(f"e{i:03d}.bin", payload(i, i % 3)))
    assert_same_as_webdataset(write_tar(tmp_path / "empty.tar", members))


def test_samples_match_webdataset_on_many_members(tmp_path):
    members = [member(f"m{i // 4:06d}.{ext}", payload(i, i % 97))
               for i, ext in zip(range(20000), ["a", "b", "c", "d"] * 5000)]
    assert len(assert_same_as_webdataset(write_tar(tmp_path / "many.tar", members))) == 5000


def test_samples_match_webdataset_with_directories_and_links_inside(tmp_path):
    members = [member("data", kind=tarfile.DIRTYPE), member("data/sub", kind=tarfile.DIRTYPE)]
    for i in range(20):
        members.append(member(f"data/sub/x{i:03d}.txt", payload(i, 300)))
        if i % 3 == 0:
            members.append(member(f"data/sub/x{i:03d}.lnk", kind=tarfile.SYMTYPE, linkname="elsewhere"))
            members.append(member(f"data/sub/x{i:03d}.hard", kind=tarfile.LNKTYPE, linkname=f"data/sub/x{i:03d}.txt"))
        members.append(member(f"data/sub/x{i:03d}.json", b"{}"))
        if i % 5 == 0:
            members.append(member(f"data/sub/d{i}", kind=tarfile.DIRTYPE))
    members.append(member("data/old-style-dir/", kind=tarfile.AREGTYPE))
    members.append(member("data/sub/y.bin", payload(1, 1000), kind=tarfile.AREGTYPE))
    members.append(member("data/fifo.p", kind=tarfile.FIFOTYPE))
    assert_same_as_webdataset(write_tar(tmp_path / "dirs.tar", members))


def test_samples_match_webdataset_on_mixed_case_extensions(tmp_path):
    members = []
    for i in range(30):
        members.append(member(f"c{i:03d}.JPG", payload(i, 200)))
        members.append(member(f"c{i:03d}.Cls", str(i).encode()))
        members.append(member(f"c{i:03d}.Seg.PNG", payload(i, 20)))
    samples = assert_same_as_webdataset(write_tar(tmp_path / "case.tar", members))
    assert set(samples[0]) >= {"jpg", "cls", "seg.png"}


def test_samples_match_webdataset_on_names_with_directories_and_dots(tmp_path):
    names = ["a/b.c/d.e.f", "a/b.c/d.g", "x.y/z", "x.y/z.w", "./rel/p.q", "rel/./p.r", "top.a.b.c",
             "top.d", "dir.with.dots/file", "dir.with.dots/file.ext", "v1.2/img.0001.jpg", "v1.2/img.0001.txt",
             ".hidden", ".hidden.txt", "nodot", "trailing.", "trailing.x", "multi//slash.a", "multi//slash.b",
             "ünïcode/ключ.txt", "ünïcode/ключ.JSON"]
    members = [member(name, payload(i, 50 + i)) for i, name in enumerate(names)]
    assert_same_as_webdataset(write_tar(tmp_path / "names.tar", members))


def test_samples_match_webdataset_with_meta_files(tmp_path):
    members = [member("__meta__", b"meta"), member("__info__.json", b"{}")]
    for i in range(10):
        members.append(member(f"s{i}.txt", payload(i, 10)))
        if i == 4:
            members += [member("__x__/inside.txt", b"skipped"), member("dir/__meta__.json", b"kept?"),
                        member("__a.b__", b"meta too"), member("_underscore.txt", b"kept")]
        members.append(member(f"s{i}.cls", b"1"))
    assert_same_as_webdataset(write_tar(tmp_path / "meta.tar", members))


@pytest.mark.parametrize("suffix", [".tgz", ".tar.gz"])
def test_samples_match_webdataset_on_gzip_shards(tmp_path, suffix):
    members = plain_members(200) + [member(f"big{i}.bin", payload(i, 300_000)) for i in range(3)]
    assert_same_as_webdataset(write_tar(tmp_path / f"shard{suffix}", members, mode="w:gz"))


def test_concatenated_gzip_members_read_as_one_tar(tmp_path):
    # ``cat a.gz b.gz`` is one valid gzip stream (gzip -d reads it whole). webdataset's tarfile
    # stream stops after the first gzip member and silently drops the rest; we read it all, so
    # the reference is webdataset on the decompressed tar.
    inner = write_tar(tmp_path / "inner.tar", plain_members(50))
    raw = inner.read_bytes()
    path = tmp_path / "multi.tgz"
    path.write_bytes(gzip.compress(raw[:20480]) + gzip.compress(raw[20480:]))
    theirs = [dict(s, __url__=str(path), __local_path__=str(path)) for s in read_webdataset(inner)]
    assert read_ours(path) == theirs
    assert len(read_webdataset(path)) < len(theirs)
    assert index_shard(str(path)).nsamples == len(theirs)


def test_samples_match_webdataset_on_large_payloads_across_blocks(tmp_path):
    # Payloads from tiny to several blocks' worth, so members straddle read chunks and 4 MiB blocks.
    sizes = [3, 70_000, 1 << 20, 5, 300_000, (4 << 20) + 7, 100, 65_536, 2_000_000, 1, 9 << 20]
    members = []
    for i, size in enumerate(sizes * 2):
        members.append(member(f"L{i:03d}.bin", payload(i, size)))
        members.append(member(f"L{i:03d}.cls", str(i).encode()))
    path = write_tar(tmp_path / "large.tar", members)
    assert path.stat().st_size > 8 * BLOCK_SIZE
    assert_same_as_webdataset(path)


# --------------------------------------------------------------------------- skipping by index


def test_sample_slices_equal_slices_of_the_full_list(tmp_path):
    sizes = [10, 600, 200_000, 1 << 20, 0, 513]
    members = []
    for i in range(120):
        members.append(member(f"q{i:04d}.bin", payload(i, sizes[i % len(sizes)])))
        members.append(member(f"q{i:04d}.txt", b"t"))
    path = write_tar(tmp_path / "slices.tar", members)
    full = read_ours(path)
    assert full == read_webdataset(path)
    expected = expected_for(path)
    for start, stop in [(0, 0), (0, 1), (5, 6), (0, 120), (37, 90), (119, 120), (119, None), (60, None), (120, None),
                        (200, None)]:
        for exp in (None, expected, Expected(digest=expected.digest)):
            assert read_ours(path, exp, start, stop) == full[start:stop], (start, stop)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_consecutive_ranges_on_one_reader_equal_the_full_list(tmp_path, fmt):
    members = plain_members(100) + [member("zz.bin", payload(0, 100_000))]
    members += [member("long/" * 30 + f"n{i:03d}.bin", payload(i, 250_000)) for i in range(40)]
    path = write_tar(tmp_path / "ranges.tar", members, fmt)
    assert path.stat().st_size > 2 * BLOCK_SIZE
    full = read_ours(path)
    assert full == read_webdataset(path)
    expected = expected_for(path)
    for exp in (None, expected, Expected(digest=expected.digest)):
        reader, fd = open_shard(str(path), str(path), exp)
        try:
            got = list(reader.samples(0, 10)) + list(reader.samples(10, 11)) + list(reader.samples(30, 60))
            got += list(reader.samples(60, 101)) + list(reader.samples(120, None))
            reader.finish()
        finally:
            os.close(fd)
        assert got == full[:11] + full[30:101] + full[120:]


def test_index_counts_equal_webdataset_counts(tmp_path):
    shards = [
        write_tar(tmp_path / "a.tar", plain_members(77)),
        write_tar(tmp_path / "b.tar", plain_members(33), tarfile.PAX_FORMAT),
        write_tar(tmp_path / "c.tgz", plain_members(20), mode="w:gz"),
    ]
    for path in shards:
        for with_digest in (True, False):
            index = index_shard(str(path), with_digest=with_digest)
            assert index.nsamples == len(read_webdataset(path))
            assert index.complete
            assert (index.digest is not None) == with_digest


# --------------------------------------------------------------------------- broken shards


def test_truncated_shard_is_indexed_as_incomplete(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", plain_members(50) + [member("big.bin", payload(1, 100_000))]).read_bytes()
    end_of_members = len(whole) - 10240 + 1024
    while whole[end_of_members - 512 : end_of_members] == bytes(512):
        end_of_members -= 512
    cuts = {"mid-payload": end_of_members - 40_000, "mid-header": 512 * 30 + 100, "no-end-marker": end_of_members}
    for what, cut in cuts.items():
        path = tmp_path / f"cut-{what}.tar"
        path.write_bytes(whole[:cut])
        assert index_shard(str(path)).complete is False, what
        assert index_shard(str(path), with_digest=False).complete is False, what


def test_truncated_member_raises_a_truncated_tar_error_naming_the_shard(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", plain_members(10) + [member("big.bin", payload(1, 100_000))]).read_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(whole[:-10240 - 30_000])
    with pytest.raises(TarError) as info:
        read_ours(path)
    assert info.value.truncated and info.value.url == str(path) and str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"this is not a tar file at all " * 100, bytes(range(256)) * 40, b"x"])
def test_garbage_file_raises_tar_error_naming_the_file(tmp_path, content):
    path = tmp_path / "garbage.tar"
    path.write_bytes(content)
    with pytest.raises(TarError) as info:
        read_ours(path)
    assert info.value.url == str(path) and str(path) in str(info.value)
    if len(content) >= 512:  # shorter data could be a tar being written: indexed as incomplete
        with pytest.raises(TarError, match="garbage.tar"):
            index_shard(str(path))
    else:
        assert index_shard(str(path)).complete is False


def test_empty_file_raises_tar_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(b"")
    with pytest.raises(TarError, match="empty.tar"):
        read_ours(path)


def test_duplicate_extension_in_a_sample_raises_like_webdataset(tmp_path):
    path = write_tar(tmp_path / "dup.tar", [member("a.jpg", b"1"), member("a.JPG", b"2")])
    with pytest.raises(ValueError):
        read_webdataset(path)
    with pytest.raises(TarError, match="duplicate"):
        read_ours(path)


# --------------------------------------------------------------------------- content checks


def _three_block_shard(tmp_path) -> tuple[Path, list[dict]]:
    members = []
    for i in range(60):
        members.append(member(f"b{i:04d}.bin", payload(i, 200_000)))
        members.append(member(f"b{i:04d}.cls", str(i).encode()))
    path = write_tar(tmp_path / "blocks.tar", members)
    assert 2 * BLOCK_SIZE < path.stat().st_size < 3 * BLOCK_SIZE
    return path, read_ours(path)


def _sample_spans(path) -> list[tuple[str, int, int]]:
    """(key, first byte, last byte + 1) of every sample, by tarfile."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key = info.name.split(".")[0]
            span = spans.setdefault(key, [info.offset, 0])
            span[1] = info.offset_data + info.size
    return [(key, lo, hi) for key, (lo, hi) in spans.items()]


@pytest.mark.parametrize("where", [BLOCK_SIZE + 123_457, 2 * BLOCK_SIZE + 1000, 700])
def test_flipped_byte_raises_shard_changed_before_its_sample_is_yielded(tmp_path, where):
    path, original = _three_block_shard(tmp_path)
    expected = Expected(blocks=expected_for(path).blocks)
    data = bytearray(path.read_bytes())
    data[where] ^= 0x40
    path.write_bytes(bytes(data))
    touched = next(i for i, (_, lo, hi) in enumerate(_sample_spans(path)) if lo <= where < hi)

    reader, fd = open_shard(str(path), str(path), expected)
    yielded = []
    try:
        with pytest.raises(ShardChangedError) as info:
            for sample in reader.samples():
                yielded.append(sample)
    finally:
        os.close(fd)
    assert info.value.url == str(path)
    assert len(yielded) <= touched, "the sample holding the changed byte was yielded"
    assert yielded == original[: len(yielded)]
    assert info.value.offset == where // BLOCK_SIZE * BLOCK_SIZE


def test_flipped_byte_is_caught_when_skipping_to_a_later_sample(tmp_path):
    path, original = _three_block_shard(tmp_path)
    expected = Expected(blocks=expected_for(path).blocks)
    data = bytearray(path.read_bytes())
    data[2 * BLOCK_SIZE + 5000] ^= 1
    path.write_bytes(bytes(data))
    assert read_ours(path, expected, 0, 5) == original[:5]
    with pytest.raises(ShardChangedError):
        read_ours(path, expected, 50, 55)


def test_flipped_byte_in_a_gzip_shard_raises_shard_changed(tmp_path):
    path = write_tar(tmp_path / "z.tgz", plain_members(3000), mode="w:gz")
    expected = Expected(blocks=expected_for(path).blocks)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises((ShardChangedError, TarError)) as info:
        read_ours(path, expected)
    assert isinstance(info.value, ShardChangedError)


def test_whole_file_digest_mismatch_raises_at_finish(tmp_path):
    path = write_tar(tmp_path / "w.tar", plain_members(100))
    digest = index_shard(str(path)).digest
    data = bytearray(path.read_bytes())
    data[-600] ^= 1  # in the zero padding after the last member: no sample changes
    path.write_bytes(bytes(data))
    reader, fd = open_shard(str(path), str(path), Expected(digest=digest))
    try:
        assert len(list(reader.samples(0, 10))) == 10
        with pytest.raises(ShardChangedError):
            reader.finish()
    finally:
        os.close(fd)


def test_changed_identity_raises_shard_changed_at_open(tmp_path):
    path = write_tar(tmp_path / "id.tar", plain_members(5))
    st = path.stat()
    with pytest.raises(ShardChangedError, match="size"):
        open_shard(str(path), str(path), Expected(size=st.st_size + 1))


def test_index_digests_match_the_digest_module(tmp_path):
    from wdsrefresh.format.digest import FileDigester

    path, _ = _three_block_shard(tmp_path)
    digester = FileDigester()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            digester.update_block(block)
    index = index_shard(str(path))
    assert (index.digest, index.blocks) == (digester.digest, digester.blocks)

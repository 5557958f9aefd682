"""What users are told: a missing bucket, `status` of a prefix, a corrupt block, a replaced shard, a typo."""

import os

import pytest

import wdsrefresh as wr
from wdsrefresh.cli import main
from wdsrefresh.format.digest import BLOCK_SIZE
from wdsrefresh.storage.backend import make_source
from wdsrefresh.storage.source import NoShardsError
from wdsrefresh.write.pack import pack_entries
from s3fixtures import moto_server, s3, shard_bytes  # noqa: F401 - fixtures
from shardutil import tar_bytes


def packed(tmp_path, n=3, size=1000):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(n):
        (raw / f"k{i}.bin").write_bytes(os.urandom(size))
    return raw


def test_missing_bucket_is_named_once_as_missing(s3, capsys):
    url = f"s3://{s3.name}-missing/prefix/"
    assert main(["ls", url]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"wdsrefresh ls: error: {url}: the bucket '{s3.name}-missing' does not exist (check its name, " \
                  "and the endpoint: endpoint_url or AWS_ENDPOINT_URL)"
    ds = wr.RefreshingWebDataset(url, watch=False)
    with pytest.raises(NoShardsError) as caught:
        ds.set_epoch(0)
    ds.close()
    text = str(caught.value)
    assert text.count(url) == 1 and "does not exist" in text and "(deleted)" not in text


def test_status_of_a_prefix_points_to_ls_and_verify(s3, capsys):
    url = s3.url("shards/")
    assert main(["status", url]) == 1
    err = capsys.readouterr().err
    assert f"`wdsrefresh ls {url}`" in err and f"`wdsrefresh verify {url}`" in err


def test_digest_mismatch_names_the_block_holding_the_flipped_byte(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "big.bin").write_bytes(b"\0" * (BLOCK_SIZE + 4096))  # the shard spans two blocks
    pack_entries([str(raw)], str(tmp_path / "out"))
    shard = str(tmp_path / "out" / "shard-000000.tar")
    st = os.stat(shard)
    with open(shard, "r+b") as f:  # byte 700 (in big.bin's payload) rots; size and mtime stay
        f.seek(700)
        f.write(b"\1")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    errors = []
    ds = wr.RefreshingWebDataset(str(tmp_path / "out"), handler=lambda exn: errors.append(exn) or True, watch=False)
    ds.set_epoch(0)
    assert list(ds) == []
    ds.close()
    [error] = errors
    assert isinstance(error, wr.DigestMismatch)
    assert f"shard-000000.tar: in the block at bytes 0-{BLOCK_SIZE - 1}: block 0 differs" in str(error)
    assert "at byte 0" not in str(error)


def test_ls_of_a_directory_marks_a_shard_replaced_since_its_manifest_entry(tmp_path, capsys):
    raw = packed(tmp_path, n=4)
    out = str(tmp_path / "out")
    pack_entries([str(raw)], out, maxcount=2)
    tmp = os.path.join(out, ".new.tmp")
    with open(tmp, "wb") as f:
        f.write(tar_bytes([{"__key__": "other", "bin": b"x" * 5000}]))
    os.replace(tmp, os.path.join(out, "shard-000001.tar"))
    assert main(["ls", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split("  ")[0] for line in lines if line.startswith("shard-")]
    assert names == ["shard-000000.tar", "shard-000001.tar (replaced)"]
    assert any(line.startswith("(replaced): the shard is no longer the version its manifest entry describes")
               for line in lines)


def test_ls_of_a_prefix_marks_an_object_replaced_since_its_manifest_entry(s3, tmp_path, capsys):
    raw = packed(tmp_path, n=4)
    pack_entries([str(raw)], s3.url("out/"), maxcount=2)
    s3.put("out/shard-000000.tar", shard_bytes("new", 3))
    assert main(["ls", s3.url("out/")]) == 0
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "shard-000000.tar (replaced)" in rows and "shard-000001.tar" in rows
    assert "verify " + s3.url("out/") in next(v for k, v in rows.items() if k.startswith("(replaced):"))


def test_a_path_typo_says_it_does_not_exist(tmp_path):
    (tmp_path / "shards").mkdir()
    typo = str(tmp_path / "shardz")
    with pytest.raises(NoShardsError, match=f"'{typo}' does not exist"):
        make_source(typo)
    with pytest.raises(NoShardsError, match=f"manifest '{typo}/manifest.json' does not exist"):
        wr.RefreshingWebDataset(os.path.join(typo, "manifest.json"), watch=False).set_epoch(0)

"""`wdsrefresh verify | ls`: every damaged shard is reported, with a non-zero exit."""

import os
import subprocess
import sys

import pytest

from shardutil import write_shard
from wdsrefresh.cli import main
from wdsrefresh.write.pack import pack
from wdsrefresh.write.verify import listing, verify

CLI = [sys.executable, "-m", "wdsrefresh.cli"]


@pytest.fixture
def packed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"s{i:03d}.bin").write_bytes(os.urandom(300_000))
        (src / f"s{i:03d}.cls").write_bytes(str(i).encode())
    out = str(tmp_path / "out")
    pack([str(src)], out, maxcount=15)  # two shards, each over one 4 MiB block
    return out


def run_cli(capsys, *args):
    """The CLI in this process (its exit status and stdout); a subprocess test covers the rest."""
    code = main(list(args))
    return subprocess.CompletedProcess(args, code, capsys.readouterr().out, "")


def test_clean_directory_verifies_with_zero_exit(packed, capsys):
    assert verify(packed) == []
    assert verify(os.path.join(packed, "manifest.json")) == []
    r = run_cli(capsys, "verify", packed)
    assert r.returncode == 0 and "all shards verified" in r.stdout


def test_flipped_byte_is_caught_in_its_block(packed):
    path = os.path.join(packed, "shard-000001.tar")
    offset = (4 << 20) + 1000  # inside the second 4 MiB block, in a payload
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    kinds = {(p.shard, p.kind) for p in verify(packed)}
    assert kinds == {("shard-000001.tar", "digest"), ("shard-000001.tar", "blocks")}
    r = subprocess.run(CLI + ["verify", packed], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "shard-000001.tar" in r.stdout and "first differing block at byte 4194304" in r.stdout


def test_truncated_shard_is_caught(packed, capsys):
    path = os.path.join(packed, "shard-000000.tar")
    os.truncate(path, os.path.getsize(path) - 5000)
    kinds = {p.kind for p in verify(packed) if p.shard == "shard-000000.tar"}
    assert {"size", "truncated"} <= kinds
    r = run_cli(capsys, "verify", packed)
    assert r.returncode == 1 and "truncated" in r.stdout and "PROBLEM" in r.stdout


def test_missing_and_unlisted_shards_are_reported(packed):
    os.unlink(os.path.join(packed, "shard-000000.tar"))
    write_shard(packed, "stray.tar", 4)
    problems = {(p.shard, p.kind) for p in verify(packed)}
    assert problems == {("shard-000000.tar", "missing"), ("stray.tar", "unlisted")}


def test_ls_lists_samples_size_digest_and_age(packed, capsys):
    write_shard(packed, "stray.tar", 4)
    rows = listing(packed)
    assert [(r.shard, r.nsamples, r.listed) for r in rows] == [
        ("shard-000000.tar", 15, True), ("shard-000001.tar", 15, True), ("stray.tar", 4, False)]
    assert all(r.size == os.path.getsize(os.path.join(packed, r.shard)) and r.age >= 0 for r in rows)
    r = run_cli(capsys, "ls", packed)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SHARD", "SAMPLES", "BYTES", "DIGEST", "AGE"]
    assert lines[2].split()[:3] == ["shard-000000.tar", "15", str(rows[0].size)]
    assert "stray.tar (unlisted)" in r.stdout

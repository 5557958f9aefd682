"""`wdsrefresh verify | ls`: every damaged shard is reported, with a non-zero exit."""

import os
import subprocess
import sys

import pytest

from shardutil import write_shard
from wdsrefresh.cli import main
from wdsrefresh.write.pack import pack_entries
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
    pack_entries([str(src)], out, maxcount=15)  # two shards, each over one 4 MiB block
    return out


def run_cli(capsys, *args):
    """The CLI in this process (its exit status and stdout); a subprocess test covers the rest."""
    code = main(list(args))
    return subprocess.CompletedProcess(args, code, capsys.readouterr().out, "")


def test_clean_directory_verifies_with_zero_exit(packed, capsys):
    assert verify(packed) == []
    assert verify(os.path.join(packed, "manifest.json")) == []
    r = run_cli(capsys, "verify", packed)
    assert r.returncode == 0
    assert r.stdout == (f"{packed}: verified: 2 shards, 30 samples: size, digests, sample count and tar structure "
                        f"checked against {packed}/manifest.json\n")


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


def test_ls_marks_unlisted_files_no_reader_would_read_and_says_why(packed, capsys):
    with open(os.path.join(packed, "shard-000000.tar"), "rb") as f:
        head = f.read(3000)
    with open(os.path.join(packed, "cut.tar"), "wb") as f:  # a copy interrupted at byte 3000
        f.write(head)
    with open(os.path.join(packed, "junk.tar"), "wb") as f:
        f.write(bytes(range(256)) * 4)
    r = run_cli(capsys, "ls", packed)
    assert r.returncode == 0
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:] if not line.startswith("(")}
    assert "(unreadable)" in rows["cut.tar"] and rows["cut.tar"].split()[3] == "?"
    assert "(unreadable)" in rows["junk.tar"] and "(unreadable)" not in rows["shard-000001.tar"]
    assert "(unreadable) cut.tar: incomplete: 3000 bytes and no end-of-archive marker" in r.stdout
    assert "(unreadable) junk.tar: at byte 0: not a tar archive" in r.stdout


def test_directory_without_manifest_is_verified_by_walking_every_shard(packed, capsys):
    os.unlink(os.path.join(packed, "manifest.json"))
    r = run_cli(capsys, "verify", packed)
    assert r.returncode == 0
    assert "2 shards, 30 samples: tar structure walked" in r.stdout and "no manifest, so" in r.stdout
    assert "digests" in r.stdout.split("no manifest, so")[1]  # says what was not compared
    path = os.path.join(packed, "shard-000001.tar")
    os.truncate(path, os.path.getsize(path) - 5000)
    r = run_cli(capsys, "verify", packed)
    assert r.returncode == 1 and "shard-000001.tar" in r.stdout and "truncated" in r.stdout


def test_empty_directory_fails_verification_and_lists_no_shards(tmp_path, capsys):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    r = run_cli(capsys, "verify", empty)
    assert r.returncode == 1 and "no shards found, so nothing was verified" in r.stdout
    r = subprocess.run(CLI + ["ls", empty], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{empty}: no shards\n", "")


def test_shard_file_is_a_one_shard_target(packed, capsys):
    shard = os.path.join(packed, "shard-000001.tar")
    r = subprocess.run(CLI + ["verify", shard], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"{shard}: verified: 1 shard, 15 samples: size, digests")
    r = run_cli(capsys, "ls", shard)
    assert r.returncode == 0 and r.stdout.splitlines()[2].split()[:2] == ["shard-000001.tar", "15"]
    with open(shard, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff")
    assert {p.kind for p in verify(shard)} == {"digest", "blocks"}
    stray = write_shard(str(packed), "stray.tar", 4)
    assert [(p.shard, p.kind) for p in verify(stray)] == [("stray.tar", "unlisted")]


def test_file_neither_manifest_nor_shard_is_a_clear_error(tmp_path):
    path = tmp_path / "image.bin"
    path.write_bytes(bytes(range(256)))
    for command in ("verify", "ls"):
        r = subprocess.run(CLI + [command, str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"{path}: not a manifest (not UTF-8 JSON text), nor a shard" in r.stderr


def test_shards_of_an_uncommitted_pack_are_checked_against_their_fragments(packed, tmp_path, capsys):
    """A pack killed after two or more of its shards: they are listed in manifest.d/ (or reserved
    by its plan), not unlisted."""
    from conftest import wait_for
    import signal

    src = tmp_path / "more"
    src.mkdir()
    for i in range(12):
        (src / f"m{i:03d}.bin").write_bytes(os.urandom(300_000))
    proc = subprocess.Popen(CLI + ["pack", str(src), "-o", packed, "--maxcount", "1"], stderr=subprocess.DEVNULL)
    fragments = os.path.join(packed, "manifest.d")
    try:
        wait_for(lambda: os.path.isdir(fragments) and len(os.listdir(fragments)) >= 2 or proc.poll() is not None,
                 30, "two fragments")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    pending = len([n for n in os.listdir(packed) if n.endswith(".tar")]) - 2  # maybe one without its fragment yet
    assert 2 <= pending < 12, "the pack finished before it was killed"
    report_problems = verify(packed)
    assert report_problems == []
    r = run_cli(capsys, "verify", packed)
    assert r.returncode == 0 and f"; {pending} of a pack not committed yet (rerun it)" in r.stdout
    rows = listing(packed)
    assert [r.shard for r in rows if r.pending] == [f"shard-{i:06d}.tar" for i in range(2, 2 + pending)]
    r = run_cli(capsys, "ls", packed)
    assert "shard-000002.tar (uncommitted)" in r.stdout

"""`wdsrefresh status`, `wdsrefresh stats --plot`, and what the command line logs and prints."""

import json
import re
import os
import select
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import wdsrefresh as wr
from wdsrefresh.cli import main
from shardutil import held_open, write_junk, write_shard

CLI = [sys.executable, "-m", "wdsrefresh.cli"]


def read_line_until(proc, wanted, timeout=30.0):
    """Lines ``proc`` prints until one contains ``wanted``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if wanted in line:
                return lines
    raise AssertionError(f"no line with {wanted!r} within {timeout} s; got {lines}")


@pytest.fixture
def changing_dir(shard_dir):
    """Two ready shards, one whose writer still holds it open (pending), one junk file (rejected)."""
    write_shard(shard_dir, "a.tar", 10)
    write_shard(shard_dir, "b.tar", 7)
    write_junk(shard_dir, "junk.tar")
    with held_open(shard_dir, "c.tar", 4):
        yield shard_dir


def test_status_json_sorts_files_into_ready_pending_and_rejected_with_reasons(changing_dir, tmp_path, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("k1.jpg", "k1.cls", "k2.jpg", "k2.done"):
        (inbox / name).write_bytes(b"x" * 100)
    assert main(["status", changing_dir, "--json", "--inbox", str(inbox)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ready"], doc["samples"], doc["pending"], doc["rejected"]) == (2, 17, 1, 1)
    assert [s["name"] for s in doc["shards"]] == ["a.tar", "b.tar"]
    assert doc["bytes"] == sum(os.path.getsize(os.path.join(changing_dir, n)) for n in ("a.tar", "b.tar"))
    assert doc["newest_age_seconds"] >= 1.0  # the shards' last writes were dated a second back
    [pending] = doc["pending_files"]
    assert pending["name"] == "c.tar" and "still open for writing by another process" in pending["reason"]
    [rejected] = doc["rejected_files"]
    assert rejected["name"] == "junk.tar" and "not a tar archive" in rejected["reason"]
    assert rejected["age_seconds"] >= 3600
    inbox_doc = doc["inbox"]
    assert (inbox_doc["files"], inbox_doc["samples"], inbox_doc["bytes"], inbox_doc["markers"]) == (3, 2, 300, 1)


def test_status_agrees_with_the_snapshot_a_reader_resolves(changing_dir, capsys):
    assert main(["status", changing_dir, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    with wr.RefreshingWebDataset(changing_dir, watch=False) as ds:
        snap = ds.set_epoch(0)
    assert [os.path.basename(s.url) for s in snap.shards] == [s["name"] for s in doc["shards"]]
    assert [os.path.basename(u) for u in snap.pending] == [f["name"] for f in doc["pending_files"]]
    assert [os.path.basename(u) for u, _ in snap.rejected] == [f["name"] for f in doc["rejected_files"]]
    assert len(snap) == doc["samples"]


def test_status_text_names_what_is_not_ready_and_why(changing_dir, capsys):
    assert main(["status", changing_dir, "--settle", "0"]) == 0  # no settle time makes an open file ready
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{changing_dir}: 2 ready shards, 17 samples")
    assert "junk.tar  rejected" in out and "not a tar archive" in out
    assert re.search(r"^c\.tar +pending .*still open for writing by another process", out, re.M)


def test_status_of_a_missing_directory_fails_naming_it(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_status_watch_prints_one_line_per_change(shard_dir, procs):
    write_shard(shard_dir, "a.tar", 3)
    proc = subprocess.Popen(CLI + ["status", shard_dir, "--watch", "--interval", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    first = read_line_until(proc, "1 ready shards")
    assert len(first) == 1
    size = os.path.getsize(write_shard(shard_dir, "b.tar", 5))
    assert read_line_until(proc, "b.tar")[-1].split()[1:] == ["ready", "b.tar:", "5", "samples,", f"{size / 1e3:.1f}",
                                                              "kB"]
    with held_open(shard_dir, "c.tar", 2):
        line = read_line_until(proc, "c.tar")[-1]
        assert line.split()[1:3] == ["pending", "c.tar:"] and "open for writing" in line
    line = read_line_until(proc, "c.tar")[-1]  # its writer closed it: ready at once
    assert line.split()[1:4] == ["ready", "c.tar:", "2"]
    os.unlink(os.path.join(shard_dir, "a.tar"))
    assert read_line_until(proc, "a.tar")[-1].split()[1:] == ["gone", "a.tar"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130


# --------------------------------------------------------------------------- stats and --plot


def png_size(path):
    """(width, height) from a PNG file's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def stats_jsonl(shard_dir, tmp_path):
    stats_dir = tmp_path / "stats"
    write_shard(shard_dir, "a.tar", 6)
    with wr.RefreshingWebDataset(shard_dir, stats_dir=str(stats_dir)) as ds:
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        for epoch in range(3):
            write_shard(shard_dir, f"n{epoch}.tar", 2 + epoch)
            ds.set_epoch(epoch)
            for _ in wr.timed(loader):
                pass
    return stats_dir / "stats.jsonl"


def test_stats_plot_writes_a_png_of_the_run(stats_jsonl, tmp_path, capsys):
    png = tmp_path / "growth.png"
    assert main(["stats", str(stats_jsonl.parent), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:] if line[:1].isdigit()]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [("0", "2", "8", "+2"), ("1", "3", "11", "+1"),
                                                         ("2", "4", "15", "+1")]
    assert png_size(png) == (900, 800)
    assert 20_000 < png.stat().st_size < 300_000  # a real figure, small enough to commit


def test_stats_plot_without_matplotlib_names_the_extra(stats_jsonl, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from wdsrefresh.cli import main; "
            f"sys.exit(main(['stats', {str(stats_jsonl)!r}, '--plot', {str(tmp_path / 'g.png')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "pip install 'wdsrefresh[plot]'" in done.stderr
    assert not (tmp_path / "g.png").exists()


def test_stats_of_a_damaged_file_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "stats.jsonl"
    path.write_text('{"epoch": 0}\nnot json\n')
    assert main(["stats", str(path)]) == 1
    assert f"{path}: line 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- logging and ingest output


def test_ingest_prints_each_shard_and_v_shows_our_info_but_not_watchdogs_debug(tmp_path, procs):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    runs = {}
    for flags in ([], ["-v"]):
        target = out / (flags[0] if flags else "quiet")
        proc = subprocess.Popen(CLI + flags + ["ingest", str(inbox), "-o", str(target), "--settle", "0.2",
                                               "--flush", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        key = f"k{len(runs)}"
        (inbox / f".{key}.txt").write_bytes(b"hello")
        os.rename(inbox / f".{key}.txt", inbox / f"{key}.txt")
        [line] = read_line_until(proc, "published")
        assert line.strip() == f"published {target}/shard-000000.tar: 1 samples, 2048 bytes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        runs[tuple(flags)] = proc.stderr.read()
    assert runs[()] == ""
    verbose = runs[("-v",)].splitlines()
    assert "INFO wdsrefresh: published shard-000000.tar: 1 samples, 2048 bytes" in verbose
    assert not [line for line in verbose if not line.startswith("INFO wdsrefresh:")], verbose

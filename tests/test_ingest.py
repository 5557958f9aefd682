"""`wdsrefresh ingest`: complete samples only, every input in exactly one shard, even under kill -9."""

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import wait_for

from wdsrefresh.format import manifest
from wdsrefresh.write.ingest import IngestConfig, IngestError, Ingester, _journal_doc
from wdsrefresh.format.tario import open_shard
from wdsrefresh.write.verify import verify

CLI = [sys.executable, "-m", "wdsrefresh.cli"]


def drop(inbox, name, data):
    """Drops a file the safe way: written under a hidden name, then renamed into place."""
    path = os.path.join(inbox, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(name) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def published_members(out):
    """Counter of member names over the shards the manifest lists (which must be all of them)."""
    entries = manifest.load(os.path.join(out, "manifest.json"))
    assert sorted(e.url for e in entries) == sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    names = collections.Counter()
    for e in entries:
        reader, fd = open_shard(os.path.join(out, e.url))
        try:
            samples = list(reader.samples())
        finally:
            os.close(fd)
        assert len(samples) == e.nsamples
        names.update(f"{s['__key__']}.{ext}" for s in samples for ext in s if not ext.startswith("__"))
    return names


def inbox_files(inbox):
    return sorted(os.path.relpath(os.path.join(r, f), inbox) for r, _, fs in os.walk(inbox) for f in fs)


def inputs_left(inbox):
    """Files an ingest would take (while one runs, its hidden lock file is in the inbox too)."""
    return [n for n in inbox_files(inbox) if not os.path.basename(n).startswith(".")]


def config(tmp_path, **kw):
    kw.setdefault("settle", 0.1)
    os.makedirs(tmp_path / "inbox", exist_ok=True)
    return IngestConfig(str(tmp_path / "inbox"), str(tmp_path / "out"), **kw)


def ingest_once(cfg):
    with Ingester(cfg) as ingester:
        ingester.run_once()


def test_once_publishes_every_complete_sample_then_empties_inbox(tmp_path):
    cfg = config(tmp_path, maxcount=5)
    expected = set()
    for i in range(12):
        drop(cfg.inbox, f"s{i:02d}.txt", b"%d" % i)
        expected.add(f"s{i:02d}.txt")
    for name in ("m.jpg", "m.cls", "m.done", "sub/n.bin", "sub/n.done"):
        drop(cfg.inbox, name, b"x")
    expected |= {"m.jpg", "m.cls", "sub/n.bin"}
    ingest_once(cfg)
    members = published_members(cfg.out)
    assert set(members) == expected and set(members.values()) == {1}
    assert inbox_files(cfg.inbox) == []
    assert verify(cfg.out) == []


def test_archive_receives_every_input_including_markers(tmp_path):
    archive = str(tmp_path / "archive")
    cfg = config(tmp_path, archive=archive)
    for name in ("a.txt", "b.jpg", "b.done"):
        drop(cfg.inbox, name, b"data")
    ingest_once(cfg)
    assert set(published_members(cfg.out)) == {"a.txt", "b.jpg"}
    assert inbox_files(cfg.inbox) == [] and inbox_files(archive) == ["a.txt", "b.done", "b.jpg"]


def test_require_done_takes_only_marked_samples(tmp_path):
    cfg = config(tmp_path, require_done=True)
    for name in ("a.txt", "b.txt", "b.done"):
        drop(cfg.inbox, name, b"data")
    ingest_once(cfg)
    assert set(published_members(cfg.out)) == {"b.txt"}
    assert inbox_files(cfg.inbox) == ["a.txt"]


def test_file_open_for_writing_waits_until_closed(tmp_path):
    cfg = config(tmp_path, settle=0.05, flush=0.05, maxcount=100)
    ingester = Ingester(cfg)
    ingester.open()
    loop = threading.Thread(target=ingester.run_forever, daemon=True)
    loop.start()
    assert ingester.watching.wait(10)
    slow = os.path.join(cfg.inbox, "slow.bin")
    try:
        with open(slow, "wb") as f:
            f.write(b"first half ")
            f.flush()
            wait_for(lambda: slow in ingester.tracker.writing, 10, "the write event")
            drop(cfg.inbox, "quick.txt", b"q")
            wait_for(lambda: os.path.exists(os.path.join(cfg.out, "manifest.json")), 10, "a shard")
            assert set(published_members(cfg.out)) == {"quick.txt"}  # flushed alone; slow.bin is open
            f.write(b"second half")
        wait_for(lambda: inputs_left(cfg.inbox) == [], 10, "slow.bin to be taken")
    finally:
        ingester.stop()
        loop.join(timeout=10)
        ingester.close()
    assert not loop.is_alive()
    reader, fd = open_shard(os.path.join(cfg.out, "shard-000001.tar"))
    assert [s["bin"] for s in reader.samples()] == [b"first half second half"]
    os.close(fd)


def test_marker_arriving_after_its_sample_was_taken_is_removed(tmp_path):
    cfg = config(tmp_path)
    drop(cfg.inbox, "a.txt", b"data")
    ingest_once(cfg)
    drop(cfg.inbox, "a.done", b"")
    ingest_once(cfg)
    assert published_members(cfg.out) == {"a.txt": 1} and inbox_files(cfg.inbox) == []


def test_second_ingest_on_same_inbox_is_refused(tmp_path):
    first = Ingester(config(tmp_path))
    first.open()
    try:
        with pytest.raises(IngestError, match="another ingest is already running"):
            Ingester(config(tmp_path)).open()
    finally:
        first.close()


def test_second_ingest_on_same_inbox_is_refused_whatever_its_output(tmp_path):
    first = Ingester(config(tmp_path))
    first.open()
    try:
        other = IngestConfig(first.cfg.inbox, str(tmp_path / "elsewhere"), settle=0.1)
        with pytest.raises(IngestError, match="another ingest is already running on .*wdsrefresh-ingest.lock"):
            Ingester(other).open()
    finally:
        first.close()
    assert inbox_files(first.cfg.inbox) == []  # the lock file goes with the ingest that held it
    with Ingester(other):
        pass


def snapshot(root):
    return sorted((os.path.relpath(os.path.join(r, n), root)) for r, ds, fs in os.walk(root) for n in ds + fs)


@pytest.mark.parametrize("layout", ["out is inbox", "out inside inbox", "inbox inside out", "archive inside inbox"])
def test_overlapping_inbox_output_and_archive_are_refused_before_anything_changes(tmp_path, layout):
    inbox = tmp_path / ("out/inbox" if layout == "inbox inside out" else "inbox")
    out = {"out is inbox": inbox, "out inside inbox": inbox / "shards"}.get(layout, tmp_path / "out")
    archive = str(inbox / "done") if layout == "archive inside inbox" else None
    drop(str(inbox), "a.txt", b"data")
    before = snapshot(tmp_path)
    with pytest.raises(IngestError, match="overlap"):
        Ingester(IngestConfig(str(inbox), str(out), archive=archive, settle=0.1)).open()
    assert snapshot(tmp_path) == before


def test_cli_refuses_output_inside_inbox_and_missing_inbox(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    r = subprocess.run(CLI + ["ingest", str(inbox), "-o", str(inbox / "out"), "--once"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and f"output directory {inbox / 'out'} and inbox {inbox} overlap" in r.stderr
    missing = tmp_path / "typo"
    with pytest.raises(IngestError, match=f"inbox {missing}: no such directory"):
        Ingester(IngestConfig(str(missing), str(tmp_path / "out"))).open()
    assert sorted(os.listdir(tmp_path)) == ["inbox"]  # neither the inbox nor OUT was created


def test_recovery_never_removes_a_file_recreated_under_the_same_name(tmp_path):
    cfg = config(tmp_path)
    drop(cfg.inbox, "a.txt", b"version 1")
    st = os.stat(os.path.join(cfg.inbox, "a.txt"))
    ingest_once(cfg)
    drop(cfg.inbox, "a.txt", b"version 2, a new input")
    # the journal of a publication that crashed before removing its input (version 1)
    ingester = Ingester(cfg)
    entry = manifest.load(os.path.join(cfg.out, "manifest.json"))[0]
    inputs = [{"path": os.path.join(ingester.inbox, "a.txt"), "ino": st.st_ino, "size": st.st_size,
               "mtime_ns": st.st_mtime_ns}]
    os.makedirs(ingester.journal_dir, exist_ok=True)
    manifest.write_json_atomic(os.path.join(ingester.journal_dir, entry.url + ".json"),
                               _journal_doc(entry, ".gone.tmp", inputs))
    ingest_once(cfg)
    assert published_members(cfg.out) == {"a.txt": 1}  # version 1 once; version 2 kept, its key being taken
    with open(os.path.join(cfg.inbox, ".wdsrefresh", "conflicts", "a.txt"), "rb") as f:
        assert f.read() == b"version 2, a new input"
    assert os.listdir(ingester.journal_dir) == []


def test_recovery_rolls_back_a_publication_not_yet_renamed(tmp_path):
    cfg = config(tmp_path)
    drop(cfg.inbox, "a.txt", b"data")
    ingester = Ingester(cfg)
    os.makedirs(ingester.journal_dir)
    tmp_name = f".ingest-{ingester.tag}-1-1.tar.tmp"
    with open(os.path.join(ingester.out, tmp_name), "wb") as f:
        f.write(b"a shard that was never renamed")
    entry = manifest.ManifestEntry("shard-000000.tar", 1, 30, "xxh3_128:00", b"")
    manifest.write_json_atomic(os.path.join(ingester.journal_dir, "shard-000000.tar.json"),
                               _journal_doc(entry, tmp_name, [{"path": os.path.join(ingester.inbox, "a.txt"),
                                                               "ino": 0, "size": 0, "mtime_ns": 0}]))
    ingester.open()
    ingester.close()
    assert inbox_files(cfg.inbox) == ["a.txt"]
    assert [n for n in os.listdir(cfg.out) if not n.startswith(".wdsrefresh")] == []


def test_cli_watches_until_sigterm_then_exits_cleanly(tmp_path, procs):
    inbox, out = str(tmp_path / "inbox"), str(tmp_path / "out")
    os.makedirs(inbox)
    err = str(tmp_path / "ingest.log")
    with open(err, "w") as f:
        proc = subprocess.Popen(CLI + ["-v", "ingest", inbox, "-o", out, "--settle", "0.05", "--flush", "0.05"],
                                stderr=f)
    procs.append(proc)
    wait_for(lambda: "watching" in open(err).read() or proc.poll() is not None, 60, "ingest to start")
    drop(inbox, "a.txt", b"hello")
    wait_for(lambda: inputs_left(inbox) == [], 30, "a.txt to be published")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, open(err).read()
    assert published_members(out) == {"a.txt": 1}
    assert inbox_files(inbox) == []  # the inbox lock is released and removed


DROPPER = r"""
import os, sys, time
inbox, stop, log = sys.argv[1:4]
def put(name, data, atomic):
    path = os.path.join(inbox, name)
    tmp = os.path.join(inbox, "." + name + ".tmp") if atomic else path
    with open(tmp, "wb") as f:
        f.write(data)
    if atomic:
        os.rename(tmp, path)
i = 0
with open(log, "w") as names:
    while not os.path.exists(stop):
        if i % 3:
            put(f"k{i:05d}.bin", os.urandom(1000 + i), atomic=True)
            names.write(f"k{i:05d}.bin\n")
        else:  # written in place, completed by a marker
            for ext in ("jpg", "cls"):
                put(f"m{i:05d}.{ext}", os.urandom(500), atomic=False)
                names.write(f"m{i:05d}.{ext}\n")
            put(f"m{i:05d}.done", b"", atomic=False)
        names.flush()
        i += 1
        time.sleep(0.004)
"""


def test_kill_9_at_random_moments_loses_and_doubles_nothing(tmp_path, procs):
    inbox, out = str(tmp_path / "inbox"), str(tmp_path / "out")
    os.makedirs(inbox)
    stop, log = str(tmp_path / "stop"), str(tmp_path / "dropped.txt")
    dropper = subprocess.Popen([sys.executable, "-c", DROPPER, inbox, stop, log])
    procs.append(dropper)
    rng = random.Random(1234)
    # settle 0.3: in-place writes that stall longer than that before the marker arrives get
    # taken by settling first; the rest of that sample is then set aside, its key being published
    args = ["-v", "ingest", inbox, "-o", out, "--settle", "0.3", "--flush", "0.05", "--maxcount", "4"]

    def start(round_):
        err = str(tmp_path / f"ingest-{round_}.log")
        with open(err, "w") as f:
            proc = subprocess.Popen(CLI + args, stderr=f)
        procs.append(proc)
        return proc, err

    def kill(proc, err):
        assert proc.poll() is None, open(err).read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def published():
        return len([n for n in os.listdir(out) if n.endswith(".tar")])

    for round_ in range(20):
        proc, err = start(round_)
        if rng.random() < 0.8:  # most kills while it works; some during start-up and recovery
            wait_for(lambda: "watching" in open(err).read() or proc.poll() is not None, 30, "ingest to start")
        time.sleep(rng.uniform(0, 0.3))
        kill(proc, err)
    # the kills must have met real work: one more run, killed once more than 10 shards are out
    proc, err = start(20)
    wait_for(lambda: published() > 10 or proc.poll() is not None, 60, "more than 10 shards published under kill -9")
    kill(proc, err)
    open(stop, "w").close()
    assert dropper.wait(timeout=30) == 0
    final = subprocess.run(CLI + ["ingest", inbox, "-o", out, "--once", "--settle", "0.3", "--maxcount", "4"],
                           capture_output=True, text=True, timeout=60)
    assert final.returncode == 0, final.stderr
    dropped = open(log).read().split()
    members = published_members(out)
    aside = [n for n in inbox_files(os.path.join(inbox, ".wdsrefresh", "conflicts")) if not n.endswith(".done")]
    assert sorted(list(members) + aside) == sorted(dropped) and set(members.values()) == {1}
    assert {os.path.splitext(n)[0] for n in aside} <= {os.path.splitext(n)[0] for n in members}
    assert [n for n in inbox_files(inbox) if not n.startswith(".wdsrefresh/")] == []
    assert verify(out) == []

"""`wdsrefresh ingest` publishes each key once: later versions of a published sample are set aside."""

import os
import signal
import subprocess
import sys

from conftest import wait_for
from test_ingest import CLI, drop, inbox_files, published_members

from wdsrefresh.format import manifest
from wdsrefresh.format.tario import open_shard

# Writes its files in place, closes them, and reopens them ("ab") for the next version once ingest
# has taken the last one: its pause is longer than --settle by construction, whatever the load.
REOPENING_WRITER = r"""
import os, sys, time
inbox, first, end, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
for v in range(first, end):
    for key in keys:
        with open(os.path.join(inbox, key + ".bin"), "ab") as f:
            f.write(b"%s version %d" % (key.encode(), v))
    deadline = time.monotonic() + 60
    while any(os.path.exists(os.path.join(inbox, key + ".bin")) for key in keys):
        if time.monotonic() > deadline:
            sys.exit(f"version {v} was never taken from {inbox}")
        time.sleep(0.01)
"""


def inputs_left(inbox):
    """Files an ingest would take: none with a hidden name or under a hidden folder."""
    return [n for n in inbox_files(inbox) if not any(part.startswith(".") for part in n.split(os.sep))]


def published_payloads(out):
    """``{key: payload}`` of every sample in the shards ``out``'s manifest lists."""
    found = {}
    for e in manifest.load(os.path.join(out, "manifest.json")):
        reader, fd = open_shard(os.path.join(out, e.url))
        try:
            found.update((s["__key__"], s["bin"]) for s in reader.samples())
        finally:
            os.close(fd)
    return found


def conflict_files(inbox):
    """``{path in the inbox: contents}`` of the files ingest set aside."""
    root = os.path.join(inbox, ".wdsrefresh", "conflicts")
    return {os.path.join(r, n): open(os.path.join(r, n), "rb").read() for r, _, fs in os.walk(root) for n in fs}


def test_writer_reopening_a_published_file_never_publishes_its_key_twice(tmp_path, procs):
    inbox, out = str(tmp_path / "inbox"), str(tmp_path / "out")
    os.makedirs(inbox)
    err = str(tmp_path / "ingest.log")
    with open(err, "w") as f:
        ingest = subprocess.Popen(CLI + ["ingest", inbox, "-o", out, "--settle", "0.5", "--flush", "0.05"],
                                  stdout=subprocess.DEVNULL, stderr=f)
    procs.append(ingest)
    writer = subprocess.Popen([sys.executable, "-c", REOPENING_WRITER, inbox, "0", "3", "a", "b"])
    procs.append(writer)
    assert writer.wait(timeout=120) == 0
    wait_for(lambda: inputs_left(inbox) == [], 30, "the last version to be taken")
    ingest.send_signal(signal.SIGTERM)
    assert ingest.wait(timeout=30) == 0, open(err).read()
    # a fourth version while no ingest runs: the next one knows the keys from OUT alone
    for key in ("a", "b"):
        with open(os.path.join(inbox, key + ".bin"), "wb") as f:
            f.write(b"%s version 3" % key.encode())
    once = subprocess.run(CLI + ["ingest", inbox, "-o", out, "--once", "--settle", "0.5"], capture_output=True,
                          text=True, timeout=60)
    assert once.returncode == 0, once.stderr

    assert published_members(out) == {"a.bin": 1, "b.bin": 1}
    assert published_payloads(out) == {"a": b"a version 0", "b": b"b version 0"}
    aside = conflict_files(inbox)
    for key in ("a", "b"):  # every later version set aside once, under the file's name: none lost
        assert sorted(data for path, data in aside.items() if os.path.basename(path).startswith(key + ".bin")) == \
            [b"%s version %d" % (key.encode(), v) for v in (1, 2, 3)]
    assert len(aside) == 6
    warnings = open(err).read() + once.stderr
    for path in aside:
        assert f"is published already (in {out}/shard-00000" in warnings and f"moved to {path}" in warnings
    assert warnings.count("WARNING") == len(aside)
    assert inputs_left(inbox) == [] and len(inbox_files(inbox)) == len(aside)

    status = subprocess.run(CLI + ["status", out, "--inbox", inbox], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"{len(aside)} files set aside in {inbox}/.wdsrefresh/conflicts (key published already)" in status.stdout
    for path in aside:
        assert f"conflict {path}: its key was published already" in status.stdout


def test_done_marker_completes_a_sample_at_once(tmp_path, procs):
    inbox, out = str(tmp_path / "inbox"), str(tmp_path / "out")
    os.makedirs(inbox)
    ingest = subprocess.Popen(CLI + ["ingest", inbox, "-o", out, "--settle", "60", "--flush", "0.05"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(ingest)
    for name, data in (("m.jpg", b"jpeg"), ("m.cls", b"3"), ("n.txt", b"no marker")):
        with open(os.path.join(inbox, name), "wb") as f:  # in place: complete only by marker or settling
            f.write(data)
    drop(inbox, "m.done", b"")
    wait_for(lambda: not os.path.exists(os.path.join(inbox, "m.done")), 30, "m to be published (settle is 60 s)")
    assert published_members(out) == {"m.jpg": 1, "m.cls": 1}
    assert inputs_left(inbox) == ["n.txt"]  # settling: unchanged for less than 60 s
    ingest.send_signal(signal.SIGTERM)
    assert ingest.wait(timeout=30) == 0


def test_file_held_open_by_its_writer_is_never_ingested_however_long_unchanged(tmp_path):
    inbox, out = str(tmp_path / "inbox"), str(tmp_path / "out")
    os.makedirs(inbox)
    drop(inbox, "done.bin", b"d" * 100)
    with open(os.path.join(inbox, "open.bin"), "wb") as writer:  # written, not closed: the writer may go on
        writer.write(b"o" * 100)
        writer.flush()
        first = subprocess.run(CLI + ["ingest", inbox, "-o", out, "--once", "--settle", "0.3"], capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert published_members(out) == {"done.bin": 1} and inputs_left(inbox) == ["open.bin"]
    second = subprocess.run(CLI + ["ingest", inbox, "-o", out, "--once", "--settle", "0.3"], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert published_members(out) == {"done.bin": 1, "open.bin": 1} and inputs_left(inbox) == []

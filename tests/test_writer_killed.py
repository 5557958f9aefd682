"""A `wr.Writer` killed with SIGKILL mid-shard leaves its temporary shard file behind; the next
Writer on the same destination removes it (and never one of a writer still running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest

import wdsrefresh as wr
from s3fixtures import moto_server, s3  # noqa: F401 - fixtures

WRITES_AND_WAITS = """
import sys, time
import wdsrefresh as wr
w = wr.Writer(sys.argv[1], maxcount=1000)
for i in range(10):
    w.write({"__key__": f"k{i:03d}", "bin": b"x" * 100})
print(w._tmp_path, flush=True)
time.sleep(600)
"""


def start_writer(out: str, procs: list) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITES_AND_WAITS, out], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    procs.append(proc)
    temporary = proc.stdout.readline().strip()
    assert temporary and os.path.exists(temporary), f"the writer printed {temporary!r}"
    return proc, temporary


@pytest.fixture
def private_tmpdir(tmp_path, monkeypatch):
    directory = tmp_path / "tmpdir"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.mark.parametrize("where", ["local", "s3"])
def test_temporary_of_a_killed_writer_is_removed_by_the_next_one(where, tmp_path, private_tmpdir, procs, request):
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3").url("w/")
    killed, killed_tmp = start_writer(out, procs)
    running, running_tmp = start_writer(out, procs)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert os.path.exists(killed_tmp)

    with wr.Writer(out) as w:
        w.write({"__key__": "mine", "bin": b"y"})
    assert not os.path.exists(killed_tmp)
    assert os.path.exists(running_tmp) and running.poll() is None

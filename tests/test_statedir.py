"""A dataset's private state directory outlives a process killed with SIGKILL; the next dataset
made in the same parent removes it, and never the directory of a process still running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import wdsrefresh as wr
from wdsrefresh.epoch.statedir import StateDirectory

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "example_shards")

HOLDS_A_DATASET = """
import sys, time
import wdsrefresh as wr
ds = wr.RefreshingWebDataset(sys.argv[1], state_dir=sys.argv[2], watch=False)
ds.set_epoch(0)
print(ds.state_directory, flush=True)
time.sleep(600)
"""


def start_holder(shards: str, parent: str, procs: list) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDS_A_DATASET, shards, parent], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    procs.append(proc)
    directory = proc.stdout.readline().strip()
    assert directory and os.path.isdir(directory), f"the holder printed {directory!r}"
    return proc, directory


def test_state_directory_of_a_killed_process_is_removed_by_the_next_dataset(tmp_path, procs):
    parent = str(tmp_path / "state")
    killed, killed_dir = start_holder(EXAMPLES, parent, procs)
    running, running_dir = start_holder(EXAMPLES, parent, procs)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert os.path.isdir(killed_dir)  # SIGKILL: no cleanup ran

    ds = wr.RefreshingWebDataset(EXAMPLES, state_dir=parent, watch=False)
    assert not os.path.exists(killed_dir)
    assert os.path.isdir(running_dir) and running.poll() is None
    assert sorted(os.listdir(parent)) == sorted(map(os.path.basename, [running_dir, ds.state_directory]))


def test_a_live_directory_is_never_removed_whatever_its_name_and_an_ownerless_one_is_left(tmp_path):
    parent = str(tmp_path / "state")
    first = StateDirectory(parent)  # alive in this very process
    ownerless = os.path.join(parent, "wdsrefresh-made-by-an-older-version")
    os.makedirs(ownerless)
    second = StateDirectory(parent)
    assert os.path.isdir(first.directory) and os.path.isdir(ownerless)
    second.cleanup()
    first.cleanup()
    assert sorted(os.listdir(parent)) == [os.path.basename(ownerless)]

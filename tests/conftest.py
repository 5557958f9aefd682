import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

TESTDATA = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testdata", "webdataset"))
# webdataset's own test shards (see shared/testdata/webdataset/README.md); tests fail, never skip, without them
THIRD_PARTY_SHARDS = ("compressed.tar", "mpdata.tar", "sample.tgz", "tendata.tar", "testgz.tar")


def third_party_shard(name: str) -> str:
    """The path of one of webdataset's test shards; fails the test when ../shared is missing."""
    path = os.path.join(TESTDATA, name)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: the differential tests need ../shared/testdata/webdataset beside the repo")
    return path


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    return str(d)


def _kill_group(pid: int) -> None:
    """Kills the process group that child ``pid`` leads, if it made one, and only while ``pid`` is
    not yet reaped: until then no other process can have its number."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # ChildProcessError once reaped
        os.killpg(pid, signal.SIGKILL)  # ProcessLookupError unless pid called setpgrp()
    except (ChildProcessError, ProcessLookupError, PermissionError):
        pass


def _kill_all(started: list) -> None:
    """Kills each process still alive (multiprocessing.Process or subprocess.Popen) and the process
    group it leads, if it made one (a rank's DataLoader workers and forkserver are in it)."""
    for p in started:
        _kill_group(p.pid)
        if p.is_alive() if hasattr(p, "is_alive") else p.poll() is None:
            p.kill()
        (p.join if hasattr(p, "join") else p.wait)(timeout=10)


@pytest.fixture
def procs():
    """Processes a test starts; any still alive at teardown are killed."""
    started = []
    yield started
    _kill_all(started)


@pytest.fixture(scope="module")
def module_procs():
    """Processes a module-scoped fixture starts; any still alive after the module are killed."""
    started = []
    yield started
    _kill_all(started)


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_home(tmp_path_factory):
    """The persistent index cache (default: $XDG_CACHE_HOME/wdsrefresh) goes to a temporary
    directory, for this process and the subprocesses it starts, never to the user's own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))

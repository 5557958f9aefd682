import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

TESTDATA = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "testdata", "webdataset"))


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    return str(d)


@pytest.fixture
def procs():
    """Processes a test starts; any still alive at teardown are killed."""
    started = []
    yield started
    for p in started:
        if p.is_alive() if hasattr(p, "is_alive") else p.poll() is None:
            p.kill()
        (p.join if hasattr(p, "join") else p.wait)(timeout=10)

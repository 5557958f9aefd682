"""What an older wdsrefresh saved keeps loading: a checkpoint and an index cache written by
commit 842b066 (fixtures/make_state_842b066.py says how they were made)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import sys
from contextlib import contextmanager

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

import wdsrefresh as wr

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))
import make_state_842b066 as made  # noqa: E402

with open(os.path.join(HERE, "fixtures", "state_842b066.pickle"), "rb") as f:
    SAVED = pickle.load(f)


@contextmanager
def the_saved_shards():
    """The shards the checkpoint names, made again where it names them (their absolute path),
    held against other test runs on this machine and removed after."""
    root = os.path.dirname(made.SHARDS)
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(root, ignore_errors=True)
        try:
            made.make_shards(made.SHARDS, SAVED["sizes"])
            yield made.SHARDS
        finally:
            shutil.rmtree(root, ignore_errors=True)


def loader_for(shards: str, **kw) -> tuple:
    ds = wr.RefreshingWebDataset(shards, watch=False, **kw).map(made.key)
    return ds, StatefulDataLoader(ds, batch_size=SAVED["batch_size"], num_workers=SAVED["num_workers"],
                                  collate_fn=list)


@pytest.mark.timeout(180)
def test_a_checkpoint_saved_by_842b066_resumes_exactly_where_that_run_went_on():
    assert SAVED["commit"] == "842b066" and SAVED["state"]  # a mid-epoch state, not an empty one
    with the_saved_shards() as shards:
        ds, loader = loader_for(shards, index_cache=False)
        loader.load_state_dict(SAVED["state"])
        assert list(loader) == SAVED["rest_of_epoch"]
        assert list(loader) == SAVED["next_epoch"]
        ds.close()


@pytest.mark.timeout(180)
def test_an_index_cache_written_by_842b066_is_read_and_kept(tmp_path):
    saved = SAVED["index_cache"]
    old = json.loads(saved["bytes"])
    cache_files = tmp_path / "cache" / "index-v1"
    cache_files.mkdir(parents=True)
    (cache_files / saved["name"]).write_bytes(saved["bytes"])
    with the_saved_shards() as shards:
        ds = wr.RefreshingWebDataset(shards, watch=False, index_cache=str(tmp_path / "cache"))
        assert len(ds.set_epoch(0)) == sum(SAVED["sizes"])
        ds.close()
    # the shards made again are new file versions, indexed and written back into the same file
    # (the cache's name for the directory has not changed), beside the old entry it still holds
    assert sorted(n for n in os.listdir(cache_files) if n.endswith(".json")) == [saved["name"]]
    now = json.loads((cache_files / saved["name"]).read_bytes())
    assert (now["format"], now["version"], now["directory"]) == (old["format"], old["version"], old["directory"])
    assert now["entries"]["s99.tar"] == old["entries"]["s99.tar"]  # read from 842b066's file, not dropped
    assert sorted(now["entries"]) == sorted(old["entries"])
    assert all(now["entries"][n] != old["entries"][n] for n in old["entries"] if n != "s99.tar")

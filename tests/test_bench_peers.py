"""tools/bench.py --peers writes LitData the same samples the bench's shards hold (checked without litdata)."""

import os
import sys

import pytest
import webdataset as wds

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import bench  # noqa: E402
from bench_peers_child import tar_samples  # noqa: E402


def _fields(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


@pytest.mark.parametrize("pax", [True, False], ids=["pax", "plain"])
def test_litdata_export_reads_the_samples_webdataset_reads(tmp_path, pax):
    spec = bench.ShardSet("t", "test", bench.SMALL_MEMBERS + (("Big.BIN", 3000),), pax, shards=2,
                          samples_per_shard=7)
    urls = bench.ensure_set(tmp_path, spec)
    ours = list(tar_samples(urls))
    theirs = [_fields(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert len(ours) == spec.samples
    assert ours == theirs

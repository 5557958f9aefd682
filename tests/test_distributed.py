"""Invariants 1, 2, 3, 7 with real torch.distributed ranks (gloo on 127.0.0.1) and real workers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import ddp_check  # noqa: E402
from shardutil import write_shard  # noqa: E402


@pytest.mark.timeout(300)
@pytest.mark.parametrize("persistent", [False, True])
def test_every_sample_once_equal_per_rank_while_writer_changes_directory(tmp_path, procs, persistent):
    directory, out = tmp_path / "shards", tmp_path / "out"
    directory.mkdir()
    out.mkdir()
    for i in range(4):
        write_shard(str(directory), f"seed{i}.tar", 10 + 3 * i)
    records = ddp_check.run(str(directory), str(out), world_size=2, num_workers=2, persistent=persistent,
                            epochs=5, batch_size=4, procs=procs, timeout=240)
    totals = ddp_check.check(records, world_size=2)
    assert totals["epochs"] == 5 and totals["yielded"] > 0


@pytest.mark.timeout(300)
def test_three_ranks_uneven_shards_exact_split(tmp_path, procs):
    directory, out = tmp_path / "shards", tmp_path / "out"
    directory.mkdir()
    out.mkdir()
    for i, n in enumerate([1, 50, 7, 13, 2, 33, 19]):
        write_shard(str(directory), f"u{i}.tar", n)
    records = ddp_check.run(str(directory), str(out), world_size=3, num_workers=2, persistent=False,
                            epochs=3, batch_size=5, with_writer=False, procs=procs, timeout=240)
    totals = ddp_check.check(records, world_size=3)
    assert totals["samples"] == 3 * 125
    assert totals["left_out"] == 3 * (125 % 3) and totals["skipped"] == 0 and totals["padded"] == 0

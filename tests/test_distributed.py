"""Invariants 1, 2, 3, 7 with real torch.distributed ranks (gloo on 127.0.0.1) and real workers.

Starting a group of ranks costs seconds (spawn, import torch, rendezvous, the workers'
forkserver), so each group is started once per module and runs the steps of several tests in
sequence; each test checks its own step's records.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import ddp_check  # noqa: E402
from shardutil import write_shard  # noqa: E402

UNEVEN = [1, 50, 7, 13, 2, 33, 19]


def _resolve_on_empty_directory(group, directory):
    """A step: what ``set_epoch`` raises on this rank when rank 0 finds no shard."""
    import wdsrefresh as wr

    ds = wr.RefreshingWebDataset(directory, min_shards=1, timeout=0.5)
    try:
        ds.set_epoch(0)
        return "no error"
    except Exception as exn:  # noqa: BLE001 - the test records what each rank saw
        return f"{type(exn).__name__}: {exn}"
    finally:
        ds.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, module_procs):
    """Results of the steps run by one group of 2 ranks, by step name.

    Both loaders start their workers with forkserver: each worker gets a pickled copy of the
    dataset, as with spawn, and learns its rank from the dataset's state, not from
    torch.distributed. The persistent one reads every epoch with the same workers.
    """
    tmp = tmp_path_factory.mktemp("two_ranks")
    directory, empty, out = tmp / "shards", tmp / "empty", tmp / "out"
    for d in (directory, empty, out):
        d.mkdir()
    for i in range(4):
        write_shard(str(directory), f"seed{i}.tar", 10 + 3 * i)
    read = {"directory": str(directory), "num_workers": 2, "epochs": 5, "batch_size": 4, "start_method": "forkserver"}
    steps = {
        "non-persistent": (ddp_check.read_epochs, {**read, "persistent": False}),
        "persistent": (ddp_check.read_epochs, {**read, "persistent": True}),
        "empty": (_resolve_on_empty_directory, {"directory": str(empty)}),
    }
    results = ddp_check.run_steps(list(steps.values()), world_size=2, out=str(out), writer_dirs=[str(directory)],
                                  procs=module_procs, timeout=240)
    return dict(zip(steps, results))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, module_procs):
    """Records of 3 ranks x 2 workers reading uneven shards, no writer.

    The workers are forked (the default under torchrun on Linux): each inherits the rank's
    initialized process group, the other way a worker learns its rank.
    """
    tmp = tmp_path_factory.mktemp("three_ranks")
    directory, out = tmp / "shards", tmp / "out"
    directory.mkdir()
    out.mkdir()
    for i, n in enumerate(UNEVEN):
        write_shard(str(directory), f"u{i}.tar", n)
    step = (ddp_check.read_epochs, {"directory": str(directory), "num_workers": 2, "persistent": False, "epochs": 3,
                                    "batch_size": 5, "start_method": "fork"})
    (records,) = ddp_check.run_steps([step], world_size=3, out=str(out), procs=module_procs, timeout=240)
    return records


@pytest.mark.timeout(300)
@pytest.mark.parametrize("persistent", [False, True])
def test_every_sample_once_equal_per_rank_while_writer_changes_directory(two_ranks, persistent):
    records = two_ranks["persistent" if persistent else "non-persistent"]
    totals = ddp_check.check(records, world_size=2)
    assert totals["epochs"] == 5 and totals["yielded"] > 0
    assert totals["deleted"] > 0 and totals["padded"] > 0, "no shard was deleted mid-epoch: the pad path never ran"


@pytest.mark.timeout(300)
def test_three_ranks_uneven_shards_exact_split(three_ranks):
    totals = ddp_check.check(three_ranks, world_size=3)
    assert totals["samples"] == 3 * sum(UNEVEN)
    assert totals["left_out"] == 3 * (sum(UNEVEN) % 3) and totals["skipped"] == 0 and totals["padded"] == 0


@pytest.mark.timeout(300)
def test_rank0_resolve_error_reaches_every_rank_instead_of_hanging(two_ranks):
    seen = two_ranks["empty"]
    assert seen[0].startswith("NotEnoughShardsError") and "empty" in seen[0]
    assert seen[1].startswith("RankZeroError") and "NotEnoughShardsError" in seen[1]
